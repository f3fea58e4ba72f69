"""Benchmarks on this machine's CPU: `python benchmarks/bench.py` (about 13 minutes on two cores;
`--quick` for a shorter, rougher look). Prints a table, rewrites the table in BENCHMARKS.md and writes
benchmarks/results.json. Options not listed in `--help` (e.g. `--data.val_size 100`) are passed
to every run's configuration, as on `cli.py`'s command line.
"""

import argparse
import collections
import contextlib
import functools
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import to_99  # noqa: E402
from cli import cli_main  # noqa: E402
from datamodule import MNISTAdderData  # noqa: E402
from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.model.losses import weighted_sum_loss  # noqa: E402
from mnist_adder.run.checkpoints import AtomicCheckpointIO  # noqa: E402

START, END = "<!-- bench:table:start -->", "<!-- bench:table:end -->"
FIGURES = {
    "lightning_vs_torch_throughput_ratio": (">= 0.95", lambda v: v >= 0.95),
    "samples_to_99": ("<= 25000", lambda v: v is not None and v <= 25_000),
    "cpu_seconds_to_99": ("<= 15", lambda v: v is not None and v <= 15),
    "gpu_seconds_to_99": ("<= 3", lambda v: v is not None and v <= 3),
    "val_samples_to_99": ("", None),
    "prepare_seconds_cached": ("< 1", lambda v: v < 1),
    "predict_images_per_second": ("", None),
    "ops_per_training_step": ("", None),
    "fit_seconds_outside_training": ("", None),
}


def build(extra: list[str], *configs: str):
    """The model, data module and trainer exactly as `cli.py` builds them from these configs."""
    return cli_main([arg for config in configs for arg in ("--config", str(ROOT / config))] + extra, run=False)


def prepared(extra: list[str], config: str):
    """The config's objects, with the training data set up for the config's trainer (so, with
    `data.on_device`, on its device, and pinned only where the batches travel to a GPU)."""
    cli = build(extra, config)
    if str(cli.trainer.precision) not in ("32-true", "bf16-mixed"):  # what `plain_steps` can do as Lightning does
        sys.exit(
            f"error: the plain loop does what Lightning does for precision 32-true and bf16-mixed only, "
            f"not {cli.trainer.precision}"
        )
    cli.datamodule.trainer = cli.trainer
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    return cli


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_steps(model, data, epoch: int, total: int, device: torch.device, precision: str):
    """The same step as `MNISTAdder.training_step` (two backward passes, one optimizer step, the
    scheduler stepped per batch) in a plain loop over the same loader, without metrics or logging;
    yields after each of `total` steps."""
    net = model.net.to(device)
    optimizer = model.optimizer(net.parameters())
    scheduler = model.scheduler(optimizer, total_steps=total)
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    net.train()
    for batch in itertools.islice(loader, total):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        images = data.augment(batch["image"], data.train_set.augment_generator)  # as Lightning: before autocast
        with torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=str(precision) == "bf16-mixed", cache_enabled=False
        ):
            losses = model.losses(net(images, batch["number"]), batch)
        optimizer.zero_grad(set_to_none=True)
        losses.digit_loss.backward(retain_graph=True)
        weighted_sum_loss(losses.sum_loss, losses.agreement, model.sum_loss_weight).backward()
        optimizer.step()
        scheduler.step()
        yield


