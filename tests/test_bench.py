import json
import re
import statistics
import types

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench, disagreements, outlier_time, tta, two_backward
from datamodule import AllPairs
from lightning_module import MNISTAdder
from mnist_adder.model.losses import weighted_sum_loss

SMALL_MODEL = ["--data.val_size", "100", "--data.batch_size", "16", "--model.channels", "[8, 16, 16]"]
TINY = [
    "--quick",
    "--rounds",
    "2",
    "--steps",
    "12",
    "--warmup",
    "2",
    "--check-every",
    "10",
    "--seeds",
    "0",
    "1",
    *SMALL_MODEL,
]


def test_bench_writes_results_and_rewrites_only_its_table(synthetic_data_dir, tmp_path, monkeypatch):
    target = 0.12  # what these tiny runs on synthetic data reach, in place of 99 %
    monkeypatch.setattr(bench.to_99, "TARGET", target)
    report = tmp_path / "BENCHMARKS.md"
    report.write_text(f"# Benchmarks\n\nintro\n\n{bench.START}\nold table\n{bench.END}\n\nnotes\n")
    results_path = tmp_path / "results.json"
    bench.main(
        [*TINY, "--data.data_dir", str(synthetic_data_dir), "--results", str(results_path), "--report", str(report)]
    )
    results = json.loads(results_path.read_text())
    assert {
        "lightning_vs_torch_throughput_ratio",
        "samples_to_99",
        "cpu_seconds_to_99",
        "val_samples_to_99",
        "prepare_seconds_cached",
        "predict_images_per_second",
    } <= set(results)
    assert {"cpu", "cores", "torch"} <= set(results["machine"]) and results["machine"]["device"] == "cpu"
    # the ratio is torch's time over Lightning's, per round, then their median; the rates are over all rounds
    seconds = {kind: t["seconds_per_round"] for kind, t in results["throughput"].items()}
    ratios = [t / lit for t, lit in zip(seconds["torch"], seconds["lightning"], strict=True)]
    assert results["throughput_ratio_per_round"] == [round(r, 3) for r in ratios]
    assert results["lightning_vs_torch_throughput_ratio"] == round(statistics.median(ratios), 3)
    for kind, t in results["throughput"].items():  # 2 rounds of 12 steps of 16 samples
        assert t["samples_per_second"] == pytest.approx(2 * 12 * 16 / sum(seconds[kind]), abs=0.05)
    assert set(results["to_99_runs"]) == {"0", "1"}
    for run in results["to_99_runs"].values():
        checks = run["checks"]
        # every 10 steps, then the epoch's end: 500 digits and 50 non-digits make 34 full batches of 16
        assert [c["step"] for c in checks] == [10, 20, 30, 34][: len(checks)]
        assert [c["samples"] for c in checks] == [16 * c["step"] for c in checks]
        assert all(
            0 <= c[key] <= 1
            for c in checks
            for key in ("val_digit_acc", "val_sum_acc", "test_digit_acc", "test_sum_acc")
        )
        first = next((c for c in checks if min(c["test_digit_acc"], c["test_sum_acc"]) >= target), None)
        assert run["samples_to_99"] == (first and first["samples"])
        if first:  # the seconds come from the seed run again up to that step, checked there only
            timed = run["timed_check"]
            assert timed == {**first, "seconds": timed["seconds"]} and run["seconds_to_99"] == timed["seconds"]
    worst = [run["samples_to_99"] for run in results["to_99_runs"].values()]
    assert any(worst)
    assert results["samples_to_99"] == (None if None in worst else max(worst))
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.endswith("\n\nnotes\n") and "old table" not in text
    shown = ("samples_to_99", "cpu_seconds_to_99", "lightning_vs_torch_throughput_ratio", "predict_images_per_second")
    for key in shown:
        value = "not reached" if results[key] is None else results[key]
        assert f"| `{key}` | {value} |" in text  # each figure's row shows the value results.json holds


