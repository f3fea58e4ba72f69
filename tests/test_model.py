import pickle
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser
from lightning import Callback, Trainer
from lightning.pytorch.cli import LRSchedulerCallable
from lightning.pytorch.core.saving import load_hparams_from_yaml, save_hparams_to_yaml
from lightning.pytorch.plugins import MixedPrecision
from torch.optim.lr_scheduler import OneCycleLR
from torch.utils.data import DataLoader

from cli import DEFAULT_CONFIG
from conftest import synthetic_digits
from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from mnist_adder.errors import UsageError
from mnist_adder.model.net import logit_mismatch, split_logits, sum_consistency


def fixed_batches(count=2, size=32):
    images, digits = synthetic_digits(count * size, seed=5)
    numbers = torch.arange(count * size) % 10
    images = torch.from_numpy(images).float().div(255).unsqueeze(1)
    digits = torch.from_numpy(digits).long()
    return [
        {
            "image": images[k::count],
            "number": numbers[k::count],
            "digit": digits[k::count],
            "sum": digits[k::count] + numbers[k::count],
        }
        for k in range(count)
    ]


def quiet_trainer(tmp_path, **kwargs):
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_forward_contract():
    model = MNISTAdder().eval()
    logits = model(torch.rand(5, 1, 28, 28), torch.arange(5))
    assert logits.shape == (5, 29) and logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: the net's logits are bf16, the answer is not
        assert model(torch.rand(5, 1, 28, 28), torch.arange(5)).dtype == torch.float32
    with pytest.raises(TypeError, match="images must be float in \\[0, 1\\], got torch.uint8"):
        model.answer(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8), torch.arange(5))  # a confident wrong


class Recording(MNISTAdder):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backward_calls, self.backward_losses, self.optimizer_steps = [], [], 0

    def manual_backward(self, loss, *args, **kwargs):
        self.backward_calls.append((self.global_step, kwargs.get("retain_graph", False)))
        self.backward_losses.append(loss.detach().clone())
        super().manual_backward(loss, *args, **kwargs)

    def on_train_start(self):
        super().on_train_start()
        self.optimizers().optimizer.register_step_post_hook(self._count_step)

    def _count_step(self, *_):
        self.optimizer_steps += 1


def test_manual_optimization_two_backwards_one_step_per_batch(tmp_path, synthetic_data_dir):
    model = Recording()
    dm = MNISTAdderData(data_dir=str(synthetic_data_dir), batch_size=50, val_size=100)
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, dm)
    assert len(dm.train_set) == 500 + 50  # and a tenth as many pictures that are no digit: 11 batches
    batches = 2 * (550 // 50)
    assert trainer.global_step == batches == model.optimizer_steps
    assert model.backward_calls == [(step, retain) for step in range(batches) for retain in (True, False)]


@pytest.mark.parametrize(
    "sum_loss, weight, used, agreement",
    [
        ("cross_entropy", None, 1.0, 0.0),
        ("mse", None, 4.0, 0.0),
        ("mse", 2.5, 2.5, 0.0),
        ("cross_entropy", 2.0, 2.0, 0.5),
    ],
)
def test_the_two_backwards_are_the_digit_loss_then_the_weighted_rest(tmp_path, sum_loss, weight, used, agreement):
    """The first backward takes the digit loss, the second sum_loss_weight * (sum loss + agreement term);
    together they are the objective logged per step as `loss`."""
    torch.manual_seed(0)
    model = Recording(sum_loss=sum_loss, sum_loss_weight=weight, agreement=agreement, channels=(8, 16, 16))
    batch = fixed_batches(count=1)[0]
    with torch.no_grad():
        losses = model.losses(model(batch["image"], batch["number"]), batch)
    trainer = quiet_trainer(tmp_path, max_steps=1, log_every_n_steps=1)
    trainer.fit(model, DataLoader([batch], batch_size=None))
    first, second = model.backward_losses
    assert torch.allclose(first, losses.digit_loss)
    assert torch.allclose(second, used * (losses.sum_loss + losses.agreement))
    assert (losses.agreement > 0) == (agreement > 0)
    assert torch.allclose(trainer.callback_metrics["loss"], first + second)


@pytest.mark.parametrize("sum_loss", ["cross_entropy", "mse"])
def test_overfits_a_few_fixed_batches(tmp_path, sum_loss):
    torch.manual_seed(0)
    adam = partial(torch.optim.Adam, lr=3e-3)
    model = MNISTAdder(sum_loss=sum_loss, channels=(8, 16, 16), optimizer=adam, scheduler=None)
    batches = fixed_batches()
    quiet_trainer(tmp_path, max_epochs=60).fit(model, DataLoader(batches, batch_size=None))
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["image"], batch["number"])
            assert torch.equal(logits[:, :10].argmax(1), batch["digit"])
            assert torch.equal(logits[:, 10:].argmax(1), batch["sum"])