class InLockstep(Callback):
    """Runs one plain step after each Lightning training step, so that the two alternate step by step
    and the machine's drifting speed weighs on both alike. Lightning's time is everything between the
    end of one plain step and the start of the next (its loop, hooks, logging and batch fetching
    included); both clocks start after `warmup` + 1 steps each. On a GPU each step then waits for the
    device, so neither loop overlaps its Python with queued GPU work, as both would in a real run."""

    def __init__(self, plain, warmup: int, device: torch.device):
        self.plain, self.warmup, self.device = plain, warmup, device
        self.seconds = {"lightning": 0.0, "torch": 0.0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(self.device)
        start = time.perf_counter()
        if batch_idx > self.warmup:
            self.seconds["lightning"] += start - self.resumed
        next(self.plain)
        synchronize(self.device)
        self.resumed = time.perf_counter()
        if batch_idx > self.warmup:
            self.seconds["torch"] += self.resumed - start


def lockstep_seconds(lit, plain, warmup: int, steps: int, epoch: int, log_dir: str, accelerator: str) -> dict:
    """A Lightning fit of `lit`'s model and the plain loop on `plain`'s, in lockstep: each one's seconds
    for `steps` steps after `warmup` + 1 untimed ones."""
    device = device_of(accelerator)
    precision = lit.trainer.precision
    lockstep = InLockstep(
        plain_steps(plain.model, plain.datamodule, epoch, warmup + steps + 1, device, precision), warmup, device
    )
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=warmup + steps + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
        logger=TensorBoardLogger(log_dir),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[lockstep],
    )
    trainer.fit(lit.model, datamodule=lit.datamodule)
    return lockstep.seconds


def throughput_ratio(extra: list[str], config: str, rounds: int, warmup: int, steps: int, accelerator: str) -> dict:
    """Lightning fit and the plain loop, each on its own copy of the config's model, in lockstep (one step
    of each in turn); the ratio of their times in each round, and the median over the rounds."""
    lit, plain = prepared(extra, config), prepared(extra, config)
    if warmup + steps + 1 > len(plain.datamodule.train_dataloader()):
        sys.exit(f"error: --warmup + --steps + 1 ({warmup + steps + 1}) exceeds the batches in one epoch")
    batch_size = plain.datamodule.hparams.batch_size
    times = {"lightning": [], "torch": []}
    with tempfile.TemporaryDirectory() as log_dir:
        for r in range(rounds):
            seconds = lockstep_seconds(lit, plain, warmup, steps, r, log_dir, accelerator)
            for kind, value in seconds.items():
                times[kind].append(value)
            rates = "  ".join(f"{kind} {steps * batch_size / value:6.0f}" for kind, value in seconds.items())
            print(f"  round {r + 1}/{rounds}  {rates} samples/s", flush=True)
    ratios = [
        torch_time / lightning_time
        for torch_time, lightning_time in zip(times["torch"], times["lightning"], strict=True)
    ]
    return {
        "lightning_vs_torch_throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratio_per_round": [round(r, 3) for r in ratios],
        "throughput": {
            kind: {"samples_per_second": round(steps * rounds * batch_size / sum(t), 1), "seconds_per_round": t}
            for kind, t in times.items()
        },
        "throughput_setup": {
            "rounds": rounds,
            "warmup_steps": warmup,
            "timed_steps": steps,
            "batch_size": batch_size,
            "precision": str(lit.trainer.precision),
        },
    }


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, by name: on a GPU the host pays for each, and
    each but a view launches one kernel or more."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class CountOps(Callback):
    """An OpCounter around each training step of batches `first` to `last`: from on_train_batch_start to
    on_train_batch_end, the training_step as Lightning runs it (the augmentation, in on_after_batch_transfer, is
    before)."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.counter = first, last, OpCounter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first <= batch_idx <= self.last:
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.first <= batch_idx <= self.last:
            self.counter.__exit__(None, None, None)


def ops_per_training_step(extra: list[str], config: str, accelerator: str, warmup: int = 3, steps: int = 5) -> dict:
    """The aten operations dispatched per training step, the mean of `steps` steps after `warmup` ones of a fit of
    the config's model at its batch size, and the most frequent ones. One more step follows: the epoch's last step
    is not counted, nor one whose figures the logger writes (0, 50, ...)."""
    cli = prepared(extra, config)
    counting = CountOps(warmup, warmup + steps - 1)
    L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=cli.trainer.precision,
        max_epochs=1,
        limit_train_batches=warmup + steps + 1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counting],
    ).fit(cli.model, datamodule=cli.datamodule)
    ops = counting.counter.ops
    return {
        "ops_per_training_step": round(sum(ops.values()) / steps, 1),
        "ops_per_training_step_most": {name: count / steps for name, count in ops.most_common(12)},
        "ops_setup": {"config": config, "batch_size": cli.datamodule.hparams.batch_size, "steps": steps},
    }


class Stopwatch:
    """Seconds per label of what it times, each interval's own: one started within another counts for its label
    only (exclusive times, which add up to the time spent in timed intervals)."""

    def __init__(self):
        self.seconds, self._open = collections.Counter(), []  # the open intervals: [label, start, inner seconds]

    def start(self, label: str) -> None:
        self._open.append([label, time.perf_counter(), 0.0])

    def stop(self) -> None:
        label, start, inner = self._open.pop()
        spent = time.perf_counter() - start
        self.seconds[label] += spent - inner
        if self._open:
            self._open[-1][2] += spent

    def wrapped(self, function, label: str):
        """`function`, each call timed under `label`."""

        @functools.wraps(function)
        def timed(*args, **kwargs):
            self.start(label)
            try:
                return function(*args, **kwargs)
            finally:
                self.stop()

        return timed


class LoopTimes(Callback):
    """The loops of a fit and its test, timed through Lightning's hooks: training (steps, fetching and the loop's
    own work), the sanity check, validation, and the test's steps per loader apart from the rest of its loop."""

    def __init__(self, watch: Stopwatch):
        self.watch = watch

    def on_train_start(self, *_):
        self.watch.start("training steps (and Lightning's loop)")

    def on_sanity_check_start(self, *_):
        self.watch.start("sanity check")

    def on_validation_start(self, trainer, *_):
        if not trainer.sanity_checking:
            self.watch.start("validation")

    def on_validation_end(self, trainer, *_):
        if not trainer.sanity_checking:
            self.watch.stop()

    def on_test_start(self, *_):
        self.watch.start("test loop")

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.watch.start(f"test loader {dataloader_idx}: steps")

    def _stop(self, *_, **__):
        self.watch.stop()

    on_train_end = on_sanity_check_end = on_test_end = on_test_batch_end = _stop