@pytest.mark.parametrize("bad", [["--warmup", "-1"], ["--steps", "0"], ["--rounds", "0"], ["--check-every", "0"]])
def test_bench_refuses_counts_it_cannot_time(bad, capsys, tmp_path):
    with pytest.raises(SystemExit):  # before any measuring: the output paths are only a safeguard
        bench.main([*bad, "--results", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.md")])
    assert "must be >= 1, --warmup >= 0" in capsys.readouterr().err


def test_bench_refuses_a_precision_the_plain_loop_cannot_match(synthetic_data_dir, tmp_path):
    # before any fit (on a CPU, 16-mixed becomes bf16-mixed; bf16-true is a precision the plain loop cannot match)
    with pytest.raises(SystemExit, match="32-true and bf16-mixed only, not bf16-true"):
        bench.main(
            [
                "--only",
                "throughput",
                "--trainer.precision",
                "bf16-true",
                "--data.data_dir",
                str(synthetic_data_dir),
                "--results",
                str(tmp_path / "r.json"),
                "--report",
                str(tmp_path / "r.md"),
            ]
        )
    assert not (tmp_path / "r.json").exists()


def test_ops_per_training_step_counts_a_whole_step_and_sgds_loop(synthetic_data_dir, monkeypatch):
    """A step dispatches more than twice its forward pass's operations (the forward, two backward passes, the SGD
    step); SGD's per-parameter loop (foreach false, a CPU's default) dispatches at least one more per parameter; one
    more operation in training_step is one more per step."""
    args = ["--data.data_dir", str(synthetic_data_dir), *SMALL_MODEL]

    def per_step(foreach: str) -> float:
        options = [*args, "--model.optimizer.init_args.foreach", foreach]
        return bench.ops_per_training_step(options, "configs/default.yaml", "cpu")["ops_per_training_step"]

    counts = {foreach: per_step(foreach) for foreach in ("true", "false")}
    model = bench.build(args, "configs/default.yaml").model
    with bench.OpCounter() as forward:
        model.net(torch.rand(16, 1, 28, 28), torch.arange(16) % 10)
    assert counts["true"] > 2 * sum(forward.ops.values())
    assert counts["false"] - counts["true"] >= len(list(model.parameters()))
    step = MNISTAdder.training_step

    def with_one_more_op(self, batch, batch_idx):
        batch["digit"].neg()
        return step(self, batch, batch_idx)

    monkeypatch.setattr(MNISTAdder, "training_step", with_one_more_op)
    assert per_step("true") == pytest.approx(counts["true"] + 1)


def test_stopwatch_gives_each_label_its_calls_own_time(monkeypatch):
    """A wrapped call or an interval inside another counts for its own label only: the labels' times add up to the
    wall time."""
    now = [0.0]
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    watch = bench.Stopwatch()

    def wait(seconds: float, then=None) -> None:
        now[0] += seconds
        if then:
            then()
            now[0] += seconds

    inner = watch.wrapped(wait, "inner")
    outer = watch.wrapped(lambda: wait(1.0, then=lambda: inner(2.0)), "outer")
    outer()
    watch.start("interval")
    wait(0.5, then=lambda: inner(4.0))
    watch.stop()
    assert watch.seconds == {"outer": 2.0, "inner": 6.0, "interval": 1.0} and now[0] == 9.0


def test_startup_split_times_each_part_of_a_fit(synthetic_data_dir):
    tiny = ["--data.data_dir", str(synthetic_data_dir), "--data.val_size", "100", "--trainer.limit_train_batches", "8"]
    # 500 training images and no non-digits: 3 batches of fast.yaml's 128, as the schedule needs
    tiny += ["--data.non_digits", "0", "--model.not_digit_weight", "0"]
    results = bench.startup_split([*tiny, "--trainer.enable_progress_bar", "false"], "configs/fast.yaml")
    split = results["fit_seconds_split"]
    assert {
        "imports",
        "prepare_data: MD5 of the four files",
        "setup: read, split and pair MNIST, draw the non-digits",
        "sanity check",
        "training steps (and Lightning's loop)",
        "validation",
        "checkpoint writes",
        "test loader 0: steps",
        "test loader 1: steps",
        "other",
    } <= set(split)
    # the parts are the whole: the imports, then the fit's exclusive times and "other", its rest
    outside = sum(split.values()) - split["training steps (and Lightning's loop)"]
    assert results["fit_seconds_outside_training"] == pytest.approx(outside, abs=0.1)


def test_outlier_time_fits_with_and_without_non_digits_and_writes_between_its_markers(in_tmp):
    report = in_tmp / "experiments.md"
    report.write_text(f"before\n{outlier_time.START}\nold\n{outlier_time.END}\nafter\n")
    outlier_time.main(["--rounds", "1", "--epochs", "1", "--report", str(report), *SMALL_MODEL])
    text = report.read_text()
    assert text.startswith(f"before\n{outlier_time.START}\n| fit |") and text.endswith(f"{outlier_time.END}\nafter\n")
    # 500 training images, and 50 non-digits with them: an epoch of 31 steps of 16, or 34
    rows = re.findall(r"^\| (with outlier exposure \(default\)|without) \| (\d+) \|", text, re.M)
    assert rows == [("with outlier exposure (default)", "34"), ("without", "31")]


def test_disagreements_counts_the_pairs_where_the_sum_does_not_add():
    """Two images with all ten numbers; the sum head adds everywhere except for image 1 with numbers 2 and 7,
    where it follows the digit head's second choice."""
    digits, numbers = torch.tensor([4, 9]).repeat_interleave(10), torch.arange(10).repeat(2)
    digit_logits = F.one_hot(digits, 10).float() * 3
    digit_logits[10:, 4] = 2.5  # image 1: a 9 that could be a 4
    sum_logits = torch.full((20, 19), -5.0)
    sum_logits[torch.arange(20), digits + numbers] = 3.0
    for pair in (12, 17):
        sum_logits[pair, 4 + numbers[pair]] = 4.0
    text = disagreements.report(
        torch.cat([digit_logits, sum_logits], 1), {"number": numbers, "digit": digits, "sum": digits + numbers}
    )
    assert text.startswith("2 of 20 pairs disagree (10.000 %); digit accuracy 100.000 %, sum accuracy 90.000 %")
    assert "digit right, sum wrong: 2; digit wrong, sum right: 0; both wrong: 0" in text
    assert "second choice plus the number: 2 of 2" in text
    assert "distinct images: 1; pairs per image: {2: 1}" in text and "by number: {2: 1, 7: 1}" in text


def test_tta_shift_views_move_the_image_by_one_pixel():
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 10, 12] = 1.0
    where = [tuple(torch.nonzero(view(image)[0, 0] > 0.99)[0].tolist()) for view in tta.VIEWS["shift"]]
    assert where == [(10, 12), (10, 13), (10, 11), (11, 12), (9, 12)]


def test_tta_accuracy_without_views_is_the_plain_all_pairs_accuracy():
    torch.manual_seed(0)
    model = MNISTAdder(channels=(4, 8, 8), number_features=8, hidden=16, convs_per_stage=1).eval()
    pairs = AllPairs(torch.randint(0, 256, (30, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (30,)))
    logits, truth = disagreements.all_pair_logits(model, pairs)
    plain = [
        100 * (logits[:, :10].argmax(1) == truth["digit"]).float().mean().item(),
        100 * (logits[:, 10:].argmax(1) == truth["sum"]).float().mean().item(),
    ]
    assert tta.accuracies(model, pairs, tta.VIEWS["none"]) == pytest.approx(plain, abs=1e-4)
    assert tta.accuracies(model, pairs, tta.VIEWS["rotate"]) != pytest.approx(plain, abs=1e-4)


@pytest.mark.slow
def test_seeds_trains_each_seed_and_writes_the_table(real_data_dir, tmp_path):
    """Each seed runs `cli.py fit` in a subprocess, which reads real MNIST (the synthetic set's checksums
    are patched into this process only)."""
    import seeds

    results = tmp_path / "seeds.json"
    report, readme = tmp_path / "experiments.md", tmp_path / "README.md"
    report.write_text("# Record\n\n{}\n{}\n".format(*seeds.markers(results)))
    readme.write_text(f"# Configs\n\n{seeds.CONFIGS_START}\n{seeds.CONFIGS_END}\n")
    entry = seeds.main(
        [
            "--config",
            "configs/fast.yaml",
            "--seeds",
            "0",
            "1",
            "--name",
            "tiny",
            "--data-dir",
            str(real_data_dir),
            "--results",
            str(results),
            "--report",
            str(report),
            "--readme",
            str(readme),
            "--keep",
            str(tmp_path / "runs"),
            "--data.val_size",
            "100",
            "--model.channels",
            "[8, 16, 16]",
            "--trainer.limit_train_batches",
            "8",
        ]
    )
    assert [run["seed"] for run in entry["runs"]] == [0, 1]
    assert json.loads(results.read_text())["tiny"]["summary"] == entry["summary"]
    assert entry["commit"] == seeds.commit()["commit"] and isinstance(entry["clean"], bool)
    for key in seeds.FIGURES:
        values = [run[key] for run in entry["runs"]]
        assert entry["summary"][key]["min"] == min(values) and 0 <= min(values) <= 100
    text = report.read_text()
    assert f"| tiny | `{entry['commit'][:7]}" in text
    assert "`python cli.py fit --config configs/fast.yaml --data.val_size 100" in text
    assert f"from `{results.resolve()}`" in text  # the note names the file the table came from
    assert "| `default.yaml` |" in readme.read_text()
    for seed in (0, 1):
        assert list((tmp_path / "runs" / f"seed_{seed}").glob("lightning_logs/version_0/checkpoints/best-*.ckpt"))


def test_seeds_table_only_without_a_results_file_says_so(tmp_path, capsys):
    import seeds

    report = tmp_path / "README.md"
    report.write_text(f"{seeds.CONFIGS_START}\nkept\n{seeds.CONFIGS_END}\n")
    with pytest.raises(SystemExit, match="error: no results file to write the table from"):
        seeds.main(["--table-only", "--results", str(tmp_path / "missing.json"), "--report", str(report)])
    assert "kept" in report.read_text()


def row(name: str, val: float, commit: str | None, clean: bool | None = True, device: str = "cpu") -> dict:
    summary = {
        key: {"mean": val, "std": 0.1, "min": val - 0.1}
        for key in ("val_sum_acc", "test_digit_acc", "test_sum_acc_all_pairs", "test_sum_consistency_all_pairs")
    }
    return {
        "command": f"python cli.py fit --name-{name}",
        "seeds": [0, 1, 2],
        "date": "2026-12-03",
        "commit": commit,
        "clean": clean,
        "machine": {"cpu": "X", "cores": 2, "device": device},
        "runs": [],
        "summary": {**summary, "fit_seconds": {"mean": 100.0, "std": 1.0, "min": 99.0}},
    }


def test_the_record_gives_every_row_its_commit_and_the_readme_only_shipped_configs():
    import seeds

    rows = {
        "default": row("d", 99.6, "a" * 40),
        "old": row("o", 99.1, None, None),
        "dirty": row("x", 99.2, "b" * 40, clean=False),
        "fast": row("f", 98.9, "c" * 40),
    }
    record = seeds.table(rows, "seeds.json")
    assert "| default | `aaaaaaa` | `python cli.py fit --name-d` | 0, 1, 2 | 99.60 ± 0.10 (min 99.50)" in record
    assert "| old | commit unknown |" in record and "| dirty | `bbbbbbb` + |" in record
    configs = seeds.configs_table(
        rows,
        {"gpu.yaml": row("g", 99.5, "d" * 40, device="NVIDIA H200")},
        {"samples_to_99": 22656, "cpu_seconds_to_99": 14.3, "machine": {"cores": 2}},
    )
    names = re.findall(r"^\| `(\w+)\.yaml` \| ([^|]+) \|", configs, re.M)
    assert [n for n, _ in names] == seeds.SHIPPED  # every shipped config, and no experiment row
    assert all(purpose.strip() for _, purpose in names)
    assert "| 99 s (NVIDIA H200) | 99.50" in configs and "within 22,656 samples" in configs  # the fastest seed
    assert "| `ddp.yaml` | Several GPUs" in configs and "not measured" in configs


def test_gpu_report_collects_each_step_into_results_and_its_table(tmp_path, monkeypatch):
    from benchmarks import gpu_report

    out = tmp_path / "gpu"
    (out / "fit" / "lightning_logs" / "version_0").mkdir(parents=True)
    (out / "fit" / "lightning_logs" / "version_0" / "results.json").write_text(
        json.dumps(
            {"fit_seconds": 31.4, "test/digit_acc": 0.9952, "test/sum_acc": 0.9956, "test/sum_acc_all_pairs": 0.99547}
        )
    )
    (out / "fit_wall_seconds").write_text("53\n")
    (out / "bench.json").write_text(
        json.dumps(
            {
                "machine": {"device": "Some GPU", "torch": "2.x"},
                "samples_to_99": 102400,
                "gpu_seconds_to_99": 4.25,
                "lightning_vs_torch_throughput_ratio": 1.127,
                "predict_images_per_second": 45553,
            }
        )
    )
    for name, speed in [("gpu.yaml", 25525.7), ("on_device false", 23936.6)]:
        throughput = {"throughput": {"lightning": {"samples_per_second": speed}}}
        (out / f"throughput {name}.json").write_text(json.dumps(throughput))
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "results.json").write_text(json.dumps({"samples_to_99": 24960}))
    (tmp_path / "BENCHMARKS.md").write_text(f"# B\n\n{gpu_report.START}\nold\n{gpu_report.END}\n\nrest\n")
    monkeypatch.setattr(gpu_report, "ROOT", tmp_path)
    gpu_report.main(out)
    results = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    assert results["samples_to_99"] == 24960  # the CPU figures stay beside the new "gpu" entry
    assert results["gpu"]["fit_wall_seconds"] == 53 and results["gpu"]["test_sum_acc_all_pairs"] == 0.99547
    assert results["gpu"]["lightning_samples_per_second"] == {"gpu.yaml": 25525.7, "on_device false": 23936.6}
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "old" not in text and text.endswith("\n\nrest\n") and "on Some GPU" in text
    assert "| its test digit accuracy | 99.52 % | >= 99.6 % |" in text
    assert "| training samples/s, gpu.yaml | 25526 | |" in text
    assert "| training samples/s, on_device false | 23937 | |" in text


def test_two_backward_passes_differ_from_one_by_rounding_only():
    """The step's two backward passes give the gradients of one backward pass of `loss` (to float64's rounding);
    the measure sees a different objective, the sum loss weighted twice."""
    torch.manual_seed(0)
    model = MNISTAdder(channels=(4, 8, 8), number_features=8, hidden=16, agreement=3.0, label_smoothing=0.1)
    batches = two_backward.random_batches(2, 16, dtype=torch.float64)
    assert two_backward.gradient_difference(model.double(), batches)["relative"] < 1e-12

    def sum_loss_twice(model, losses):
        return [losses.digit_loss, 2 * weighted_sum_loss(losses.sum_loss, losses.agreement, 1.0)]

    assert two_backward.gradient_difference(model, batches, sum_loss_twice)["relative"] > 0.01


def test_two_backward_writes_its_table_between_the_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{two_backward.START}\nold figures\n{two_backward.END}\n\nrest\n")
    figures = two_backward.main(
        ["--batch-size", "4", "--batches", "1", "--rounds", "1", "--steps", "1", "--readme", str(readme)]
    )
    two, one = (figures["per_round"][name][0] for name in two_backward.WAYS)
    assert figures["ratio"] == two / one
    text = readme.read_text()
    assert text.startswith(f"# Title\n\n{two_backward.START}\nMeasured with `python benchmarks/two_backward.py --batch")
    assert text.endswith(f"\n{two_backward.END}\n\nrest\n") and "old figures" not in text
    assert f"| {1000 * two:.1f} | {1000 * one:.1f} |" in text and f"| {two / one:.3f} | 1 |" in text
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text(f"# Other\n\n{two_backward.START}\n")  # no end marker
    assert not two_backward.write_between_markers(unmarked, "table")
    assert unmarked.read_text() == f"# Other\n\n{two_backward.START}\n"