def test_a_model_built_in_python_logs_hyperparameters_its_hparams_yaml_can_give_back(tmp_path):
    """Its optimizer and scheduler are callables: neither hparams nor hparams_initial (what loggers write) has them."""
    model = MNISTAdder(scheduler=partial(OneCycleLR, max_lr=0.1))
    save_hparams_to_yaml(tmp_path / "hparams.yaml", model.hparams_initial)
    assert load_hparams_from_yaml(tmp_path / "hparams.yaml") == model.hparams == {**model.hparams_initial}
    assert {"optimizer", "scheduler"}.isdisjoint(model.hparams) and model.hparams.hidden == 512


def test_a_trainer_that_would_cast_the_buffers_is_refused_from_python_too(tmp_path):
    """bf16-true would cast the temperatures and the "not a digit" statistics to bfloat16 before any step."""
    with pytest.raises(UsageError, match="trainer.precision bf16-true: the temperatures"):
        quiet_trainer(tmp_path, max_steps=1, precision="bf16-true").fit(MNISTAdder(channels=(8, 16, 16)), [])


def test_resuming_with_another_optimizer_or_schedule_is_refused_before_its_state_is_loaded(tmp_path):
    """An optimizer given from Python is no hyperparameter: resumed with the default SGD, Adam's state would end in
    a KeyError at the first step; a schedule added on resuming would load without a word. The same optimizer
    and schedule resume."""
    adam, batches = partial(torch.optim.Adam, lr=3e-3), DataLoader(fixed_batches(), batch_size=None)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(MNISTAdder(channels=(8, 16, 16), optimizer=adam, scheduler=None), batches)
    trainer.save_checkpoint(tmp_path / "adam.ckpt")
    with pytest.raises(
        UsageError, match=r"trained with torch\.optim\.adam\.Adam and this fit builds torch\.optim\.sgd"
    ):
        sgd = MNISTAdder(channels=(8, 16, 16), scheduler=None)
        quiet_trainer(tmp_path, max_steps=3).fit(sgd, batches, ckpt_path=tmp_path / "adam.ckpt")
    resumed = quiet_trainer(tmp_path, max_steps=3)
    resumed.fit(
        MNISTAdder(channels=(8, 16, 16), optimizer=adam, scheduler=None),
        batches,
        ckpt_path=tmp_path / "adam.ckpt",
    )
    assert resumed.global_step == 3
    with pytest.raises(
        UsageError, match=r"this fit builds torch\.optim\.adam\.Adam, torch\.optim\.lr_scheduler\.StepLR"
    ):
        stepped = MNISTAdder(
            channels=(8, 16, 16), optimizer=adam, scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1)
        )
        quiet_trainer(tmp_path, max_steps=3).fit(stepped, batches, ckpt_path=tmp_path / "adam.ckpt")
    tuned = quiet_trainer(tmp_path, max_steps=2)  # a loaded model fitted afresh (no ckpt_path) may take another
    tuned.fit(MNISTAdder.load_from_checkpoint(tmp_path / "adam.ckpt", optimizer=sgd.optimizer), batches)
    assert tuned.global_step == 2