# Where `fit` spends its time, besides LoopTimes: (owner, method, label); each method's own time goes to its label.
FIT_PARTS = [
    (LightningCLI, "parse_arguments", "parse the command line and configs"),
    (LightningCLI, "instantiate_classes", "build the model, data module and trainer"),
    (MNISTAdderData, "prepare_data", "prepare_data: MD5 of the four files"),
    (MNISTAdderData, "setup", "setup: read, split and pair MNIST, draw the non-digits"),
    (L.Trainer, "save_checkpoint", "checkpoint writes"),
    (AtomicCheckpointIO, "save_checkpoint", "checkpoint writes"),
    (AtomicCheckpointIO, "load_checkpoint", "checkpoint loads"),
    (L.Trainer, "test", "test: setup (data, best checkpoint)"),
]


def startup_split(extra: list[str], config: str) -> dict:
    """Where the seconds of `python cli.py fit --config CONFIG` go: the imports (a fresh interpreter importing
    cli.py), then a fit run in this process with each part of FIT_PARTS timed; "other" is the rest."""
    command = [sys.executable, "-c", "import time; t = time.perf_counter(); import cli; print(time.perf_counter() - t)"]
    imports = float(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    watch = Stopwatch()
    with tempfile.TemporaryDirectory() as root, contextlib.ExitStack() as patches:
        for owner, name, label in FIT_PARTS:
            patches.enter_context(mock.patch.object(owner, name, watch.wrapped(getattr(owner, name), label)))
        patches.enter_context(mock.patch.object(MNISTAdder, "configure_callbacks", lambda _: [LoopTimes(watch)]))
        start = time.perf_counter()
        cli_main(["fit", "--config", str(ROOT / config), f"--trainer.default_root_dir={root}", *extra])
        total = time.perf_counter() - start
    parts = {"imports": imports, **watch.seconds, "other": total - sum(watch.seconds.values())}
    steps = watch.seconds["training steps (and Lightning's loop)"]
    return {
        "fit_seconds_outside_training": round(imports + total - steps, 1),
        "fit_seconds_split": {label: round(seconds, 2) for label, seconds in parts.items()},
        "fit_split_command": f"python cli.py fit --config {config} {' '.join(extra)}".strip(),
    }


def to_99_over_seeds(
    extra: list[str], config: str, every: int, seeds: list[int], accelerator: str
) -> tuple[dict, object]:
    """For each seed, `to_99.run_to_99`, then the seconds to its step to 99 % from `to_99.seconds_to_step`;
    the per-seed figures, and the worst, which the targets are about."""
    runs = {}
    for seed in seeds:
        print(f"  seed {seed}", flush=True)
        with tempfile.TemporaryDirectory() as root:
            args = [
                f"--trainer.default_root_dir={root}",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--trainer.accelerator={accelerator}",
                f"--seed_everything={seed}",
                *extra,
            ]
            runs[str(seed)] = run = to_99.run_to_99(cli := build(args, config), every)
            run["seconds_to_99"] = None
            if run["step_to_99"] is not None:
                print(f"  seed {seed} again, checked at step {run['step_to_99']} only, for the seconds", flush=True)
                run["timed_check"] = timed = to_99.seconds_to_step(build(args, config), run["step_to_99"])
                if min(timed["test_digit_acc"], timed["test_sum_acc"]) >= to_99.TARGET:  # the same run again
                    run["seconds_to_99"] = timed["seconds"]
                else:  # e.g. nondeterministic GPU kernels
                    print(
                        f"  seed {seed}: the second run is below {to_99.TARGET:.0%} at that step: no seconds",
                        flush=True,
                    )

    def worst(key):
        values = [run[key] for run in runs.values()]
        return None if None in values else max(values)

    return {
        "samples_to_99": worst("samples_to_99"),
        "seconds_to_99": worst("seconds_to_99"),
        "val_samples_to_99": worst("val_samples_to_99"),
        "to_99_config": config,
        "to_99_runs": runs,
    }, cli


def prepare_seconds(extra: list[str], repeats: int) -> dict:
    hparams = {k: v for k, v in build(extra).datamodule.hparams.items() if not k.startswith("_")}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data = MNISTAdderData(**hparams)
        data.prepare_data()
        data.setup("fit")
        times.append(time.perf_counter() - start)
    return {"prepare_seconds_cached": round(statistics.median(times), 3), "prepare_seconds_each": times}


@torch.inference_mode()
def predict_throughput(model, data, repeats: int) -> dict:
    model.eval()
    batch = data.test_set.__getitems__(list(range(len(data.test_set))))
    images, numbers = batch["image"].to(model.device), batch["number"].to(model.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), 1000):
            model(images[i : i + 1000], numbers[i : i + 1000])
        synchronize(model.device)
        times.append(time.perf_counter() - start)
    return {"predict_images_per_second": round(len(images) / statistics.median(times)), "predict_batch_size": 1000}


