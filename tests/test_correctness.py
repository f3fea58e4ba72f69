"""Bugs that leave a run working but wrong: labels paired with the wrong image, numbers that stay put,
all-pairs labels in the wrong order, a number that never reaches the net, a step that does not learn
what it should. Synthetic images carry their digit in their pixels, so every label can be read back."""

import copy
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning import Callback

from conftest import SYNTHETIC_SIZES
from datamodule import MNISTAdderData
from lightning_module import MNISTAdder
from mnist_adder.model.net import DualInputNet
from mnist_adder.run.divergence import StopOnNonFiniteLoss
from test_model import fixed_batches, quiet_trainer


def digit_in_pixels(images: torch.Tensor) -> torch.Tensor:
    """The digit a synthetic image shows: d lights rows 2+2d and 3+2d (conftest.synthetic_digits)."""
    rows = images.reshape(len(images), 28, 28)[:, :, 4:24].float().mean(2)
    return (rows.argmax(1) - 2) // 2


def plain_data(data_dir, **kwargs) -> MNISTAdderData:
    data = MNISTAdderData(data_dir=str(data_dir), val_size=100, batch_size=50, rotate=0, translate=0, scale=0, **kwargs)
    data.setup("fit")
    data.setup("test")
    return data


def test_every_loader_pairs_each_image_with_its_own_label(synthetic_data_dir):
    data = plain_data(synthetic_data_dir)
    loaders = {
        "train": data.train_dataloader(),
        "val": data.val_dataloader()[0],
        "feature images": data.val_dataloader()[1],
        "test": data.test_dataloader()[0],
        "all pairs": data.test_dataloader()[1],
    }
    for name, loader in loaders.items():
        seen = 0
        for batch in loader:
            digit = batch["digit"] >= 0  # else a generated picture that is no digit (train only): no digit, no sum
            assert torch.equal(batch["digit"][digit], digit_in_pixels(batch["image"][digit])), name
            assert (batch["sum"][~digit] == -1).all() and (name == "train" or digit.all()), name
            digits = batch["digit"][digit].view(-1, *[1] * (batch["number"].dim() - 1))
            assert torch.equal(batch["sum"][digit], digits + batch["number"][digit]), name
            seen += len(batch["digit"])
        # the feature images: every training image, as there are fewer than feature_images' 10,000
        assert seen == {"train": 550 // 50 * 50, "val": 100, "feature images": 500}.get(name, SYNTHETIC_SIZES["t10k"])


def test_split_is_a_partition_that_depends_on_the_seed(synthetic_data_dir):
    def images(data):
        return [{bytes(x.numpy()) for x in s.images} for s in (data.train_set, data.val_set, data.feature_set)]

    train, val, features = images(plain_data(synthetic_data_dir, non_digits=0, feature_images=300))
    assert len(train) + len(val) == SYNTHETIC_SIZES["train"] and not train & val
    assert len(features) == 300 and features <= train  # training images: none of the validation
    assert images(plain_data(synthetic_data_dir, seed=1, non_digits=0))[1] != val


def test_val_and_test_numbers_are_the_same_in_every_run_and_uniform(synthetic_data_dir):
    a, b, other = plain_data(synthetic_data_dir), plain_data(synthetic_data_dir), plain_data(synthetic_data_dir, seed=1)
    for name in ("val_set", "test_set"):
        assert torch.equal(getattr(a, name).numbers, getattr(b, name).numbers)
        assert not torch.equal(getattr(a, name).numbers, getattr(other, name).numbers)  # the seed decides them
        assert set(getattr(a, name).numbers.tolist()) == set(range(10))
    assert not torch.equal(a.val_set.numbers, a.test_set.numbers[: len(a.val_set)])  # two streams, not one


@pytest.mark.parametrize("choice, loaders", [("fixed", [1]), ("all", [2]), ("both", [1, 2])])
def test_test_pairs_chooses_the_loaders(synthetic_data_dir, choice, loaders):
    data = plain_data(synthetic_data_dir, test_pairs=choice)
    assert [next(iter(loader))["number"].dim() for loader in data.test_dataloader()] == loaders


def test_images_are_scaled_to_exactly_0_to_1(synthetic_data_dir):
    batch = plain_data(synthetic_data_dir).val_set.__getitems__(list(range(20)))
    assert batch["image"].max() == 1.0 and batch["image"].min() == 0.0  # the synthetic bars are 255, the noise 0..59


def test_augmentation_is_a_rotation_zoom_and_shift(synthetic_data_dir, monkeypatch):
    data = MNISTAdderData(data_dir=str(synthetic_data_dir), rotate=30.0, translate=0.1, scale=0.2)
    seen = []
    real_affine_grid = F.affine_grid
    monkeypatch.setattr(F, "affine_grid", lambda theta, *a, **k: seen.append(theta) or real_affine_grid(theta, *a, **k))
    data.augment(torch.rand(64, 1, 28, 28), torch.Generator().manual_seed(0))
    linear, shift = seen[0][:, :, :2], seen[0][:, :, 2]
    zoom = linear.det().rsqrt()  # the map samples the input at 1/zoom
    assert torch.allclose(linear @ linear.transpose(1, 2), torch.eye(2) / zoom[:, None, None] ** 2, atol=1e-6)
    assert ((zoom - 1).abs() <= 0.2 + 1e-6).all() and (shift.abs() <= 0.2 + 1e-6).all()
    angles = torch.atan2(linear[:, 1, 0], linear[:, 0, 0]).rad2deg()
    assert angles.abs().max() <= 30 + 1e-4 and angles.abs().max() > 20  # up to 30 degrees, both ways
    assert (angles > 0).any() and (angles < 0).any()


def test_translate_is_the_share_of_the_picture_a_full_draw_shifts_it_by():
    """translate 0.25 and a full draw move a lone pixel a quarter of 28 pixels, across only."""
    from datamodule import affine_augment

    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 14, 10] = 1
    draws = (torch.zeros(1), torch.zeros(1), torch.tensor([[1.0, 0.0]]))
    moved = affine_augment(image, draws, rotate=0, translate=0.25, scale=0)
    row, column = divmod(int(moved.flatten().argmax()), 28)
    assert (row, abs(column - 10)) == (14, 7)
    assert moved.max() == pytest.approx(1.0)


