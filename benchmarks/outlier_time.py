"""What outlier exposure costs the default run's time: `python benchmarks/outlier_time.py` (about 10 minutes on
two cores).

Short fits of the default run, with outlier exposure (the default) and without it (`--data.non_digits 0
--model.not_digit_weight 0`), in turns, so that the machine's drifting speed weighs on both alike. Each fit's
seconds are split into its setup (MNIST read, the non-digits drawn: everything before the first step) and its
epochs (training and validation, Lightning's `Timer`); the default's full run is estimated as the setup plus
`max_epochs` epochs. Written into docs/experiments.md between the `outlier_time` markers. Options not listed in
`--help` (e.g. `--data.val_size 100`) are passed to every fit's configuration, as on `cli.py`'s command line.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Timer

from bench import ROOT, build, write_report
from seeds import commit

START, END = "<!-- outlier_time:start -->", "<!-- outlier_time:end -->"
WITHOUT = ["--data.non_digits", "0", "--model.not_digit_weight", "0"]


def timed_fit(extra: list[str], epochs: int) -> dict:
    """One fit of `epochs` epochs: its setup seconds, its seconds per epoch and its training steps per epoch."""
    with tempfile.TemporaryDirectory() as folder:
        cli = build(
            [*extra, "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", folder, "--trainer.logger",
             "false", "--trainer.enable_progress_bar", "false"]
        )  # fmt: skip
        timer = Timer()
        cli.trainer.callbacks.append(timer)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        total = time.perf_counter() - start
    seconds = timer.time_elapsed("train")
    return {"setup": total - seconds, "epoch": seconds / epochs, "steps": cli.trainer.num_training_batches}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="fits of each, in turns")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each fit")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "experiments.md")
    args, extra = parser.parse_known_args(argv)
    source = commit()  # before the fits: the code they run
    runs = {"with outlier exposure (default)": [], "without": []}
    for round_ in range(args.rounds):
        for (name, fits), without in zip(runs.items(), ([], WITHOUT)):
            fits.append(timed_fit([*extra, *without], args.epochs))
            print(f"round {round_ + 1}/{args.rounds}, {name}: {fits[-1]['setup']:.1f} s setup, "
                  f"{fits[-1]['epoch']:.1f} s per epoch", flush=True)  # fmt: skip
    epochs = build(extra).trainer.max_epochs
    full = {name: [f["setup"] + epochs * f["epoch"] for f in fits] for name, fits in runs.items()}
    rows = [
        f"| {name} | {fits[0]['steps']} | {statistics.mean(f['setup'] for f in fits):.1f} | "
        f"{statistics.mean(f['epoch'] for f in fits):.1f} | {statistics.mean(full[name]):.0f} |"
        for name, fits in runs.items()
    ]
    ratios = [a / b for a, b in zip(*full.values())]
    at = f"`{source['commit'][:7]}`" + ("" if source["clean"] else " +") if source["commit"] else "an unknown commit"
    text = "\n".join(
        [
            f"| fit | steps an epoch | setup (s) | an epoch (s) | {epochs} epochs, estimated (s) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"With outlier exposure the default run takes {statistics.mean(ratios):.2f} times as long, round by "
            f"round {', '.join(f'{r:.2f}' for r in ratios)}. Fits of {args.epochs} epochs, in turns; each figure the "
            f"mean of {args.rounds}; at commit {at}. Written by `python benchmarks/outlier_time.py`.",
        ]
    )
    print(text)
    write_report(args.report, text, START, END)


if __name__ == "__main__":
    main()
