"""Collects what benchmarks/gpu_check.sh measured into results.json ("gpu") and BENCHMARKS.md (its GPU table)."""

import json
import sys
from pathlib import Path

from bench import ROOT, write_report

START, END = "<!-- gpu:table:start -->", "<!-- gpu:table:end -->"


def main(out: Path) -> None:
    fit = json.loads(next((out / "fit").glob("lightning_logs/version_*/results.json")).read_text())
    bench = json.loads((out / "bench.json").read_text())
    throughput = {
        path.stem.removeprefix("throughput "): json.loads(path.read_text())["throughput"]["lightning"][
            "samples_per_second"
        ]
        for path in sorted(out.glob("throughput *.json"))
    }
    gpu = {
        "machine": bench["machine"],
        "fit_wall_seconds": int((out / "fit_wall_seconds").read_text()),
        "fit_seconds": fit["fit_seconds"],
        "test_digit_acc": fit["test/digit_acc"],
        "test_sum_acc": fit["test/sum_acc"],
        "test_sum_acc_all_pairs": fit["test/sum_acc_all_pairs"],
        **{
            k: bench[k]
            for k in (
                "samples_to_99",
                "gpu_seconds_to_99",
                "lightning_vs_torch_throughput_ratio",
                "predict_images_per_second",
            )
        },
        "lightning_samples_per_second": throughput,
    }
    results_path = ROOT / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results_path.write_text(json.dumps({**results, "gpu": gpu}, indent=2) + "\n")
    lines = [
        f"Measured with `bash benchmarks/gpu_check.sh` on {gpu['machine']['device']} "
        f"(torch {gpu['machine']['torch']}).",
        "",
        "| figure | value | target |",
        "|---|---|---|",
        f"| `python cli.py fit --config configs/gpu.yaml`: wall time | {gpu['fit_wall_seconds']} s | <= 60 s |",
        f"| its test digit accuracy | {100 * gpu['test_digit_acc']:.2f} % | >= 99.6 % |",
        f"| its test sum accuracy, all pairs | {100 * gpu['test_sum_acc_all_pairs']:.2f} % | >= 99.55 % |",
        f"| `gpu_seconds_to_99` (worst of 3 seeds) | {gpu['gpu_seconds_to_99']} | <= 3 |",
        f"| `samples_to_99` (worst of 3 seeds) | {gpu['samples_to_99']} | |",
        f"| `lightning_vs_torch_throughput_ratio` | {gpu['lightning_vs_torch_throughput_ratio']} | >= 0.95 |",
        f"| `predict_images_per_second` | {gpu['predict_images_per_second']} | |",
    ]
    lines += [f"| training samples/s, {name} | {value:.0f} | |" for name, value in throughput.items()]
    write_report(ROOT / "BENCHMARKS.md", "\n".join(lines), START, END)
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