class RecordPairs(Callback):
    """The number each training image (by its index in the train set) was paired with, and the order the
    images came in, per epoch."""

    def __init__(self):
        self.numbers, self.order = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        epoch = self.numbers.setdefault(trainer.current_epoch, {})
        epoch.update(zip(batch["index"].tolist(), batch["number"].tolist(), strict=True))
        self.order.setdefault(trainer.current_epoch, []).extend(batch["index"].tolist())
        assert torch.equal(batch["digit"], digit_in_pixels(trainer.datamodule.train_set.images[batch["index"]]))


def test_training_through_the_loader_redraws_numbers_every_epoch(tmp_path, synthetic_data_dir):
    data = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100, batch_size=50, non_digits=0)
    record = RecordPairs()
    quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[record]).fit(
        MNISTAdder(channels=(8, 16, 16), hidden=32), data
    )
    first, second = record.numbers[0], record.numbers[1]
    assert len(first) == len(second) == 500  # every training image, once an epoch
    changed = sum(first[i] != second[i] for i in first) / len(first)
    assert changed > 0.8  # ~0.9 expected of fresh draws
    assert record.order[0] != record.order[1] and sorted(record.order[0]) == sorted(record.order[1])  # reshuffled


class OracleNet(DualInputNet):
    """Reads the digit from the pixels and adds the number: exact logits, through the real net's
    forward and paired_logits."""

    def image_features(self, images):  # the digit, one-hot, in features of the real net's size
        return F.pad(F.one_hot(digit_in_pixels(images), 10).float(), (0, self.feature_size - 10))

    def logits(self, image_features, numbers):
        digits = image_features.argmax(1)
        return torch.cat([F.one_hot(digits, 10), F.one_hot(digits + numbers, 19)], 1).float() * 10


