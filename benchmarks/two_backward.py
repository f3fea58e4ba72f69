"""The training step's two backward passes (the digit loss with the graph kept, then the weighted sum loss) against
one backward pass of their sum, the objective `loss`, on the default MNISTAdder on this machine's CPU:
`python benchmarks/two_backward.py` (under a minute on two cores).

Measures (a) how far apart the two ways' gradients are, in float32 and in float64 (rounding only: the float64
difference is some 1e9 times smaller), and (b) the seconds per step of each way (forward pass, losses and the
backward passes; no optimizer), taking turns step by step: the median over rounds, and their ratio.
Random weights and random batches with MNIST's pixel mean. Prints a table, and writes it between the markers
`<!-- two_backward:start -->` and `<!-- two_backward:end -->` in README.md when both are there.
"""

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.model.losses import Losses, weighted_sum_loss  # noqa: E402
from mnist_adder.model.net import MNIST_MEAN  # noqa: E402

START, END = "<!-- two_backward:start -->", "<!-- two_backward:end -->"

Passes = Callable[[MNISTAdder, Losses], list[torch.Tensor]]


def two_passes(model: MNISTAdder, losses: Losses) -> list[torch.Tensor]:
    """The training step's: the digit loss, then the weighted sum loss."""
    return [losses.digit_loss, weighted_sum_loss(losses.sum_loss, losses.agreement, model.sum_loss_weight)]


def one_pass(model: MNISTAdder, losses: Losses) -> list[torch.Tensor]:
    """The objective the two add up to."""
    return [losses.loss]


WAYS = {"two backward passes": two_passes, "one backward pass": one_pass}


def random_batches(count: int, size: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Batches of images whose pixels are 1 with MNIST's mean as probability, else 0 (about MNIST's mean and
    spread), with random digits and numbers, and their sums."""
    generator = torch.Generator().manual_seed(seed)
    batches = [
        {
            "image": torch.bernoulli(torch.full((size, 1, 28, 28), MNIST_MEAN, dtype=dtype), generator=generator),
            "number": torch.randint(0, 10, (size,), generator=generator),
            "digit": torch.randint(0, 10, (size,), generator=generator),
        }
        for _ in range(count)
    ]
    return [{**batch, "sum": batch["digit"] + batch["number"]} for batch in batches]


def step(model: MNISTAdder, batch: dict, passes: Passes) -> None:
    """A training step without the optimizer: forward, losses, and backward passes of `passes`' losses in order,
    each but the last keeping the graph."""
    model.zero_grad(set_to_none=True)
    logits = model.net(batch["image"], batch["number"])
    *first, last = passes(model, model.losses(logits, batch))
    for loss in first:
        loss.backward(retain_graph=True)
    last.backward()


def gradients(model: MNISTAdder, batch: dict, passes: Passes) -> torch.Tensor:
    """Every parameter's gradient after `step`, flattened into one vector."""
    step(model, batch, passes)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def gradient_difference(model: MNISTAdder, batches: list[dict], passes: Passes = two_passes) -> dict:
    """Over `batches`, from the same weights: the largest absolute difference between the gradients of `passes` and
    those of one backward pass of `loss`, and it over the largest gradient (`relative`). Leaves the model in
    training mode, its BatchNorm statistics updated."""
    model.train()
    worst = {"max_abs": 0.0, "relative": 0.0}
    for batch in batches:
        reference = gradients(model, batch, one_pass)
        difference = (gradients(model, batch, passes) - reference).abs().max().item()
        worst["max_abs"] = max(worst["max_abs"], difference)
        worst["relative"] = max(worst["relative"], difference / reference.abs().max().item())
    return worst


