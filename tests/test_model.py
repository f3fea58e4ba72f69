import pytest
import torch
import torch.nn.functional as F
from lightning import Trainer
from torch.utils.data import DataLoader

from conftest import synthetic_digits
from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from net import sum_consistency


def fixed_batches(count=2, size=32):
    images, digits = synthetic_digits(count * size, seed=5)
    numbers = torch.arange(count * size) % 10
    images = torch.from_numpy(images).float().div(255).unsqueeze(1)
    digits = torch.from_numpy(digits).long()
    return [{"image": images[k::count], "number": numbers[k::count], "digit": digits[k::count],
             "sum": digits[k::count] + numbers[k::count]} for k in range(count)]


def quiet_trainer(tmp_path, **kwargs):
    return Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_forward_contract():
    model = MNISTAdder().eval()
    logits = model(torch.rand(5, 1, 28, 28), torch.arange(5))
    assert logits.shape == (5, 29) and logits.dtype == torch.float32


class Recording(MNISTAdder):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.backward_calls, self.backward_losses, self.optimizer_steps = [], [], 0

    def manual_backward(self, loss, *args, **kwargs):
        self.backward_calls.append((self.global_step, kwargs.get("retain_graph", False)))
        self.backward_losses.append(loss.detach().clone())
        super().manual_backward(loss, *args, **kwargs)

    def on_train_batch_end(self, *args):
        self.optimizer_steps = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed


def test_manual_optimization_two_backwards_one_step_per_batch(tmp_path, synthetic_data_dir):
    model = Recording()
    dm = MNISTAdderData(data_dir=str(synthetic_data_dir), batch_size=50, val_size=100)  # 500 train: 10 batches
    trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(model, dm)
    batches = 2 * (500 // 50)
    assert trainer.global_step == batches == model.optimizer_steps
    assert model.backward_calls == [(step, retain) for step in range(batches) for retain in (True, False)]


@pytest.mark.parametrize("sum_loss, weight, used", [("cross_entropy", None, 1.0), ("mse", None, 4.0), ("mse", 2.5, 2.5)])
def test_sum_loss_weight_scales_the_second_backward(tmp_path, sum_loss, weight, used):
    torch.manual_seed(0)
    model = Recording(sum_loss=sum_loss, sum_loss_weight=weight, channels=(8, 16, 16))
    batch = fixed_batches(count=1)[0]
    with torch.no_grad():
        digit_loss, sum_loss_value = model.losses(model(batch["image"], batch["number"]), batch["digit"], batch["number"])
    quiet_trainer(tmp_path, max_steps=1).fit(model, DataLoader([batch], batch_size=None))
    assert torch.allclose(torch.stack(model.backward_losses), torch.stack([digit_loss, used * sum_loss_value]))


@pytest.mark.parametrize("sum_loss", ["cross_entropy", "mse"])
def test_overfits_a_few_fixed_batches(tmp_path, sum_loss):
    torch.manual_seed(0)
    model = MNISTAdder(sum_loss=sum_loss, channels=(8, 16, 16), optimizer=lambda p: torch.optim.Adam(p, 3e-3))
    batches = fixed_batches()
    quiet_trainer(tmp_path, max_epochs=60).fit(model, DataLoader(batches, batch_size=None))
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["image"], batch["number"])
            assert torch.equal(logits[:, :10].argmax(1), batch["digit"])
            assert torch.equal(logits[:, 10:].argmax(1), batch["sum"])


def test_mse_is_the_brier_score_summed_over_classes():
    model = MNISTAdder(sum_loss="mse")
    logits, digits, numbers = torch.randn(4, 29), torch.tensor([0, 5, 9, 9]), torch.tensor([0, 0, 9, 0])
    _, sum_loss = model.losses(logits, digits, numbers)
    expected = ((logits[:, 10:].softmax(1) - F.one_hot(digits + numbers, 19)) ** 2).sum(1).mean()
    assert torch.allclose(sum_loss, expected)


