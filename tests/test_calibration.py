"""Temperature scaling: fitted on every validation pass, held in the model and so in every checkpoint it saves, used
by forward, reported; a checkpoint without a validation behind it says so."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from cli import cli_main
from lightning_module import MNISTAdder
from mnist_adder.model.calibration import (
    NOT_DIGIT_SHARE,
    UNSURE_BELOW,
    ValidationFit,
    calibration_error,
    fit_temperature,
)
from mnist_adder.model.feature_distance import RIDGE, FeatureStats, feature_distance
from mnist_adder.model.net import DualInputNet, split_logits
from test_bad_inputs import ends_in_clear_error
from test_cli import ROOT, SMALL, val_curve


def test_fit_temperature_finds_the_temperature_that_made_the_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=generator) * 3
    for true_temperature in (0.5, 2.0):
        labels = torch.multinomial((logits / true_temperature).softmax(1), 1, generator=generator).squeeze(1)
        assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.05)


def test_calibration_error_is_the_gap_between_confidence_and_accuracy():
    probabilities = torch.tensor([[0.9, 0.1]] * 10)  # 90 % sure, right 6 times in 10: ECE 0.3
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert calibration_error(2)(probabilities, labels).item() == pytest.approx(0.3)


def test_forward_divides_each_head_by_its_temperature_and_keeps_every_answer():
    model = MNISTAdder(channels=(8, 16, 16), hidden=32).eval()
    model.temperature.copy_(torch.tensor([0.5, 4.0]))
    images, numbers = torch.rand(64, 1, 28, 28), torch.arange(64) % 10
    with torch.no_grad():
        raw, calibrated = split_logits(model.net(images, numbers)), split_logits(model(images, numbers))
    torch.testing.assert_close(calibrated.digit, raw.digit / 0.5)
    torch.testing.assert_close(calibrated.sum, raw.sum / 4.0)
    for before, after in zip(raw, calibrated, strict=True):
        assert torch.equal(before.argmax(1), after.argmax(1))


@pytest.fixture
def fitted(in_tmp):
    """Three epochs of 11 steps (500 digits and 50 non-digits), every epoch's checkpoint kept (monitor: epoch),
    last.ckpt every 3 steps instead of every epoch: the last is written at step 33, before the third epoch's
    validation."""
    keep_all = ["--checkpoint.monitor", "epoch", "--checkpoint.save_top_k", "-1"]
    every = ["--last_checkpoint.every_n_train_steps", "3"]
    cli = cli_main(["fit", "--trainer.max_epochs", "3", *keep_all, *every, *SMALL])
    return cli, in_tmp / "lightning_logs" / "version_0"


def validation_temperatures(model: MNISTAdder, loader: DataLoader) -> torch.Tensor:
    with torch.no_grad():
        batches = [(model.net(b["image"], b["number"]), b["digit"], b["sum"]) for b in loader]
    logits, digits, sums = (torch.cat(parts) for parts in zip(*batches))
    return torch.tensor([fit_temperature(split_logits(logits).digit, digits), fit_temperature(logits[:, 10:], sums)])


def test_every_checkpoint_holds_the_temperatures_of_its_latest_validation_and_their_step(fitted):
    cli, run = fitted
    loader = cli.datamodule.val_dataloader()[0]
    assert sum(len(batch["digit"]) for batch in loader) == 100  # every validation pair, no test image
    best = sorted(run.glob("checkpoints/best-*.ckpt"))
    assert len(best) == 3
    temperatures = []
    for path in best:
        checkpoint = torch.load(path, weights_only=True)
        model = MNISTAdder.load_from_checkpoint(path, map_location="cpu").eval()
        assert int(model.calibrated_step) == checkpoint["global_step"], path.name  # fitted on these very weights
        torch.testing.assert_close(validation_temperatures(model, loader), model.temperature, rtol=1e-4, atol=0)
        temperatures.append(model.temperature.clone())
    assert not torch.equal(temperatures[0], temperatures[1]) and not torch.equal(temperatures[1], temperatures[2])
    # a step-interval file written before a validation holds the one before's temperatures, and says at which step
    with pytest.warns(UserWarning, match="fitted at step 22, its weights are from step 33"):
        model = MNISTAdder.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    torch.testing.assert_close(model.temperature, temperatures[1])


def test_the_not_a_digit_threshold_refuses_the_highest_scoring_of_the_validation_digits_it_was_fitted_on(fitted):
    cli, run = fitted
    assert MNISTAdder().not_digit_above == float("inf")  # before any validation, no picture is refused
    model = MNISTAdder.load_from_checkpoint(sorted(run.glob("checkpoints/best-*.ckpt"))[-1], map_location="cpu")
    with torch.no_grad():
        batches = list(cli.datamodule.val_dataloader()[0])
        refused = torch.cat([model.eval().predict_step(batch, 0)["not_digit"] for batch in batches])
    assert len(refused) == 100 and int(refused.sum()) == 1  # NOT_DIGIT_SHARE: the one highest score of 100
    # the distance is measured to the feature images (training digits, as they are) through the net validated
    stats = FeatureStats(model.net.feature_size)
    feature_set = cli.datamodule.feature_set
    batch = feature_set.__getitems__(list(range(len(feature_set))))
    with torch.no_grad():
        stats.update(model.net.image_features(batch["image"]), batch["digit"])
    means, whitening = stats.compute()
    torch.testing.assert_close(model.feature_whitening @ model.feature_whitening.T, whitening @ whitening.T)
    torch.testing.assert_close(model.feature_means @ model.feature_whitening.T, means @ whitening @ whitening.T)


def test_the_threshold_leaves_not_digit_share_of_the_digits_above_it():
    generator = torch.Generator().manual_seed(0)
    logits, digits = torch.randn(4000, 29, generator=generator) * 4, torch.randint(0, 10, (4000,), generator=generator)
    features = torch.rand(4000, 3, generator=generator) * 50
    fit = ValidationFit()
    for part in range(2):  # two batches
        rows = slice(2000 * part, 2000 * (part + 1))
        fit.update(logits[rows], features[rows], digits[rows], torch.randint(0, 19, (2000,), generator=generator))
    above = fit.compute(lambda f: f.norm(dim=1))[1]  # the score of each picture's features
    assert (features.norm(dim=1) > above).float().mean().item() == pytest.approx(NOT_DIGIT_SHARE, abs=1 / 4000)
    assert fit.compute(lambda f: -f.norm(dim=1))[1] < 0  # another score, another threshold: nothing cached


def test_the_feature_distance_is_the_smallest_mahalanobis_distance_to_a_training_digit_s_mean():
    """Against the textbook formula: the digits' own means, one covariance of the digits around them (the
    non-digits, -1, left out), inverted with the ridge."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 6, generator=generator) * 3
    digits = torch.cat([torch.arange(10).repeat(30), torch.full((20,), -1)])
    features = centres[digits.clamp(min=0)] + torch.randn(320, 6, generator=generator) * torch.arange(1.0, 7.0)
    features[digits < 0] += 40  # far off: they would move every mean and the covariance
    stats = FeatureStats(6)
    for rows in torch.arange(320).split(100):  # in batches, as training gives them
        stats.update(features[rows], digits[rows])
    means, whitening = stats.compute()
    real = features[digits >= 0].double()
    true_means = torch.stack([real[digits[digits >= 0] == d].mean(0) for d in range(10)])
    centred = real - true_means[digits[digits >= 0]]
    covariance = centred.T @ centred / len(real)
    precision = torch.linalg.inv(covariance + RIDGE * covariance.diagonal().mean() * torch.eye(6, dtype=torch.float64))
    queries = torch.randn(50, 6, generator=generator) * 5
    expected = torch.stack([((queries - m) @ precision * (queries - m)).sum(1) for m in true_means]).min(0).values
    torch.testing.assert_close(means, true_means.float())
    torch.testing.assert_close(feature_distance(queries, means @ whitening, whitening), expected.float())