def test_brier_sum_loss_rewards_probability_on_the_true_sum_and_nothing_else():
    """sum_loss "mse" reads only the sum head's probabilities: it ignores the digit head and a shift of all sum
    logits; it falls as the true sum's probability rises and, at a given one, when the rest is spread over the
    wrong sums rather than piled on one (unlike cross-entropy); a step down its gradient raises the true sum's
    probability. (test_correctness checks its values at 0, 2 and 18/19.)"""
    brier = MNISTAdder(sum_loss="mse").losses
    batch = {"digit": torch.tensor([4]), "number": torch.tensor([3]), "sum": torch.tensor([7])}

    def logits(true, piled=False, digit_logits=None):
        """The sum head puts `true` on 7 and the rest evenly on the other sums, or (`piled`) almost all on 0."""
        probs = torch.full((19,), 1e-6 if piled else (1 - true) / 18)
        probs[0] = 1 - true - 17e-6 if piled else probs[0]
        probs[7] = true
        return torch.cat([torch.zeros(10) if digit_logits is None else digit_logits, probs.log()])[None]

    def loss(logits):
        return brier(logits, batch).sum_loss.item()

    falling = [loss(logits(p)) for p in (0.1, 0.4, 0.7, 0.95)]
    assert falling == sorted(falling, reverse=True) and len(set(falling)) == 4
    assert loss(logits(0.4)) < loss(logits(0.4, piled=True))
    assert loss(logits(0.4, digit_logits=torch.randn(10))) == pytest.approx(loss(logits(0.4)))
    shift = torch.cat([torch.zeros(10), torch.full((19,), 5.0)])
    assert loss(logits(0.4) + shift) == pytest.approx(loss(logits(0.4)))
    start = logits(0.4).requires_grad_()
    brier(start, batch).sum_loss.backward()
    stepped = start.detach() - 0.5 * start.grad
    assert split_logits(stepped).sum.softmax(1)[0, 7] > 0.4 and loss(stepped) < loss(start.detach())


def test_agreement_pulls_the_reachable_sum_logits_and_the_digit_logits_together():
    """The term is 0 when the sum logits of number+0..number+9 are the digit logits plus any constant, grows
    otherwise, and its gradient moves both heads towards each other."""
    model, plain = MNISTAdder(agreement=0.5), MNISTAdder(agreement=0.0)
    digits, numbers = torch.tensor([3, 0, 9, 7]), torch.tensor([5, 9, 9, 0])
    logits = torch.randn(4, 29)
    logits[0, 3], logits[0, 8] = 2.0, -1.0
    for row in range(4):
        logits[row, 10 + numbers[row] : 20 + numbers[row]] = logits[row, :10] + row - 2
    batch = {"digit": digits, "number": numbers, "sum": digits + numbers}
    assert model.losses(logits, batch).agreement.abs() < 1e-6
    swapped = logits.clone()
    # the sum head ranks 3+5 and 8+5 the other way round
    swapped[0, [10 + 5 + 3, 10 + 5 + 8]] = swapped[0, [10 + 5 + 8, 10 + 5 + 3]]
    swapped.requires_grad_()
    losses, plain_losses = model.losses(swapped, batch), plain.losses(swapped, batch)
    assert plain_losses.agreement == 0 and torch.equal(losses.sum_loss, plain_losses.sum_loss)  # kept apart
    extra = losses.agreement
    assert extra > 1e-3
    extra.backward()
    # the heads meet halfway: the digit head ranks 3 above 8 and the sum head 8+5 above 3+5, so a step down
    # the gradient lowers the digit logit of 3 and raises the sum logit of 3+5 (and the reverse for 8)
    assert swapped.grad[0, 3] > 0 > swapped.grad[0, 8] and swapped.grad[0, 10 + 5 + 3] < 0 < swapped.grad[0, 10 + 5 + 8]
    assert swapped.grad[1:].abs().max() < 1e-6  # the rows that already agree do not move


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = MNISTAdder(channels=(8, 16, 16), hidden=32)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, DataLoader(fixed_batches(), batch_size=None))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MNISTAdder.load_from_checkpoint(tmp_path / "m.ckpt").eval()
    model.eval()
    images, numbers = torch.rand(6, 1, 28, 28), torch.arange(6)
    assert torch.equal(model(images, numbers), loaded(images, numbers))


def test_shared_image_features_match_forward_on_every_pair():
    model = MNISTAdder(channels=(8, 16, 16)).eval()
    images = torch.rand(3, 1, 28, 28)
    shared = model.net.paired_logits(images, torch.arange(10).repeat(3, 1))
    direct = model(images.repeat_interleave(10, 0), torch.arange(10).repeat(3))
    assert torch.allclose(shared, direct, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sum_loss": "l1"},
        {"hidden": 0},
        {"gradient_clip_val": -1.0},
        {"label_smoothing": 1.0},
        {"dropout": 1.0},
        {"sum_loss_weight": 0.0},
        {"agreement": -0.5},
        {"convs_per_stage": 0},
    ],
)
def test_bad_model_arguments(kwargs):
    with pytest.raises(ValueError):
        MNISTAdder(**kwargs)


