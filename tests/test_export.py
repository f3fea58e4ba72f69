"""export.py: the ONNX file gives forward's logits and the "not a digit" flag, for any batch size, without torch."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from export import main as export_main
from lightning_module import MNISTAdder
from test_model import fixed_batches, quiet_trainer

ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)  # the pictures below, whatever tests ran before
    model = MNISTAdder(channels=(8, 16, 16), hidden=32)
    trainer = quiet_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, DataLoader(fixed_batches(), batch_size=None))
    model.temperature.copy_(torch.tensor([0.5, 2.0]))  # the file must divide by them too
    with torch.no_grad():  # ten pictures' features as the digits': the file must measure the distance to them too
        pictures = torch.rand(74, 1, 28, 28) * torch.rand(74, 1, 1, 1)  # as varied as the test's
        features = model.eval().net.image_features(pictures)
        whitening = torch.randn(len(features.T), len(features.T)) / features.std()
        model.feature_means.copy_(features[:10] @ whitening)
        model.feature_whitening.copy_(whitening)
        scores = model.not_digit_score(features[10:])  # a threshold some pictures are above and some below
    model.not_digit_above.copy_(scores.median())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    return tmp_path / "m.ckpt"


def test_onnx_matches_forward_for_any_batch_size(checkpoint, tmp_path):
    export_main(["--ckpt_path", str(checkpoint), "--output", str(tmp_path / "out" / "model.onnx")])
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images", "numbers"]
    assert [o.name for o in session.get_outputs()] == ["logits", "not_digit"]
    model = MNISTAdder.load_from_checkpoint(checkpoint).eval()
    rng = np.random.default_rng(0)
    for size in (1, 7, 256):
        images = rng.random((size, 1, 28, 28), dtype=np.float32) * rng.random((size, 1, 1, 1), dtype=np.float32)
        numbers = rng.integers(0, 10, size).astype(np.int64)
        logits, not_digit = session.run(None, {"images": images, "numbers": numbers})
        with torch.no_grad():
            expected, flags = model.answer(torch.from_numpy(images), torch.from_numpy(numbers))
            scores = model.not_digit_score(model.net.image_features(torch.from_numpy(images)))
        assert logits.shape == (size, 29)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
        flags = flags.numpy()
        assert not_digit.dtype == bool and (size < 256 or 0 < flags.sum() < size)
        clear = ((scores - model.not_digit_above).abs() > 1e-3 * scores.abs()).numpy()
        assert (not_digit[clear] == flags[clear]).all() and (size < 256 or clear.mean() > 0.5)  # near it: either


def test_bad_checkpoint_is_one_line(tmp_path):
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as end:
        export_main(["--ckpt_path", str(tmp_path / "bad.ckpt"), "--output", str(tmp_path / "m.onnx")])
    assert "not a readable checkpoint" in str(end.value.code) and not (tmp_path / "m.onnx").exists()


def test_an_output_that_is_a_folder_is_refused_before_the_export(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr("export.torch.onnx.export", None)  # reached, it would fail with a TypeError
    with pytest.raises(SystemExit, match="'out' is a folder: name the file, e.g. out/model.onnx"):
        monkeypatch.chdir(tmp_path)
        (tmp_path / "out").mkdir()
        export_main(["--ckpt_path", str(checkpoint), "--output", "out"])
