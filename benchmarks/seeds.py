"""Results over seeds: `python benchmarks/seeds.py --config configs/default.yaml --seeds 0 1 2`.

Trains the config once per seed (`python cli.py fit`, each run in a fresh folder), reads the figures
that run wrote (`results.json`: the checkpoint chosen on validation, then tested on the official test
set), and stores them with their mean, standard deviation and minimum under the config's name in
benchmarks/seeds.json; then rewrites the README's results table from that file. Options not listed in
`--help` (e.g. `--trainer.max_epochs 9`) go to every run, as on `cli.py`'s command line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ROOT, machine, write_report

START, END = "<!-- seeds:table:start -->", "<!-- seeds:table:end -->"
# (key in seeds.json, key in a run's results.json): accuracies in percent
FIGURES = {"val_sum_acc": "val_sum_acc", "test_digit_acc": "test/digit_acc",
           "test_sum_acc_all_pairs": "test/sum_acc_all_pairs",
           "test_sum_consistency_all_pairs": "test/sum_consistency_all_pairs"}


def train(config: str, seed: int, extra: list[str], data_dir: Path, keep: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        root = (keep / f"seed_{seed}").resolve() if keep else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / config),
                   "--seed_everything", str(seed), "--trainer.default_root_dir", str(root),
                   "--data.data_dir", str(data_dir), "--trainer.enable_progress_bar", "false", *extra]
        load = os.getloadavg()[0]
        done = subprocess.run(command, cwd=root, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            sys.exit(f"error: seed {seed} failed (exit {done.returncode}): {' '.join(command)}")
        results = json.loads(max(root.glob("lightning_logs/version_*/results.json"), key=os.path.getmtime).read_text())
    run = {"seed": seed, **{key: round(100 * results[source], 3) for key, source in FIGURES.items()},
           "fit_seconds": results["fit_seconds"], "load_average_before": round(load, 2)}
    print(f"  seed {seed}: " + ", ".join(f"{k} {v}" for k, v in run.items() if k != "seed"), flush=True)
    return run


def summarise(runs: list[dict]) -> dict:
    return {key: {"mean": round(statistics.fmean(values), 3),
                  "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
                  "min": round(min(values), 3)}
            for key in [*FIGURES, "fit_seconds"] for values in [[run[key] for run in runs]]}


def table(configs: dict, source: str) -> str:
    lines = ["| name | command | seeds | val sum | test digit | test sum, all pairs | sum = digit + number "
             "| fit | load |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in configs.items():
        s = entry["summary"]

        def cell(key):
            return f"{s[key]['mean']:.2f} ± {s[key]['std']:.2f} (min {s[key]['min']:.2f})"
        lines.append(f"| {name} | `{entry['command']}` | {', '.join(map(str, entry['seeds']))} | "
                     f"{cell('val_sum_acc')} | {cell('test_digit_acc')} | {cell('test_sum_acc_all_pairs')} | "
                     f"{cell('test_sum_consistency_all_pairs')} | {s['fit_seconds']['mean']:.0f} s | "
                     f"{statistics.fmean(run['load_average_before'] for run in entry['runs']):.1f} |")
    dates = sorted({entry["date"] for entry in configs.values()})
    m = next(iter(configs.values()))["machine"] if configs else {}
    return "\n".join([*lines, "", f"Accuracies in %, mean ± standard deviation (minimum) over the seeds; fit: mean "
                      f"seconds of `fit` (training and validation); load: the machine's 1-minute load average as "
                      f"each run started (the run before keeps it near 2 by itself; higher means other work shared "
                      f"the two cores and slowed the run). Written by `benchmarks/seeds.py` from "
                      f"`{source}` ({', '.join(dates)}; {m.get('cpu', '?')}, {m.get('cores', '?')} "
                      "cores)."])


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
    parser.add_argument("--keep", type=Path, help="keep each run (checkpoints, TensorBoard logs) in KEEP/seed_N: "
                        "a new KEEP for each config")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "seeds.json")
    parser.add_argument("--report", type=Path, default=ROOT / "README.md")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from the results file")
    args, extra = parser.parse_known_args(argv)
    if args.table_only:
        if not args.results.is_file():
            sys.exit(f"error: no results file to write the table from: {args.results}")
        write_report(args.report, table(json.loads(args.results.read_text()), shown(args.results)), START, END)
        return {}
    if not (ROOT / args.config).is_file():
        sys.exit(f"error: no such config: {args.config}")
    name = args.name or Path(args.config).stem
    command = " ".join(["python cli.py fit", *([] if args.config == "configs/default.yaml" else
                                               ["--config", args.config]), *extra])
    print(f"{name}: {command}, seeds {' '.join(map(str, args.seeds))}", flush=True)
    runs = [train(args.config, seed, extra, args.data_dir.resolve(), args.keep) for seed in args.seeds]
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    stored[name] = {"command": command, "config": args.config, "extra": extra, "seeds": args.seeds,
                    "date": time.strftime("%Y-%m-%d"), "machine": machine(), "runs": runs,
                    "summary": summarise(runs)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(stored, indent=2) + "\n")
    text = table(stored, shown(args.results))
    print("\n" + text)
    write_report(args.report, text, START, END)
    return stored[name]


if __name__ == "__main__":
    main()
