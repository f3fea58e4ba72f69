import json

import pytest

from benchmarks import bench

TINY = ["--quick", "--steps", "12", "--warmup", "2", "--check-every", "10", "--data.val_size", "100",
        "--data.batch_size", "16", "--model.channels", "[8, 16, 16]"]


def test_bench_writes_results_and_rewrites_only_its_table(synthetic_data_dir, tmp_path):
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(f"# Benchmarks\n\nintro\n\n{bench.START}\nold table\n{bench.END}\n\nnotes\n")
    results_path = tmp_path / "results.json"
    bench.main([*TINY, "--data.data_dir", str(synthetic_data_dir), "--results", str(results_path),
                "--report", str(report)])
    results = json.loads(results_path.read_text())
    assert {"lightning_vs_torch_throughput_ratio", "cpu_seconds_to_99", "prepare_seconds_cached",
            "predict_images_per_second"} <= set(results)
    assert {"cpu", "cores", "torch", "device"} <= set(results["machine"])
    assert results["lightning_vs_torch_throughput_ratio"] > 0 and results["predict_images_per_second"] > 0
    checks = results["to_99_checks"]
    assert [c["step"] for c in checks] == [10, 20, 30, 31]  # every 10 steps, then the epoch's end
    assert all(0 <= c["digit_acc"] <= 1 and 0 <= c["sum_acc_all_pairs"] <= 1 for c in checks)
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith("\n\nnotes\n") and "old table" not in text
    assert "| `cpu_seconds_to_99` |" in text


@pytest.mark.slow
def test_bench_compile_figures(synthetic_data_dir, tmp_path):
    results_path = tmp_path / "results.json"
    bench.main([*TINY, "--compile", "--data.data_dir", str(synthetic_data_dir), "--results", str(results_path),
                "--report", str(tmp_path / "BENCHMARKS.md")])
    results = json.loads(results_path.read_text())
    assert results["compile_step_speedup"] > 0 and len(results["compile_seconds_per_round"]["compiled"]) == 2
    assert "| `compile_step_speedup` |" in (tmp_path / "BENCHMARKS.md").read_text()
