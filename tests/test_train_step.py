import copy
import itertools
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from lightning import Callback
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader

from datamodule import MNISTAdderData, augment_draws
from lightning_module import MNISTAdder
from mnist_adder.model.net import logit_mismatch
from static_step import StaticStep
from test_model import fixed_batches, quiet_trainer

STEPS = 5


class KeepCounts(Callback):
    """The train counts as they stand at the epoch's end, before the model logs and resets them."""

    def on_train_epoch_end(self, trainer, pl_module):
        self.counts = {name: state.clone() for name, state in pl_module.train_metrics.metric_state.items()}


def model_and_data(data_dir) -> tuple[MNISTAdder, MNISTAdderData]:
    torch.manual_seed(0)
    model = MNISTAdder(
        channels=(8, 16, 16),
        hidden=32,
        sum_loss_weight=2.0,
        agreement=0.5,
        label_smoothing=0.1,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        scheduler=partial(OneCycleLR, max_lr=0.5, pct_start=0.4),
    )
    data = MNISTAdderData(data_dir=str(data_dir), batch_size=32, val_size=100, rotate=30.0, translate=0.1, scale=0.2)
    return model, data


def static_steps(model: MNISTAdder, data: MNISTAdderData) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    """STEPS steps of StaticStep over the train loader's first batches, as Lightning would feed them; the optimizer,
    and the [lr, momentum] each step ran with."""
    data.prepare_data()
    data.setup("fit")
    loader = data.train_dataloader()
    loader.sampler.set_epoch(0)
    optimizer = model.optimizer(model.parameters())
    scheduler = model.scheduler(optimizer, total_steps=STEPS)
    hp = data.hparams
    step = StaticStep(model.train(), optimizer, hp.batch_size, (hp.rotate, hp.translate, hp.scale))
    schedule = []
    for batch in itertools.islice(loader, STEPS):
        step.load(batch, augment_draws(hp.batch_size, data.train_set.augment_generator))
        schedule.append(torch.stack(step.hyper[0]))
        step.step()
        scheduler.step()
    return optimizer, torch.stack(schedule)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # the static step is no optimizer.step()
def test_static_steps_equal_lightnings_eager_steps(tmp_path, synthetic_data_dir):
    """Five steps on static buffers leave the weights, BatchNorm statistics, SGD momentum buffers and train counts
    that five Lightning steps leave: the same batches, augmentation draws, loss weights and OneCycle schedule, whose
    lr and momentum change every step."""
    eager, data = model_and_data(synthetic_data_dir)
    static = copy.deepcopy(eager)
    keep = KeepCounts()
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=STEPS, limit_val_batches=0, callbacks=[keep])
    trainer.fit(eager, data)
    optimizer, schedule = static_steps(static, model_and_data(synthetic_data_dir)[1])
    assert (schedule.diff(dim=0) != 0).all()  # lr and momentum, from one step to the next
    for name, value in eager.net.state_dict().items():
        assert torch.allclose(static.net.state_dict()[name].float(), value.float(), atol=1e-6), name
    buffers = [trainer.optimizers[0].state[p]["momentum_buffer"] for p in eager.parameters()]
    for expected, p in zip(buffers, static.parameters(), strict=True):
        assert torch.allclose(optimizer.state[p]["momentum_buffer"], expected, atol=1e-6)
    counts = static.train_metrics.metric_state
    assert counts["samples"] == keep.counts["samples"] == STEPS * 32
    assert torch.equal(counts["right"], keep.counts["right"])
    assert torch.allclose(counts["loss_sums"], keep.counts["loss_sums"], rtol=1e-6)


def test_train_figures_are_means_over_the_epochs_samples(tmp_path):
    """Batches of 30 and 2 samples, the weights left as they are (lr 0): each train/ figure is over the 32 samples,
    not the mean of two means; loss is the objective, with sum_loss_weight."""
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, sum_loss_weight=2.0, agreement=0.5)
    model.optimizer = partial(torch.optim.SGD, lr=0.0)
    batch = fixed_batches(count=1)[0]
    batches = [{k: v[part] for k, v in batch.items()} for part in (slice(2, None), slice(2))]
    with torch.no_grad():  # in training mode, as in the step: BatchNorm normalises with each batch's statistics
        outputs = [(model.net(b["image"], b["number"]), b) for b in batches]

    def mean(per_batch) -> float:
        return sum(per_batch(logits, b).item() * len(logits) for logits, b in outputs) / 32

    expected = {
        "train/digit_acc": mean(lambda z, b: (z[:, :10].argmax(1) == b["digit"]).float().mean()),
        "train/sum_acc": mean(lambda z, b: (z[:, 10:].argmax(1) == b["sum"]).float().mean()),
        "train/digit_loss": mean(lambda z, b: F.cross_entropy(z[:, :10], b["digit"])),
        "train/sum_loss": mean(lambda z, b: F.cross_entropy(z[:, 10:], b["sum"])),
        "train/agreement": mean(lambda z, b: 0.5 * logit_mismatch(z, b["number"])),
    }
    expected["train/loss"] = expected["train/digit_loss"] + 2.0 * (
        expected["train/sum_loss"] + expected["train/agreement"]
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, DataLoader(batches, batch_size=None))
    logged = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    assert logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "optimizer, clip",
    [(partial(torch.optim.Adam, lr=1e-3), 0.0), (partial(torch.optim.SGD, lr=0.1, dampening=0.1), 0.0), (None, 1.0)],
    ids=["Adam", "dampening", "clipping"],
)
def test_the_static_step_refuses_what_it_would_not_do_as_the_eager_step(optimizer, clip):
    model = MNISTAdder(channels=(4, 8, 8), hidden=16, gradient_clip_val=clip)
    with pytest.raises(ValueError, match="the static training step takes torch.optim.SGD without dampening"):
        StaticStep(model, (optimizer or model.optimizer)(model.parameters()), 4, (0.0, 0.0, 0.0))
