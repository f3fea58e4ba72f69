"""Temperature scaling: fitted on validation after fit, stored in the checkpoints, used by forward, reported."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from cli import cli_main
from lightning_module import MNISTAdder
from mnist_adder.model.calibration import UNSURE_BELOW, calibration_error, fit_temperature, fit_temperatures
from mnist_adder.model.net import split_logits
from test_cli import SMALL


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
    cli = cli_main(["fit", "--trainer.max_epochs", "2", *SMALL])
    return cli, in_tmp / "lightning_logs" / "version_0"


def test_fit_writes_the_temperatures_of_each_checkpoints_weights_fitted_on_validation(fitted):
    cli, run = fitted
    loader = cli.datamodule.calibration_dataloader()
    assert sum(len(batch["digit"]) for batch in loader) == 100  # every validation pair, no test image
    for path in (*run.glob("checkpoints/best-*.ckpt"), run / "checkpoints" / "last.ckpt"):
        model = MNISTAdder.load_from_checkpoint(path, map_location="cpu")
        stored = model.temperature.clone()
        assert not torch.equal(stored, torch.ones(2)), path.name
        torch.testing.assert_close(fit_temperatures(model, loader), stored, rtol=1e-4, atol=0)
    results = json.loads((run / "results.json").read_text())
    best = MNISTAdder.load_from_checkpoint(results["checkpoint"], map_location="cpu")
    assert list(results["temperature"].values()) == pytest.approx(best.temperature.tolist())
    for head in ("digit", "sum"):
        assert 0 <= results[f"test/{head}_ece"] <= 1 and 0 <= results[f"test/{head}_ece_uncalibrated"] <= 1
        assert results[f"test/{head}_ece"] != results[f"test/{head}_ece_uncalibrated"]


def test_validate_reports_the_calibration_error_with_and_without_the_temperatures(fitted):
    cli, run = fitted
    best = next(run.glob("checkpoints/best-*.ckpt"))
    cli = cli_main(["validate", "--ckpt_path", str(best), *SMALL])
    metrics = cli.trainer.callback_metrics
    model = MNISTAdder.load_from_checkpoint(best, map_location="cpu").eval()
    batch = next(iter(cli.datamodule.calibration_dataloader()))
    with torch.no_grad():
        raw, scaled = model.net(batch["image"], batch["number"]), model(batch["image"], batch["number"])
    for suffix, logits in (("_uncalibrated", raw), ("", scaled)):
        expected = calibration_error(10)(split_logits(logits).digit.softmax(1), batch["digit"])
        assert metrics[f"val/digit_ece{suffix}"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_a_checkpoint_saved_before_calibration_loads_with_temperature_one_and_says_so_once(fitted, capsys):
    cli, run = fitted
    best = next(run.glob("checkpoints/best-*.ckpt"))
    checkpoint = torch.load(best, weights_only=False)
    del checkpoint["state_dict"]["temperature"]
    old = run / "old.ckpt"
    torch.save(checkpoint, old)
    with pytest.warns(UserWarning, match="saved before calibration") as warned:
        model = MNISTAdder.load_from_checkpoint(old, map_location="cpu")
    assert torch.equal(model.temperature, torch.ones(2)) and len(warned) == 1
    with pytest.warns(UserWarning, match="saved before calibration") as warned:
        cli_main(["test", "--ckpt_path", str(old), *SMALL])
    assert len([w for w in warned if "saved before calibration" in str(w.message)]) == 1


def test_predict_gives_the_calibrated_probabilities(fitted):
    cli, run = fitted
    best = next(run.glob("checkpoints/best-*.ckpt"))
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
