import json

import pytest

from benchmarks import bench

TINY = ["--quick", "--steps", "12", "--warmup", "2", "--check-every", "10", "--seeds", "0", "1", "--data.val_size", "100",
        "--data.batch_size", "16", "--model.channels", "[8, 16, 16]"]


def test_bench_writes_results_and_rewrites_only_its_table(synthetic_data_dir, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(f"# Benchmarks\n\nintro\n\n{bench.START}\nold table\n{bench.END}\n\nnotes\n")
    results_path = tmp_path / "results.json"
    bench.main([*TINY, "--data.data_dir", str(synthetic_data_dir), "--results", str(results_path),
                "--report", str(report)])
    results = json.loads(results_path.read_text())
    assert {"lightning_vs_torch_throughput_ratio", "samples_to_99", "cpu_seconds_to_99", "val_samples_to_99",
            "prepare_seconds_cached", "predict_images_per_second"} <= set(results)
    assert {"cpu", "cores", "torch"} <= set(results["machine"]) and results["machine"]["device"] == "cpu"
    assert results["lightning_vs_torch_throughput_ratio"] > 0 and results["predict_images_per_second"] > 0
    assert set(results["to_99_runs"]) == {"0", "1"}
    for run in results["to_99_runs"].values():
        checks = run["checks"]
        assert [c["step"] for c in checks] == [10, 20, 30, 31][:len(checks)]  # every 10 steps, then the epoch's end
        assert [c["samples"] for c in checks] == [16 * c["step"] for c in checks]
        assert all(0 <= c[key] <= 1 for c in checks for key in ("val_digit_acc", "val_sum_acc", "test_digit_acc",
                                                                  "test_sum_acc"))
        first = next((c for c in checks if min(c["test_digit_acc"], c["test_sum_acc"]) >= 0.99), None)
        assert run["samples_to_99"] == (first and first["samples"])
    worst = [run["samples_to_99"] for run in results["to_99_runs"].values()]
    assert results["samples_to_99"] == (None if None in worst else max(worst))
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith("\n\nnotes\n") and "old table" not in text
    assert "| `samples_to_99` |" in text and "| `cpu_seconds_to_99` |" in text


@pytest.mark.slow
def test_bench_compile_figures(synthetic_data_dir, tmp_path):
    results_path = tmp_path / "results.json"
    bench.main([*TINY, "--compile", "--data.data_dir", str(synthetic_data_dir), "--results", str(results_path),
                "--report", str(tmp_path / "BENCHMARKS.md")])
    results = json.loads(results_path.read_text())
    assert results["compile_step_speedup"] > 0 and len(results["compile_seconds_per_round"]["compiled"]) == 2
    assert "| `compile_step_speedup` |" in (tmp_path / "BENCHMARKS.md").read_text()
