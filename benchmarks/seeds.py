"""Results over seeds: `python benchmarks/seeds.py --config configs/default.yaml --seeds 0 1 2`.

Trains the config once per seed (`python cli.py fit`, each run in a fresh folder), reads the figures
that run wrote (`results.json`: the checkpoint chosen on validation, then tested on the official test
set), and stores them with their mean, standard deviation and minimum under the config's name in
benchmarks/seeds.json, with the commit they ran on; then rewrites the record (docs/experiments.md, every
row) and the README's table of the shipped configs. Options not listed in `--help` (e.g.
`--trainer.max_epochs 9`) go to every run, as on `cli.py`'s command line.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import ROOT, machine, write_report

SHIPPED = ["default", "fast", "to_99", "best", "gpu", "ddp"]  # the README's table of configs, in this order
CONFIGS_START, CONFIGS_END = "<!-- configs:table:start -->", "<!-- configs:table:end -->"
# (key in seeds.json, key in a run's results.json): accuracies in percent
FIGURES = {
    "val_sum_acc": "val/sum_acc_best",
    "test_digit_acc": "test/digit_acc",
    "test_sum_acc_all_pairs": "test/sum_acc_all_pairs",
    "test_sum_consistency_all_pairs": "test/sum_consistency_all_pairs",
}
# Figures of the runs whose results.json has them (calibration came later): each head's test ECE, without and with
# the temperatures.
CALIBRATION = {
    f"test_{head}_ece{suffix}": f"test/{head}_ece{suffix}"
    for head in ("digit", "sum")
    for suffix in ("_uncalibrated", "")
}


def train(config: str, seed: int, extra: list[str], data_dir: Path, keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        root = (keep / f"seed_{seed}").resolve() if keep else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            str(ROOT / "cli.py"),
            "fit",
            "--config",
            str(ROOT / config),
            "--seed_everything",
            str(seed),
            "--trainer.default_root_dir",
            str(root),
            "--data.data_dir",
            str(data_dir),
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
        load = os.getloadavg()[0]
        done = subprocess.run(command, cwd=root, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"error: seed {seed} failed (exit {done.returncode}): {' '.join(command)}")
        results = json.loads(max(root.glob("lightning_logs/version_*/results.json"), key=os.path.getmtime).read_text())
    run = {
        "seed": seed,
        **{key: round(100 * results[source], 3) for key, source in FIGURES.items()},
        **{key: round(100 * results[source], 3) for key, source in CALIBRATION.items() if source in results},
        "fit_seconds": results["fit_seconds"],
        "load_average_before": round(load, 2),
    }
    print(f"  seed {seed}: " + ", ".join(f"{k} {v}" for k, v in run.items() if k != "seed"), flush=True)
    return run


def summarise(runs: list[dict]) -> dict:
    return {
        key: {
            "mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "min": round(min(values), 3),
        }
        for key in [*FIGURES, *CALIBRATION, "fit_seconds"]
        for values in [[run[key] for run in runs if key in run]]
        if len(values) == len(runs)
    }


def commit() -> dict:
    """The commit this checkout is at, and whether the tree differs from it (then the row is not exactly it)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "clean": not git("status", "--porcelain")}


def cell(summary: dict, key: str) -> str:
    s = summary[key]
    return f"{s['mean']:.2f} ± {s['std']:.2f} (min {s['min']:.2f})"