def step_seconds(model: MNISTAdder, batches: list[dict], rounds: int, steps: int) -> dict:
    """Each way's seconds per step in each of `rounds` rounds of `steps` steps (cycling through `batches`), the two
    ways taking turns step by step, so that the machine's drifting speed weighs on both alike (after one untimed
    step each); the medians over the rounds, and the median of the rounds' ratios two / one."""
    model.train()
    for passes in WAYS.values():
        step(model, batches[0], passes)
    per_round = {name: [] for name in WAYS}
    for _ in range(rounds):
        seconds = dict.fromkeys(WAYS, 0.0)
        for i in range(steps):
            for name, passes in list(WAYS.items())[:: 1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                step(model, batches[i % len(batches)], passes)
                seconds[name] += time.perf_counter() - start
        for name, total in seconds.items():
            per_round[name].append(total / steps)
    two, one = per_round.values()
    return {
        "seconds_per_step": {name: statistics.median(times) for name, times in per_round.items()},
        "ratio": statistics.median(t / o for t, o in zip(two, one, strict=True)),
        "per_round": per_round,
    }


def measure(batch_size: int, batch_count: int, rounds: int, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = MNISTAdder()
    model64 = copy.deepcopy(model).double()
    batches = random_batches(batch_count, batch_size, seed)
    return {
        "float32": gradient_difference(model, batches),
        "float64": gradient_difference(model64, random_batches(batch_count, batch_size, seed, torch.float64)),
        **step_seconds(model, batches, rounds, steps),
    }


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def table(figures: dict, command: str, batch_size: int, rounds: int, steps: int) -> str:
    ms = {name: 1000 * seconds for name, seconds in figures["seconds_per_step"].items()}
    threads = torch.get_num_threads()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    lines = [
        f"Measured with `{command}` (the default `MNISTAdder()`, random weights and batches of {batch_size}) "
        f"on {cpu}, {threads} thread{'s' * (threads != 1)}, torch {torch.__version__}:",
        "",
        "| | two backward passes (the step's) | one backward pass of `loss` |",
        "|---|---|---|",
    ]
    lines.append(
        f"| ms per step: forward, losses, backward (median of {rounds} rounds of {steps}) | "
        + " | ".join(f"{ms[name]:.1f}" for name in WAYS)
        + " |"
    )
    lines.append(f"| time ratio, two / one (median of the rounds' ratios) | {figures['ratio']:.3f} | 1 |")
    for dtype in ("float32", "float64"):
        diff = figures[dtype]
        lines.append(
            f"| gradient difference, {dtype}: largest, and over the largest gradient | "
            f"{diff['max_abs']:.1e}, {diff['relative']:.1e} | |"
        )
    low, high = figures["float64"]["relative"], figures["float32"]["relative"]
    eps = torch.finfo(torch.float32).eps / torch.finfo(torch.float64).eps
    verdict = "rounding only" if low < 1e-9 else "more than rounding"
    scale = f"{high / low:.0e} times smaller" if low else "none"
    lines += ["", f"The float64 difference is {scale} (the epsilons' ratio: {eps:.0e}): {verdict}."]
    return "\n".join(lines)


def write_between_markers(path: Path, text: str) -> bool:
    """Replace what stands between START and END in `path` with `text`; False, leaving it as it is, without them."""
    old = path.read_text() if path.exists() else ""
    if START not in old or END not in old.split(START, 1)[1]:
        return False
    head, rest = old.split(START, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4, help="distinct random batches")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each way per round, in turns")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.batches, args.rounds, args.steps, args.threads or 1) < 1:
        parser.error("--batch-size, --batches, --rounds, --steps and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = measure(args.batch_size, args.batches, args.rounds, args.steps)
    command = " ".join(["python benchmarks/two_backward.py", *(sys.argv[1:] if argv is None else argv)])
    text = table(figures, command, args.batch_size, args.rounds, args.steps)
    print(text)
    if write_between_markers(args.readme, text):
        print(f"\nwritten: {args.readme}")
    else:
        print(f"\n{args.readme} lacks the markers {START} and {END}: left as it is")
    return figures


if __name__ == "__main__":
    main()
