"""Benchmarks on this machine's CPU: `python benchmarks/bench.py` (about 3 minutes on two cores;
`--quick` for a shorter, rougher look). Prints a table, rewrites the table in BENCHMARKS.md and writes
benchmarks/results.json. Options not listed in `--help` (e.g. `--data.val_size 100`) are passed
to every run's configuration, as on `cli.py`'s command line.
"""

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import cli_main  # noqa: E402
from datamodule import MNISTAdderData  # noqa: E402

START, END = "<!-- bench:table:start -->", "<!-- bench:table:end -->"
FIGURES = {"lightning_vs_torch_throughput_ratio": (">= 0.90", lambda v: v >= 0.90),
           "cpu_seconds_to_99": ("<= 30", lambda v: v is not None and v <= 30),
           "prepare_seconds_cached": ("< 1", lambda v: v < 1),
           "predict_images_per_second": ("", None),
           "compile_step_speedup": ("", None), "compile_seconds": ("", None)}


def build(extra: list[str], *configs: str):
    """The model, data module and trainer exactly as `cli.py` builds them from these configs."""
    return cli_main([arg for config in configs for arg in ("--config", str(ROOT / config))] + extra, run=False)


def prepared(extra: list[str]):
    """The default config's objects, with the training data set up."""
    cli = build(extra)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    return cli


class StepClock(Callback):
    """Times the training steps `first`..end of a Lightning fit, batch fetching included."""

    def __init__(self, first: int):
        self.first, self.start = first, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.first:
            self.seconds = time.perf_counter() - self.start


def lightning_seconds(model, data, warmup: int, steps: int, log_dir: str) -> float:
    clock = StepClock(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=warmup + steps,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=50,
                        logger=TensorBoardLogger(log_dir), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    trainer.fit(model, datamodule=data)
    return clock.seconds


def torch_seconds(model, data, warmup: int, steps: int, epoch: int) -> float:
    """The same step as `MNISTAdder.training_step` (two backward passes, one optimizer step, the
    scheduler stepped per batch) in a plain loop over the same loader, without metrics or logging."""
    net = model.net
    optimizer = model.optimizer(net.parameters())
    scheduler = model.scheduler(optimizer, total_steps=warmup + steps)
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    net.train()
    for i, batch in enumerate(itertools.islice(loader, warmup + steps)):
        if i == warmup:
            start = time.perf_counter()
        images = data.augment(batch["image"], data.train_set.augment_generator)
        digit_loss, sum_loss = model.losses(net(images, batch["number"]), batch["digit"], batch["sum"])
        optimizer.zero_grad(set_to_none=True)
        digit_loss.backward(retain_graph=True)
        (sum_loss * model.sum_loss_weight).backward()
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - start


def throughput_ratio(extra: list[str], rounds: int, warmup: int, steps: int) -> dict:
    """Lightning fit and the plain loop, each on its own copy of the default model, measured in turn
    (L T T L L T ...) so that drift in the machine's speed falls on both alike."""
    lit, plain = prepared(extra), prepared(extra)
    if warmup + steps > len(plain.datamodule.train_dataloader()):
        sys.exit(f"error: --warmup + --steps ({warmup + steps}) exceeds the batches in one epoch")
    times = {"lightning": [], "torch": []}
    with tempfile.TemporaryDirectory() as log_dir:
        for r in range(rounds):
            for kind in ("lightning", "torch") if r % 2 == 0 else ("torch", "lightning"):
                seconds = (lightning_seconds(lit.model, lit.datamodule, warmup, steps, log_dir) if kind == "lightning"
                           else torch_seconds(plain.model, plain.datamodule, warmup, steps, r))
                times[kind].append(seconds)
                print(f"  round {r + 1}/{rounds} {kind:9s} {steps * plain.datamodule.hparams.batch_size / seconds:7.0f} "
                      "samples/s", flush=True)
    return {"lightning_vs_torch_throughput_ratio": round(sum(times["torch"]) / sum(times["lightning"]), 3),
            "throughput": {kind: {"samples_per_second": round(
                steps * rounds * plain.datamodule.hparams.batch_size / sum(t), 1), "seconds_per_round": t}
                for kind, t in times.items()},
            "throughput_setup": {"rounds": rounds, "warmup_steps": warmup, "timed_steps": steps,
                                 "batch_size": plain.datamodule.hparams.batch_size}}


def compile_speedup(extra: list[str], rounds: int, warmup: int, steps: int) -> dict:
    """The plain loop with the net eager and with it compiled (`model.compile: true`), in turn."""
    eager, compiled = prepared(extra), prepared(extra)
    compiled.model.net.compile()
    start = time.perf_counter()
    first = torch_seconds(compiled.model, compiled.datamodule, warmup, steps, 0)  # compiles in its warmup
    compile_seconds = time.perf_counter() - start - first * (warmup + steps) / steps
    times = {"eager": [], "compiled": []}
    for r in range(rounds):
        for kind, cli in (("eager", eager), ("compiled", compiled))[::1 if r % 2 == 0 else -1]:
            times[kind].append(torch_seconds(cli.model, cli.datamodule, warmup, steps, r))
            print(f"  round {r + 1}/{rounds} {kind:9s} {steps / times[kind][-1]:5.1f} steps/s", flush=True)
    return {"compile_step_speedup": round(sum(times["eager"]) / sum(times["compiled"]), 3),
            "compile_seconds": round(compile_seconds, 1), "compile_seconds_per_round": times}


@torch.no_grad()
def accuracy_all_pairs(model, data) -> tuple[float, float]:
    """Both heads' accuracy over all (official test image, number) pairs."""
    was_training = model.training
    model.eval()
    digit_right = sum_right = 0
    test = data.all_pairs_set
    for i in range(0, len(test), 1000):
        batch = test.__getitems__(list(range(i, min(i + 1000, len(test)))))
        logits = model.net.paired_logits(batch["image"].to(model.device), batch["number"].to(model.device))
        digit_right += (logits[:, :10].argmax(1).cpu() == batch["digit"].repeat_interleave(10)).sum().item()
        sum_right += (logits[:, 10:].argmax(1).cpu() == batch["sum"].flatten()).sum().item()
    model.train(was_training)
    return digit_right / (10 * len(test)), sum_right / (10 * len(test))


class TimeTo99(Callback):
    """Every `every` steps and at the end of each epoch, pauses the clock and tests the model; stops
    the run once both heads reach 99 %."""

    def __init__(self, every: int):
        self.every, self.history, self.seconds = every, [], None

    def on_train_start(self, trainer, pl_module):
        self.start, self.paused = time.perf_counter(), 0.0

    def _check(self, trainer, pl_module):
        elapsed = time.perf_counter() - self.start - self.paused
        digit, sum_ = accuracy_all_pairs(pl_module, trainer.datamodule)
        self.paused = time.perf_counter() - self.start - elapsed
        self.history.append({"step": trainer.global_step, "seconds": round(elapsed, 2),
                             "digit_acc": digit, "sum_acc_all_pairs": sum_})
        print(f"  step {trainer.global_step:4d}  {elapsed:6.1f} s  digit {100 * digit:.2f} %  "
              f"sum (all pairs) {100 * sum_:.2f} %", flush=True)
        if self.seconds is None and min(digit, sum_) >= 0.99:
            self.seconds = round(elapsed, 2)
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0 and batch_idx + 1 < trainer.num_training_batches:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.seconds is None:
            self._check(trainer, pl_module)


def seconds_to_99(extra: list[str], config: str, every: int) -> tuple[dict, object]:
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build([f"--trainer.logger.init_args.save_dir={log_dir}", "--trainer.enable_progress_bar=false",
                     "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", *extra], config)
        clock = TimeTo99(every)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"cpu_seconds_to_99": clock.seconds, "to_99_config": config, "to_99_checks": clock.history}, cli


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
    images, numbers = batch["image"], batch["number"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), 1000):
            model(images[i:i + 1000], numbers[i:i + 1000])
        times.append(time.perf_counter() - start)
    return {"predict_images_per_second": round(len(images) / statistics.median(times)), "predict_batch_size": 1000}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "lightning": L.__version__,
            "python": platform.python_version(), "device": "cpu"}