def table(configs: dict, source: str) -> str:
    """Every row, with the commit it ran on: `git checkout COMMIT`, then the row's command reproduces it."""
    lines = [
        "| name | commit | command | seeds | val sum | test digit | test sum, all pairs | sum = digit + number | fit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in configs.items():
        s, sha = entry["summary"], entry.get("commit")
        where = "commit unknown" if not sha else f"`{sha[:7]}`" + ("" if entry.get("clean") is not False else " +")
        lines.append(
            f"| {name} | {where} | `{entry['command']}` | {', '.join(map(str, entry['seeds']))} | "
            f"{cell(s, 'val_sum_acc')} | {cell(s, 'test_digit_acc')} | {cell(s, 'test_sum_acc_all_pairs')} | "
            f"{cell(s, 'test_sum_consistency_all_pairs')} | {s['fit_seconds']['mean']:.0f} s |"
        )
    machines = sorted(
        {f"{e['machine'].get('cpu', '?')}, {e['machine'].get('cores', '?')} cores" for e in configs.values()}
    )
    dates = sorted({entry["date"] for entry in configs.values()})
    return "\n".join(
        [
            *lines,
            "",
            f"Accuracies in %, mean ± standard deviation (minimum) over the seeds; fit: mean "
            f"seconds of `fit` (training and validation), which drift with the machine's speed. A `+` after "
            f"the commit: the tree had uncommitted changes. Written by `benchmarks/seeds.py` from "
            f"`{source}` ({dates[0] if dates else ''} to {dates[-1] if dates else ''}; "
            f"{'; '.join(machines)}).",
            *calibration_table(configs),
        ]
    )


def calibration_table(configs: dict) -> list[str]:
    """The rows whose runs report the calibration error: each head's, without -> with the temperatures."""
    calibrated = {name: entry for name, entry in configs.items() if "test_digit_ece" in entry["summary"]}
    lines = [
        "",
        "Expected calibration error on the test set (15 bins, top label), in %, mean ± standard deviation (minimum)"
        " over the seeds, without -> with the temperatures fitted on validation:",
        "",
        "| name | commit | seeds | digit | sum |",
        "|---|---|---|---|---|",
    ]
    for name, entry in calibrated.items():
        s = entry["summary"]
        heads = [
            f"{cell(s, f'test_{head}_ece_uncalibrated')} -> {cell(s, f'test_{head}_ece')}" for head in ("digit", "sum")
        ]
        lines.append(
            f"| {name} | `{entry['commit'][:7]}` | {', '.join(map(str, entry['seeds']))} | {' | '.join(heads)} |"
        )
    return lines if calibrated else []


def purpose(config: Path) -> str:
    """A config's first comment line: what it is for."""
    return config.read_text().splitlines()[0].lstrip("# ").rstrip(".")


def configs_table(seeds: dict, gpu_seeds: dict, results: dict) -> str:
    """The shipped configs: what each is for, and its figures from the rows measured on it as it ships."""
    lines = ["| config | for | fit time | val sum | test digit | test sum, all pairs |", "|---|---|---|---|---|---|"]
    for config in (ROOT / "configs" / f"{name}.yaml" for name in SHIPPED):
        entry = seeds.get(config.stem) or gpu_seeds.get(config.name)
        if entry:
            s, m = entry["summary"], entry["machine"]
            where = f"{m.get('cores', '?')} CPU cores" if m.get("device") == "cpu" else m.get("device", "?")
            figures = [
                f"{s['fit_seconds']['min']:.0f} s ({where})",
                *(cell(s, key) for key in ("val_sum_acc", "test_digit_acc", "test_sum_acc_all_pairs")),
            ]
        elif config.stem == "to_99" and "samples_to_99" in results:
            figures = [
                f"{results['cpu_seconds_to_99']} s to 99 % ({results['machine']['cores']} CPU cores)",
                f"99 % on both heads within {results['samples_to_99']:,} samples (worst seed, BENCHMARKS.md)",
                "",
                "",
            ]
        else:
            figures = ["not measured", "", "", ""]
        lines.append(f"| `{config.name}` | {purpose(config)} | " + " | ".join(figures) + " |")
    return "\n".join(
        [
            *lines,
            "",
            "Fit time: the fastest seed's (a busy machine slows the others). "
            "Accuracies in %, mean ± standard deviation (minimum) over seeds 0, 1 and 2; "
            "written by `benchmarks/seeds.py` from `benchmarks/seeds.json`, `benchmarks/gpu_seeds.json` and "
            "`benchmarks/results.json`; every other experiment is in "
            "[docs/experiments.md](docs/experiments.md).",
        ]
    )


def markers(results: Path) -> tuple[str, str]:
    """Each results file has its own table in the record: seeds.json between the `seeds:table` markers."""
    return f"<!-- {results.stem}:table:start -->", f"<!-- {results.stem}:table:end -->"


def write_tables(results: Path, report: Path, readme: Path) -> None:
    stored = json.loads(results.read_text())
    write_report(report, table(stored, shown(results)), *markers(results))
    bench = ROOT / "benchmarks"
    if readme is not None:
        write_report(
            readme,
            configs_table(
                *(json.loads((bench / name).read_text()) for name in ("seeds.json", "gpu_seeds.json", "results.json"))
            ),
            CONFIGS_START,
            CONFIGS_END,
        )


def shown(path: Path) -> str:
    """The results file as the table's note names it: repository-relative where it can be."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml", help="the config to train (repository-relative)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", help="its name in seeds.json and the table (default: the config's file name)")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep each run (checkpoints, TensorBoard logs) in KEEP/seed_N: a new KEEP for each config",
    )
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "seeds.json")
    parser.add_argument(
        "--report", type=Path, default=ROOT / "docs" / "experiments.md", help="where the table of every row goes"
    )
    parser.add_argument(
        "--readme", type=Path, default=ROOT / "README.md", help="where the table of the shipped configs goes"
    )
    parser.add_argument("--table-only", action="store_true", help="only rewrite the tables from the results files")
    args, extra = parser.parse_known_args(argv)
    if args.table_only:
        if not args.results.is_file():
            sys.exit(f"error: no results file to write the table from: {args.results}")
        write_tables(args.results, args.report, args.readme)
        return {}
    if not (ROOT / args.config).is_file():
        sys.exit(f"error: no such config: {args.config}")
    name = args.name or Path(args.config).stem
    command = shlex.join(
        [
            "python",
            "cli.py",
            "fit",
            *([] if args.config == "configs/default.yaml" else ["--config", args.config]),
            *extra,
        ]
    )
    source = commit()  # before the runs: the code they train with
    print(f"{name}: {command}, seeds {' '.join(map(str, args.seeds))}", flush=True)
    runs = [train(args.config, seed, extra, args.data_dir.resolve(), args.keep) for seed in args.seeds]
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    stored[name] = {
        "command": command,
        "config": args.config,
        "extra": extra,
        "seeds": args.seeds,
        "date": time.strftime("%Y-%m-%d"),
        **source,
        "machine": machine("gpu" if torch.cuda.is_available() else "cpu"),
        "runs": runs,
        "summary": summarise(runs),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(stored, indent=2) + "\n")
    write_tables(args.results, args.report, args.readme)
    print("\n" + table(stored, shown(args.results)))
    return stored[name]


if __name__ == "__main__":
    main()