def test_sum_consistency_is_a_hand_count():
    logits = torch.full((4, 29), -5.0)
    digits, sums, numbers = [3, 0, 9, 5], [7, 2, 18, 5], torch.tensor([4, 1, 9, 0])
    for k, (d, s) in enumerate(zip(digits, sums, strict=True)):
        logits[k, d], logits[k, 10 + s] = 5.0, 5.0
    # 3+4=7 agrees, 0+1=1 is not 2, 9+9=18 agrees, 5+0=5 agrees
    assert sum_consistency(logits, numbers).tolist() == [True, False, True, True]


@pytest.mark.parametrize("agreement", [0.0, 0.5])
def test_epoch_losses_are_what_they_are_named_over_every_sample_once(tmp_path, agreement):
    """Batches of 30 and 2 samples: each logged mean is over the 32 samples, not the mean of two means;
    sum_loss is the sum head's cross-entropy alone, agreement the weighted term (logged only when on) and
    loss the objective, both weighted by sum_loss_weight."""
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, sum_loss_weight=2.0, label_smoothing=0.0, agreement=agreement)
    model.eval()
    batch = fixed_batches(count=1)[0]
    small = {k: v[:2] for k, v in batch.items()}
    large = {k: v[2:] for k, v in batch.items()}
    result = quiet_trainer(tmp_path).validate(model, DataLoader([large, small], batch_size=None), verbose=False)[0]
    with torch.no_grad():
        logits = model.net(batch["image"], batch["number"])
    expected = {
        "val/digit_loss": F.cross_entropy(logits[:, :10], batch["digit"]).item(),
        "val/sum_loss": F.cross_entropy(logits[:, 10:], batch["sum"]).item(),
    }
    term = agreement * logit_mismatch(logits, batch["number"]).item()
    expected["val/loss"] = expected["val/digit_loss"] + 2.0 * (expected["val/sum_loss"] + term)
    if agreement:
        expected["val/agreement"] = term
    assert {k: v for k, v in result.items() if k.endswith(("loss", "agreement"))} == pytest.approx(expected, rel=1e-5)


def test_dropout_acts_in_training_only_and_is_absent_by_default():
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, dropout=0.5)
    images, numbers = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    assert not torch.equal(model(images, numbers), model(images, numbers))
    model.eval()
    assert torch.equal(model(images, numbers), model(images, numbers))
    # without dropout the head's layers keep their indices, so checkpoints written before the option load
    assert not any(isinstance(m, torch.nn.Dropout) for m in MNISTAdder().modules())


def test_convs_per_stage_adds_3x3_convs_at_the_pooled_size():
    one, two = MNISTAdder(channels=(8, 16, 16), convs_per_stage=1), MNISTAdder(channels=(8, 16, 16))
    convs = [[layer for layer in m.net.image if isinstance(layer, torch.nn.Conv2d)] for m in (one, two)]
    assert [c.kernel_size[0] for c in convs[0]] == [5, 3, 3]
    assert [c.kernel_size[0] for c in convs[1]] == [5, 3, 3, 3, 3, 3]
    assert [c.out_channels for c in convs[1]] == [8, 8, 16, 16, 16, 16]
    first_stage = [type(layer).__name__ for layer in two.net.image[:7]]
    # the second conv works after the pooling
    assert first_stage == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU"]
    images = torch.rand(2, 1, 28, 28)
    assert two.net.image_features(images).shape == one.net.image_features(images).shape == (2, 16 * 3 * 3)
    # one conv per stage keeps the layers' indices, so checkpoints written before the option load
    assert {"image.0.weight", "image.2.running_mean", "image.4.weight", "image.10.bias"} <= set(one.net.state_dict())


def gradient_norm(parameters) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])).item()


class NormBeforeUpdate(Callback):
    """The gradient norm that each optimizer update uses, seen by a hook on the torch optimizer's step."""

    def __init__(self):
        self.norms = []

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        optimizer.register_step_pre_hook(lambda *_: self.norms.append(gradient_norm(pl_module.parameters())))