def test_evaluation_counts_a_perfect_net_as_perfect(tmp_path, synthetic_data_dir):
    """Any label misaligned in validation, the fixed test pairs or the 100,000-pair expansion, or a metric
    fed the wrong head, shows as less than 100 %."""
    model = MNISTAdder(channels=(8, 16, 16), hidden=32)
    model.net = OracleNet((8, 16, 16), 32, 32)
    data = plain_data(synthetic_data_dir)
    val = quiet_trainer(tmp_path).validate(model, data, verbose=False)[0]
    assert val["val/digit_acc"] == val["val/sum_acc"] == val["val/sum_consistency"] == 1.0
    test = {k: v for r in quiet_trainer(tmp_path).test(model, data, verbose=False) for k, v in r.items()}
    for key in (
        "test/digit_acc",
        "test/sum_acc",
        "test/digit_acc_all_pairs",
        "test/sum_acc_all_pairs",
        "test/sum_consistency_all_pairs",
    ):
        assert test[key] == 1.0, key


def test_divergence_in_an_epochs_last_steps_stops_the_run(tmp_path, synthetic_data_dir):
    """10 steps, fewer than the check interval, and no checkpoint: the check at the epoch's end must see it."""
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, optimizer=partial(torch.optim.SGD, lr=1e30), scheduler=None)
    data = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100, batch_size=50)
    stop = StopOnNonFiniteLoss()
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[stop])
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.fit(model, data)
    model = MNISTAdder(channels=(8, 16, 16), hidden=32, scheduler=None)  # the same callback, a sound fit: no stop
    quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[stop]).fit(model, data)


def test_the_number_reaches_the_sum_logits():
    torch.manual_seed(0)
    model = MNISTAdder(channels=(8, 16, 16), hidden=32).eval()
    images = torch.rand(4, 1, 28, 28)
    a, b = model(images, torch.zeros(4, dtype=torch.long)), model(images, torch.full((4,), 7))
    assert (a[:, 10:] - b[:, 10:]).abs().min() > 0  # every sum logit of every image moves


def test_two_steps_match_plain_pytorch_sgd(tmp_path):
    """The manual step equals, to float rounding, plain PyTorch doing what the design says: the digit loss
    backward, then the weighted sum loss, one SGD step, the gradients cleared between steps."""
    torch.manual_seed(0)
    model = MNISTAdder(
        channels=(8, 16, 16),
        hidden=32,
        sum_loss_weight=2.0,
        label_smoothing=0.1,
        agreement=0.0,
        optimizer=partial(torch.optim.SGD, lr=0.5),
        scheduler=None,
    )
    reference, initial = copy.deepcopy(model.net), copy.deepcopy(model.net)
    batches = fixed_batches(count=2)
    quiet_trainer(tmp_path, max_epochs=1).fit(model, torch.utils.data.DataLoader(batches, batch_size=None))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for batch in batches:
        logits = reference(batch["image"], batch["number"])
        optimizer.zero_grad()
        F.cross_entropy(logits[:, :10], batch["digit"], label_smoothing=0.1).backward(retain_graph=True)
        (2.0 * F.cross_entropy(logits[:, 10:], batch["sum"], label_smoothing=0.1)).backward()
        optimizer.step()
    for (name, trained), expected in zip(model.net.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(trained, expected, atol=1e-6), name
    assert all(not torch.equal(a, b) for a, b in zip(model.net.parameters(), initial.parameters(), strict=True))


def test_the_scheduler_steps_every_batch_and_every_epoch(tmp_path, synthetic_data_dir):
    for interval, expected in (("step", 20), ("epoch", 2)):
        model = MNISTAdder(
            channels=(8, 16, 16),
            hidden=32,
            scheduler_interval=interval,
            scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=None),
        )
        data = MNISTAdderData(data_dir=str(synthetic_data_dir), val_size=100, batch_size=50, non_digits=0)
        trainer = quiet_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
        trainer.fit(model, data)
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        assert scheduler.last_epoch == scheduler.total_steps == expected, interval
        assert abs(trainer.optimizers[0].param_groups[0]["lr"] - 0.1 / 25) > 1e-4  # moved from where it starts


