"""For the GPU benchmark of a CUDA-graph training step: StaticStep, an eager training step of an MNISTAdder that
reads its batch from preallocated buffers, the function a CUDA graph would capture, and `sgd_`, its SGD update with
lr and momentum read from device tensors.

No graph is captured here: the step runs eagerly. It accepts only torch.optim.SGD without dampening and no gradient
clipping (`check_static`), and calls backward() itself, skipping Lightning's manual_backward: no loss scaling under
16-mixed, no autocast, no DDP gradient sync held back. So it does what MNISTAdder.training_step does only in one
process at precision 32-true; unlike it, it logs nothing and updates no metric.
"""

import torch

from datamodule import affine_augment
from mnist_adder.model.losses import weighted_sum_loss


def check_static(model, optimizer: torch.optim.Optimizer) -> None:
    """ValueError, in one line, unless StaticStep does for this model and optimizer what the eager step does."""
    groups = optimizer.param_groups
    if (
        type(optimizer) is not torch.optim.SGD
        or any(group["dampening"] or group["maximize"] or torch.is_tensor(group["weight_decay"]) for group in groups)
        or model.hparams.gradient_clip_val
    ):
        raise ValueError(
            "the static training step takes torch.optim.SGD without dampening or maximize and no gradient "
            f"clipping; got {type(optimizer).__name__} (clipping {model.hparams.gradient_clip_val})"
        )


def sgd_(params, grads, buffers, lr: torch.Tensor, momentum: torch.Tensor, weight_decay: float, nesterov: bool):
    """torch.optim.SGD's update (no dampening), with lr and momentum read from 0-dim tensors on the device: SGD takes
    momentum as a Python float (a captured graph would keep the first), and a tensor lr only when fused (its other
    paths read it with .item(), which a capture forbids)."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(buffers, momentum)
    torch._foreach_add_(buffers, grads)  # from zeros, the first step's buffer is its gradient, as SGD's
    # addcmul rounds once, as SGD's add(alpha=) does: a mul, then an add, would round twice and drift from it
    steps = torch._foreach_addcmul(grads, buffers, [momentum] * len(params)) if nesterov else buffers
    torch._foreach_addcmul_(params, steps, [lr] * len(params), value=-1)


class StaticStep:
    """The whole training step of `model` (an MNISTAdder) reading its batch from preallocated buffers: augmentation
    from its draws, forward, the digit loss's backward pass (graph kept), the weighted sum loss's, and the SGD step.
    `load` fills the buffers and the tensors of each param group's lr and momentum, which the scheduler sets between
    steps; `step` runs it. Supported: what `check_static` lets through."""

    def __init__(self, model, optimizer: torch.optim.Optimizer, batch_size: int, augment: tuple[float, float, float]):
        check_static(model, optimizer)
        device, n = model.device, batch_size
        self.model, self.optimizer = model, optimizer
        self.augment = augment if any(augment) else None  # (rotate, translate, scale), as MNISTAdderData's
        self.images = torch.zeros(n, 1, 28, 28, device=device)
        self.numbers = torch.zeros(n, dtype=torch.long, device=device)
        self.digits = torch.zeros(n, dtype=torch.long, device=device)
        self.sums = torch.zeros(n, dtype=torch.long, device=device)
        self.draws = tuple(torch.zeros(shape, device=device) for shape in ((n,), (n,), (n, 2))) if self.augment else ()
        self.hyper = [(torch.zeros((), device=device), torch.zeros((), device=device)) for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            for p in group["params"]:  # the buffers' places, held from the start; SGD's state keeps them
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))

    def load(self, batch: dict, draws: tuple[torch.Tensor, ...] = ()) -> None:
        """Copy a batch and its `augment_draws` (with augmentation only) into the buffers, and each param group's
        lr and momentum into theirs."""
        sources = (batch["image"], batch["number"], batch["digit"], batch["sum"], *draws)
        buffers = (self.images, self.numbers, self.digits, self.sums, *self.draws)
        for buffer, source in zip(buffers, sources, strict=True):
            buffer.copy_(source, non_blocking=True)
        for (lr, momentum), group in zip(self.hyper, self.optimizer.param_groups):
            lr.fill_(group["lr"])
            momentum.fill_(group["momentum"])

    def step(self) -> None:
        """One training step on the buffers' contents."""
        model = self.model
        images = self.images if self.augment is None else affine_augment(self.images, self.draws, *self.augment)
        logits = model.net(images, self.numbers)
        losses = model.losses(logits, {"digit": self.digits, "sum": self.sums, "number": self.numbers})
        self.optimizer.zero_grad(set_to_none=True)
        losses.digit_loss.backward(retain_graph=True)
        weighted_sum_loss(losses.sum_loss, losses.agreement, model.sum_loss_weight).backward()
        with torch.no_grad():
            for (lr, momentum), group in zip(self.hyper, self.optimizer.param_groups):
                params = [p for p in group["params"] if p.grad is not None]
                buffers = [self.optimizer.state[p]["momentum_buffer"] for p in params]
                grads = [p.grad for p in params]
                sgd_(params, grads, buffers, lr, momentum, group["weight_decay"], group["nesterov"])