def test_gradient_clipping_acts_on_unscaled_gradients(tmp_path):
    """16-mixed on the CPU, with a GradScaler that multiplies the loss by 1024: clipped before the scaler
    unscales them, the update would see gradients of norm clip / 1024."""
    torch.manual_seed(0)
    model, record = MNISTAdder(channels=(8, 16, 16), hidden=32, gradient_clip_val=0.05), NormBeforeUpdate()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    quiet_trainer(
        tmp_path, max_steps=2, callbacks=[record], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    ).fit(model, DataLoader(fixed_batches(), batch_size=None))
    assert scaler.get_scale() == 1024.0  # no step skipped for overflow
    assert record.norms == pytest.approx([0.05, 0.05], rel=1e-3)


def test_the_model_pickles_with_its_default_optimizer_and_schedule_those_of_default_yaml():
    """ddp_spawn pickles the model into each process; what it unpickles builds the optimizer and schedule that
    configs/default.yaml spells out for the command line."""
    model = pickle.loads(pickle.dumps(MNISTAdder()))
    spelled_out = yaml.safe_load(DEFAULT_CONFIG.read_text())["model"]
    optimizer = model.optimizer(model.parameters())
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == "torch.optim.sgd.SGD"
    assert spelled_out["optimizer"]["class_path"] == "torch.optim.SGD"
    assert {k: optimizer.defaults[k] for k in spelled_out["optimizer"]["init_args"]} == pytest.approx(
        spelled_out["optimizer"]["init_args"]
    )
    schedule = model.scheduler(optimizer, total_steps=100)
    assert f"torch.optim.lr_scheduler.{type(schedule).__name__}" == spelled_out["scheduler"]["class_path"]
    init_args = spelled_out["scheduler"]["init_args"]
    for _ in range(round(init_args["pct_start"] * 100) - 1):  # the warm-up reaches max_lr at its last step
        optimizer.step()
        schedule.step()
    assert schedule.get_last_lr()[0] == pytest.approx(init_args["max_lr"])


def cli_scheduler(**init_args):
    """OneCycleLR as LightningCLI builds it from YAML: a callable that passes its keywords on to the class."""
    parser = ArgumentParser()
    parser.add_argument("--scheduler", type=LRSchedulerCallable)
    config = parser.parse_object(
        {"scheduler": {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": init_args}}
    )
    return parser.instantiate(config).scheduler


@pytest.mark.parametrize(
    "scheduler",
    [partial(OneCycleLR, max_lr=0.1), partial(OneCycleLR, max_lr=0.1, total_steps=None), cli_scheduler(max_lr=0.1)],
    ids=["partial", "total_steps=None", "cli"],
)
def test_one_cycle_spans_the_run_unless_given_its_length(tmp_path, scheduler):
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, scheduler=scheduler)
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, DataLoader(fixed_batches(), batch_size=None))
    one_cycle = trainer.lr_scheduler_configs[0].scheduler
    assert one_cycle.total_steps == one_cycle.last_epoch == 4  # 2 epochs of 2 batches
    assert trainer.lr_scheduler_configs[0].interval == "step"  # what a LearningRateMonitor logs by
    # given a length, no trainer is asked for one (none is attached here)
    given = MNISTAdder(scheduler=partial(scheduler, total_steps=7)).configure_optimizers()
    assert given["lr_scheduler"]["scheduler"].total_steps == 7


def test_images_are_standardised_with_mnists_mean_and_deviation():
    """The first conv sees (image - 0.1307) / 0.3081: an image at MNIST's mean pixel is zero, one a deviation
    above it is one."""
    seen = []
    model = MNISTAdder(channels=(8, 16, 16), hidden=32).eval()
    model.net.image[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images = torch.stack([torch.full((1, 28, 28), 0.1307), torch.full((1, 28, 28), 0.1307 + 0.3081)])
    with torch.no_grad():
        model(images, torch.tensor([0, 1]))
    assert torch.allclose(seen[0][0], torch.zeros(1, 28, 28), atol=1e-6)
    assert torch.allclose(seen[0][1], torch.ones(1, 28, 28), atol=1e-6)