def test_mse_sum_loss_is_the_brier_score():
    model = MNISTAdder(sum_loss="mse")
    digits, numbers = torch.tensor([0, 9, 9]), torch.tensor([0, 0, 9])
    sums = digits + numbers
    batch = {"digit": digits, "number": numbers, "sum": sums}
    confident = torch.full((3, 29), -1e4)
    confident[torch.arange(3), 10 + sums] = 1e4
    assert model.losses(confident, batch).sum_loss.item() < 1e-6  # right and sure: 0
    wrong = torch.full((3, 29), -1e4)
    wrong[torch.arange(3), 10 + (sums + 1) % 19] = 1e4
    assert abs(model.losses(wrong, batch).sum_loss.item() - 2.0) < 1e-6  # sure and wrong: 1 + 1
    uniform = torch.zeros(3, 29)
    assert abs(model.losses(uniform, batch).sum_loss.item() - 18 / 19) < 1e-6  # (18/19)^2 + 18/19^2


@pytest.mark.parametrize("sum_loss", ["cross_entropy", "mse"])
def test_a_picture_that_is_no_digit_counts_only_against_equal_digit_probabilities(sum_loss):
    """Outlier exposure: the digit -1 adds not_digit_weight times the cross-entropy of its digit logits against
    1/10 each (log 10 - mean log-softmax) to the digit loss, and nothing to the sum loss."""
    torch.manual_seed(0)
    logits, numbers = torch.randn(6, 29), torch.tensor([1, 2, 3, 4, 5, 6])
    digits = torch.tensor([3, 1, 4, 1, -1, -1])
    batch = {"digit": digits, "number": numbers, "sum": torch.tensor([4, 3, 7, 5, -1, -1])}
    first, last = ({key: value[rows] for key, value in batch.items()} for rows in (slice(4), slice(4, None)))
    model = MNISTAdder(sum_loss=sum_loss, not_digit_weight=0.5, label_smoothing=0.0, agreement=0.0)
    mixed, alone = model.losses(logits, batch), model.losses(logits[:4], first)
    uniform = -F.log_softmax(logits[4:, :10], 1).mean(1).mean()
    torch.testing.assert_close(mixed.digit_loss, alone.digit_loss + 0.5 * uniform)
    torch.testing.assert_close(mixed.sum_loss, alone.sum_loss)
    off = MNISTAdder(sum_loss=sum_loss, not_digit_weight=0.0, label_smoothing=0.0, agreement=0.0)
    torch.testing.assert_close(off.losses(logits, batch).digit_loss, alone.digit_loss)
    only = model.losses(logits[4:], last)  # a batch with no digit at all: finite, no NaN
    torch.testing.assert_close(only.digit_loss, 0.5 * uniform)
    assert only.sum_loss == 0


def test_on_device_sets_keep_every_tensor_on_the_device(synthetic_data_dir):
    """On the `meta` device, which any CPU has: a tensor left behind, or indexed from the host, fails."""
    data = plain_data(synthetic_data_dir)
    for dataset in (data.train_set, data.val_set, data.test_set, data.all_pairs_set):
        dataset.to(torch.device("meta"))
        batch = dataset.__getitems__([0, 3, 5])
        assert all(t.is_meta for t in batch.values())
    data.train_set.set_epoch(1)
    assert data.train_set.numbers.is_meta


def test_pinned_memory_follows_the_runs_device_not_the_machine(synthetic_data_dir):
    data = plain_data(synthetic_data_dir)
    for device, on_device, pinned in (("cpu", False, False), ("cuda", False, True), ("cuda", True, False)):
        data.trainer = SimpleNamespace(
            strategy=SimpleNamespace(root_device=torch.device(device)),
            world_size=1,
            global_rank=0,
            state=SimpleNamespace(fn="fit"),
        )
        data.hparams.on_device = on_device
        assert data.val_dataloader()[0].pin_memory is pinned, (device, on_device)