def device_of(accelerator: str) -> torch.device:
    return torch.device("cuda" if accelerator in ("gpu", "cuda") else "cpu")


def machine(accelerator: str = "cpu") -> dict:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if device_of(accelerator).type == "cuda" else "cpu",
    }


def table(results: dict) -> str:
    m = results["machine"]
    lines = [
        (
            f"Measured {results['date']} with `{results['command']}` on {m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']}, lightning {m['lightning']}, device {m['device']}."
        ),
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, (target, ok) in FIGURES.items():
        if key not in results:
            continue
        value = results[key]
        lines.append(
            f"| `{key}` | {'not reached' if value is None else value} | {target} | "
            f"{'' if ok is None else 'yes' if ok(value) else 'no'} |"
        )
    return "\n".join(lines)


def write_report(report: Path, text: str, start: str = START, end: str = END) -> None:
    """Replace what stands between the markers `start` and `end` in `report` with `text`."""
    old = report.read_text() if report.exists() else f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in old or end not in old:
        sys.exit(f"error: {report} lacks the markers {start} and {end} around its table")
    head, rest = old.split(start, 1)
    report.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 rounds of 20 steps instead of 20 of 50")
    parser.add_argument("--rounds", type=int, help="throughput rounds, one fit each (default 20; quick 4)")
    parser.add_argument(
        "--steps",
        type=int,
        help="timed steps per round (default 50, so that Lightning's "
        "logger writes once in each, as every 50 steps in a run; quick 20)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    parser.add_argument(
        "--check-every",
        type=int,
        default=12,
        help="steps between the time-to-99 test checks (384 samples at to_99.yaml's batch 32)",
    )
    parser.add_argument("--config", default="configs/to_99.yaml", help="the time-to-99 run's config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the time-to-99 runs' seeds")
    parser.add_argument("--throughput-config", default="configs/default.yaml", help="the throughput runs' config")
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="where every figure is measured")
    parser.add_argument(
        "--only",
        choices=["throughput", "to_99", "ops", "startup"],
        help="measure only this (startup: where the seconds of a fit with --startup-config go; only so)",
    )
    parser.add_argument("--startup-config", default="configs/fast.yaml", help="the fit that --only startup splits")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md")
    args, extra = parser.parse_known_args(argv)
    if any(n is not None and n < 1 for n in (args.rounds, args.steps, args.check_every)) or args.warmup < 0:
        parser.error("--rounds, --steps and --check-every must be >= 1, --warmup >= 0")
    # many short rounds: the machine's speed drifts less within a round, and the median ignores rounds where it did
    rounds = args.rounds or (4 if args.quick else 20)
    steps = args.steps or (20 if args.quick else 50)
    command = " ".join(["python benchmarks/bench.py", *(argv or sys.argv[1:])])
    results = {"date": time.strftime("%Y-%m-%d"), "command": command, "machine": machine(args.accelerator)}
    if args.only is None:
        print("Data preparation with the files in place", flush=True)
        results.update(prepare_seconds(extra, 3 if args.quick else 5))
    if args.only in (None, "ops"):
        print("aten operations per training step", flush=True)
        results.update(ops_per_training_step(extra, args.throughput_config, args.accelerator))
    if args.only == "startup":
        print(f"Where the seconds of a fit with {args.startup_config} go", flush=True)
        results.update(startup_split(extra, args.startup_config))
    if args.only in (None, "throughput"):
        print(f"Lightning fit against a plain PyTorch loop, {rounds} rounds of {steps} steps", flush=True)
        results.update(throughput_ratio(extra, args.throughput_config, rounds, args.warmup, steps, args.accelerator))
    if args.only in (None, "to_99"):
        print(f"Samples and time to 99 % on both heads with {args.config}", flush=True)
        to_99_figures, cli = to_99_over_seeds(extra, args.config, args.check_every, args.seeds, args.accelerator)
        results.update(to_99_figures)
        device = device_of(args.accelerator).type.replace("cuda", "gpu")
        results[f"{device}_seconds_to_99"] = results.pop("seconds_to_99")
    if args.only is None:
        print("Batched inference", flush=True)
        results.update(predict_throughput(cli.model, cli.datamodule, 3))
    text = table(results)
    print("\n" + text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    write_report(args.report, text)
    print(f"\nwritten: {args.results}, {args.report}")
    return results


if __name__ == "__main__":
    for name in ("lightning.pytorch", "lightning.fabric"):  # only this script's progress lines and warnings
        logging.getLogger(name).setLevel(logging.WARNING)
    main()