def test_agreement_pulls_the_reachable_sum_logits_and_the_digit_logits_together():
    """The term is 0 when the sum logits of number+0..number+9 are the digit logits plus any constant, grows
    otherwise, and its gradient moves both heads towards each other."""
    model, plain = MNISTAdder(agreement=0.5), MNISTAdder()
    digits, numbers = torch.tensor([3, 0, 9, 7]), torch.tensor([5, 9, 9, 0])
    logits = torch.randn(4, 29)
    logits[0, 3], logits[0, 8] = 2.0, -1.0
    for row in range(4):
        logits[row, 10 + numbers[row]:20 + numbers[row]] = logits[row, :10] + row - 2
    assert torch.allclose(model.losses(logits, digits, numbers)[1], plain.losses(logits, digits, numbers)[1])
    swapped = logits.clone()
    swapped[0, [10 + 5 + 3, 10 + 5 + 8]] = swapped[0, [10 + 5 + 8, 10 + 5 + 3]]  # the sum head ranks 3+5 and 8+5 otherwise
    swapped.requires_grad_()
    extra = model.losses(swapped, digits, numbers)[1] - plain.losses(swapped, digits, numbers)[1]
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


@pytest.mark.parametrize("kwargs", [{"sum_loss": "l1"}, {"hidden": 0}, {"gradient_clip_val": -1.0}, {"label_smoothing": 1.0},
                                    {"dropout": 1.0}, {"sum_loss_weight": 0.0}, {"agreement": -0.5},
                                    {"convs_per_stage": 0}])
def test_bad_model_arguments(kwargs):
    with pytest.raises(ValueError):
        MNISTAdder(**kwargs)


def test_sum_consistency_is_a_hand_count():
    logits = torch.full((4, 29), -5.0)
    digits, sums, numbers = [3, 0, 9, 5], [7, 2, 18, 5], torch.tensor([4, 1, 9, 0])
    for k, (d, s) in enumerate(zip(digits, sums)):
        logits[k, d], logits[k, 10 + s] = 5.0, 5.0
    # 3+4=7 agrees, 0+1=1 is not 2, 9+9=18 agrees, 5+0=5 agrees
    assert sum_consistency(logits, numbers).tolist() == [True, False, True, True]


def test_epoch_losses_weigh_every_sample_once(tmp_path):
    """Batches of 30 and 2 samples: the logged mean loss is over the 32 samples, not the mean of two means."""
    model = MNISTAdder(channels=(8, 16, 16), hidden=32).eval()
    batch = fixed_batches(count=1)[0]
    small = {k: v[:2] for k, v in batch.items()}
    large = {k: v[2:] for k, v in batch.items()}
    result = quiet_trainer(tmp_path).validate(model, DataLoader([large, small], batch_size=None), verbose=False)[0]
    with torch.no_grad():
        expected, _ = model.losses(model(batch["image"], batch["number"]), batch["digit"], batch["number"])
    assert result["val/digit_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_dropout_acts_in_training_only_and_is_absent_by_default():
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, dropout=0.5)
    images, numbers = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    assert not torch.equal(model(images, numbers), model(images, numbers))
    model.eval()
    assert torch.equal(model(images, numbers), model(images, numbers))
    # without dropout the head's layers keep their indices, so checkpoints written before the option load
    assert not any(isinstance(m, torch.nn.Dropout) for m in MNISTAdder().modules())


def test_convs_per_stage_adds_3x3_convs_at_the_pooled_size():
    one, two = MNISTAdder(channels=(8, 16, 16)), MNISTAdder(channels=(8, 16, 16), convs_per_stage=2)
    convs = [[layer for layer in m.net.image if isinstance(layer, torch.nn.Conv2d)] for m in (one, two)]
    assert [c.kernel_size[0] for c in convs[0]] == [5, 3, 3]
    assert [c.kernel_size[0] for c in convs[1]] == [5, 3, 3, 3, 3, 3]
    assert [c.out_channels for c in convs[1]] == [8, 8, 16, 16, 16, 16]
    first_stage = [type(layer).__name__ for layer in two.net.image[:7]]
    assert first_stage == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU"]  # after pooling
    images = torch.rand(2, 1, 28, 28)
    assert two.net.image_features(images).shape == one.net.image_features(images).shape == (2, 16 * 3 * 3)
    # one conv per stage keeps the layers' indices, so checkpoints written before the option load
    assert {"image.0.weight", "image.2.running_mean", "image.4.weight", "image.10.bias"} <= set(one.net.state_dict())