def test_the_feature_fit_and_distance_are_the_same_under_bf16_autocast():
    """Validation and predict run under the Trainer's autocast (bf16-mixed in gpu.yaml); the sums of products
    and the distance stay in float32, or their rounding would swamp the spread."""
    generator = torch.Generator().manual_seed(0)
    features, digits = torch.rand(256, 64, generator=generator) * 30, torch.randint(0, 10, (256,), generator=generator)
    plain, mixed = FeatureStats(64), FeatureStats(64)
    plain.update(features, digits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed.update(features, digits)
    torch.testing.assert_close(mixed.products, plain.products)
    means, whitening = plain.compute()
    whitened_means = means @ whitening
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distances = feature_distance(features, whitened_means, whitening)
    torch.testing.assert_close(distances, feature_distance(features, whitened_means, whitening))


def test_on_a_trained_model_the_calibration_error_after_the_temperatures_is_below_the_one_before(in_tmp):
    """fast.yaml's recipe, four short epochs: digit accuracy near 100 %, sum near 80 % on the synthetic digits."""
    fast = ["--config", str(ROOT / "configs" / "fast.yaml"), "--trainer.max_epochs", "4"]
    cli_main(["fit", *fast, *SMALL, "--data.batch_size", "20"])
    run = in_tmp / "lightning_logs" / "version_0"
    last_validation = {tag: values[-1] for tag, values in val_curve(run).items()}
    for head in ("digit", "sum"):
        assert last_validation[f"val/{head}_ece"] < last_validation[f"val/{head}_ece_uncalibrated"]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(checkpoint["state_dict"]["calibrated_step"]) == checkpoint["global_step"]
    results = json.loads((run / "results.json").read_text())
    best = MNISTAdder.load_from_checkpoint(results["checkpoint"], map_location="cpu")
    assert list(results["temperature"].values()) == pytest.approx(best.temperature.tolist())
    for head in ("digit", "sum"):
        assert results[f"test/{head}_ece"] < results[f"test/{head}_ece_uncalibrated"]


def test_validate_reports_the_calibration_error_with_and_without_the_checkpoint_s_temperatures(fitted, monkeypatch):
    """`validate` measures the checkpoint as it was saved: it fits no temperature and no threshold of its own, and
    runs no feature image through the net."""
    cli, run = fitted
    checkpoint = torch.load(sorted(run.glob("checkpoints/best-*.ckpt"))[-1], weights_only=True)
    saved = {
        "temperature": torch.tensor([2.0, 0.5]),
        "not_digit_above": torch.tensor(-1.0),
        "feature_means": torch.ones_like(checkpoint["state_dict"]["feature_means"]),
    }
    checkpoint["state_dict"].update(saved)  # far from what a fit on the validation logits would give
    torch.save(checkpoint, run / "other.ckpt")
    seen, image_features = [], DualInputNet.image_features
    monkeypatch.setattr(
        DualInputNet, "image_features", lambda net, images: seen.append(len(images)) or image_features(net, images)
    )
    cli = cli_main(["validate", "--ckpt_path", str(run / "other.ckpt"), *SMALL])
    assert all(torch.equal(getattr(cli.model, name), value) for name, value in saved.items())
    assert sum(seen) == len(cli.datamodule.val_set)
    metrics = cli.trainer.callback_metrics
    batch = next(iter(cli.datamodule.val_dataloader()[0]))
    with torch.no_grad():
        raw = cli.model.net.eval()(batch["image"], batch["number"])
    for suffix, logits in (("_uncalibrated", raw), ("", raw[:, :10] / 2.0)):
        expected = calibration_error(10)(split_logits(logits).digit.softmax(1), batch["digit"])
        assert metrics[f"val/digit_ece{suffix}"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_a_checkpoint_saved_before_any_validation_says_it_is_uncalibrated(in_tmp, capsys):
    cli_main(["fit", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0", *SMALL])
    last = in_tmp / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match="saved before any validation: its probabilities are not calibrated"):
        model = MNISTAdder.load_from_checkpoint(last, map_location="cpu")
    assert torch.equal(model.temperature, torch.ones(2)) and int(model.calibrated_step) == -1
    with pytest.warns(UserWarning, match="not calibrated") as warned:
        cli_main(["test", "--ckpt_path", str(last), *SMALL])
    assert len([w for w in warned if "not calibrated" in str(w.message)]) == 1


def test_a_checkpoint_of_an_older_version_is_refused_in_one_line(fitted, capsys):
    cli, run = fitted
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["compile"] = False
    old = run / "old.ckpt"
    torch.save(checkpoint, old)
    message = ends_in_clear_error(["test", "--ckpt_path", str(old), *SMALL], capsys)
    assert "another version of this model" in message and "model.compile" in message


def test_predict_gives_the_calibrated_probabilities(fitted):
    cli, run = fitted
    best = sorted(run.glob("checkpoints/best-*.ckpt"))[-1]
    model = MNISTAdder.load_from_checkpoint(best, map_location="cpu").eval()
    batch = next(iter(DataLoader(cli.datamodule.test_set, batch_size=50, collate_fn=lambda b: b)))
    predicted = model.predict_step(batch, 0)
    with torch.no_grad():
        digit_logits = split_logits(model.net(batch["image"], batch["number"])).digit
    expected = (digit_logits / model.temperature[0]).softmax(1).max(1).values
    torch.testing.assert_close(predicted["digit_prob"], expected)
    assert not torch.allclose(predicted["digit_prob"], digit_logits.softmax(1).max(1).values)


def test_unsure_is_a_calibrated_digit_probability_below_the_threshold():
    model = MNISTAdder(channels=(8, 16, 16), hidden=32).eval()
    batch = {"image": torch.rand(16, 1, 28, 28), "number": torch.arange(16) % 10}
    for digit_temperature, unsure in ((1e-3, False), (1e3, True)):  # all but certain; close to a tenth each
        model.temperature.copy_(torch.tensor([digit_temperature, 1.0]))
        predicted = model.predict_step(batch, 0)
        assert predicted["unsure"].tolist() == [unsure] * 16
        assert torch.equal(predicted["unsure"], predicted["digit_prob"] < UNSURE_BELOW)


def test_without_feature_images_no_picture_is_answered_not_a_digit(in_tmp):
    cli = cli_main(["fit", "--trainer.max_epochs", "1", *SMALL, "--data.feature_images", "0"])
    assert len(cli.datamodule.val_dataloader()) == 1  # the validation pairs alone
    with torch.no_grad():
        batches = list(cli.datamodule.val_dataloader()[0])
        refused = torch.cat([cli.model.eval().predict_step(batch, 0)["not_digit"] for batch in batches])
    assert len(refused) == 100 and not refused.any()