def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"Measured {results['date']} with `{results['command']}` on {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}, lightning {m['lightning']}, device {m['device']}.", "",
             "| figure | value | target | met |", "|---|---|---|---|"]
    for key, (target, ok) in FIGURES.items():
        if key not in results:
            continue
        value = results[key]
        lines.append(f"| `{key}` | {'not reached' if value is None else value} | {target} | "
                     f"{'' if ok is None else 'yes' if ok(value) else 'no'} |")
    return "\n".join(lines)


def write_report(report: Path, text: str) -> None:
    old = report.read_text() if report.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in old or END not in old:
        sys.exit(f"error: {report} lacks the markers {START} and {END} around its table")
    head, rest = old.split(START, 1)
    report.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 30 steps instead of 6 of 100")
    parser.add_argument("--rounds", type=int, help="alternating throughput rounds (default 6; quick 2)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default 100; quick 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each round")
    parser.add_argument("--check-every", type=int, default=25, help="steps between the time-to-99 test checks")
    parser.add_argument("--config", default="configs/fast.yaml", help="the time-to-99 run's config")
    parser.add_argument("--compile", action="store_true",
                        help="also time the plain loop with the net torch.compiled against eager")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results.json")
    parser.add_argument("--report", type=Path, default=ROOT / "BENCHMARKS.md")
    args, extra = parser.parse_known_args(argv)
    rounds = args.rounds or (2 if args.quick else 6)
    steps = args.steps or (30 if args.quick else 100)
    results = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python benchmarks/bench.py", *(argv or sys.argv[1:])]),
               "machine": machine()}
    print("Data preparation with the files in place", flush=True)
    results.update(prepare_seconds(extra, 3 if args.quick else 5))
    print(f"Lightning fit against a plain PyTorch loop, {rounds} rounds of {steps} steps", flush=True)
    results.update(throughput_ratio(extra, rounds, args.warmup, steps))
    print(f"Time to 99 % on both heads with {args.config}", flush=True)
    to_99, cli = seconds_to_99(extra, args.config, args.check_every)
    results.update(to_99)
    if args.compile:
        print(f"torch.compile against eager, {rounds} rounds of {steps} steps", flush=True)
        results.update(compile_speedup(extra, rounds, args.warmup, steps))
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
