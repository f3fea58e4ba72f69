"""A trained checkpoint as ONNX, to run without torch or Lightning:
`python export.py --ckpt_path CKPT --output model.onnx` (needs `pip install -e '.[export]'`).

The file keeps `forward`'s contract: inputs `images` float32 [B,1,28,28] in [0,1] (white digit on
black, as `photos.to_mnist` makes them) and `numbers` int64 [B] in 0..9; output `logits` float32
[B,29] (10 for the digit, then 19 for the sum 0..18: `net.split_logits`), each head's divided by its
temperature, so that their softmax gives the calibrated probabilities; and `not_digit` bool [B]: the picture
looks like no digit at all (`MNISTAdder.answer`). B is free.
"""

import argparse
import sys
from pathlib import Path

import torch

from lightning_module import MNISTAdder
from mnist_adder.data.mnist_files import check_writable, write_atomic
from mnist_adder.errors import UsageError
from mnist_adder.run.checkpoints import load_for_inference

OPSET = 18


class Answer(torch.nn.Module):
    """`MNISTAdder.answer`: `forward`'s logits and the "not a digit" flag, the two outputs of the file."""

    def __init__(self, model: MNISTAdder):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, numbers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.answer(images, numbers)


def export(ckpt_path: str, output: Path) -> Path:
    """Write the checkpoint's model (net and temperatures) to `output` as ONNX (atomically); UsageError for a bad
    checkpoint."""
    if output.is_dir():
        raise UsageError(f"output {str(output)!r} is a folder: name the file, e.g. {output / 'model.onnx'}")
    check_writable(output.parent, "output's folder")
    model = load_for_inference(MNISTAdder, ckpt_path)
    model.net.to(memory_format=torch.contiguous_format)
    example = (torch.rand(2, 1, 28, 28), torch.tensor([3, 7]))
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(
        Answer(model).eval(),
        example,
        input_names=["images", "numbers"],
        output_names=["logits", "not_digit"],
        dynamic_shapes={"images": {0: batch}, "numbers": {0: batch}},
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    try:
        write_atomic(output, program.model_proto.SerializeToString())
    except OSError as err:  # a full disk, say: nothing is left under the name
        raise UsageError(f"cannot write {output}: {err.strerror or err}") from None
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt_path", required=True, help="a checkpoint written by `python cli.py fit`; last: the newest run's"
    )
    parser.add_argument("--output", type=Path, default=Path("model.onnx"))
    args = parser.parse_args(argv)
    try:
        print(f"written: {export(args.ckpt_path, args.output)}")
    except (UsageError, ImportError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
