"""A local page to try a trained model by hand: `python demo.py --ckpt_path CKPT [--port 7860]`
(needs `pip install -e '.[demo]'`). Draw a digit or upload a photo of one, pick a number 0-9, and see
the predicted digit, the sum, their probabilities and the 28x28 picture the net read."""

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lightning_module import MNISTAdder  # noqa: E402
from mnist_adder.data.photos import PhotoError, gray_levels, to_mnist  # noqa: E402
from mnist_adder.errors import UsageError  # noqa: E402
from mnist_adder.model.calibration import UNSURE_BELOW  # noqa: E402
from mnist_adder.model.net import split_logits  # noqa: E402
from mnist_adder.run.checkpoints import load_for_inference  # noqa: E402

INTRO = (
    "# mnist-adder\nDraw a digit (or upload a photo of one: dark ink on light paper is fine), pick a "
    "number, and the net predicts the digit and the sum."
)


DRAW, PHOTO = "Draw", "Upload a photo"  # the two tabs' labels: the answer reads the input of the one shown


def drawn(drawing: dict | None) -> Image.Image | None:
    """The sketchpad's picture, or None while nothing is drawn (a blank canvas is still an image)."""
    picture = drawing.get("composite") if drawing else None
    if picture is None or not np.asarray(picture.getchannel("A") if "A" in picture.getbands() else picture).any():
        return None
    return picture


def answer_line(digits: torch.Tensor, sums: torch.Tensor, number: int, not_digit: bool = False) -> str:
    """The result line from both heads' probabilities, e.g. `digit 3 (99.1 %) + number 4 -> sum 7 (99.0 %)`, and
    ", unsure" after it where the digit's probability is below calibration.UNSURE_BELOW; "not a digit" alone for
    a picture that looks like no digit (MNISTAdder.answer): it has no sum."""
    if not_digit:
        return "not a digit: this looks like no digit 0-9"
    digit, total = int(digits.argmax()), int(sums.argmax())
    line = f"digit {digit} ({100 * digits[digit]:.1f} %) + number {number} -> sum {total} ({100 * sums[total]:.1f} %)"
    return line + (", unsure" if digits[digit] < UNSURE_BELOW else "")


def predictor(model: MNISTAdder):
    """The page's function: (tab shown, drawing, photo, number) -> (result line, digit, sum, the 28x28 picture)."""

    @torch.inference_mode()
    def predict(tab: str, drawing: dict | None, photo: Image.Image | None, number: int):
        picture = drawn(drawing) if tab == DRAW else photo
        if picture is None:
            return "Draw a digit or upload a photo first.", None, None, None
        try:
            image = to_mnist(gray_levels(picture))
        except PhotoError as err:
            return f"Cannot read this picture: {err}", None, None, None
        logits, not_digit = model.answer(image.unsqueeze(0), torch.tensor([int(number)]))
        digits, sums = (head[0].softmax(0) for head in split_logits(logits))
        not_digit = bool(not_digit[0])
        return (
            answer_line(digits, sums, int(number), not_digit),
            None if not_digit else {str(k): float(p) for k, p in enumerate(digits)},
            None if not_digit else {str(k): float(p) for k, p in enumerate(sums)},
            Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).resize((112, 112), Image.Resampling.NEAREST),
        )

    return predict


def on_screen(evt: gr.SelectData) -> str:
    """The label of the tab just selected."""
    return evt.value


def build_page(model: MNISTAdder) -> gr.Blocks:
    with gr.Blocks(title="mnist-adder") as page:
        gr.Markdown(INTRO)
        shown = gr.State(DRAW)  # the tab on screen; Tabs has no value to read
        with gr.Row():
            with gr.Column():
                with gr.Tabs() as tabs:
                    with gr.Tab(DRAW):
                        drawing = gr.Sketchpad(
                            type="pil",
                            image_mode="RGBA",
                            label="draw a digit",
                            brush=gr.Brush(default_size=18, colors=["#000000"]),
                            elem_id="drawing",
                        )
                    with gr.Tab(PHOTO):
                        photo = gr.Image(  # image_mode None: its own mode, transparency kept, as predict reads it
                            type="pil",
                            image_mode=None,
                            sources=["upload", "clipboard"],
                            label="photo of a digit",
                            elem_id="photo",
                        )
                number = gr.Radio([str(n) for n in range(10)], value="7", label="number", elem_id="number")
                with gr.Row():
                    button = gr.Button("Predict", variant="primary", elem_id="predict")
                    clear = gr.Button("Clear", elem_id="clear")
            with gr.Column():
                result = gr.Textbox(label="prediction", elem_id="result", interactive=False)
                read = gr.Image(label="what the net read (28x28)", interactive=False, height=140, elem_id="read")
                digit = gr.Label(num_top_classes=3, label="digit", elem_id="digit")
                total = gr.Label(num_top_classes=3, label="sum", elem_id="sum")
        predict, inputs, outputs = predictor(model), [shown, drawing, photo, number], [result, digit, total, read]
        tabs.select(on_screen, None, shown)
        gr.on(  # .change, not .input: the sketchpad's input event can fire before its value holds the stroke
            [shown.change, drawing.change, photo.change, number.change, button.click],
            predict,
            inputs,
            outputs,
            trigger_mode="always_last",  # a stroke finished while one is being read is answered next, not dropped
        )
        # Clear answers the emptied tab even when nothing on it changed: the prompt line, no labels, no picture
        clear.click(lambda: (None, None), None, [drawing, photo]).then(predict, inputs, outputs)
    return page


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ckpt_path", required=True, help="a checkpoint written by `python cli.py fit`; last: the newest run's"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be within 1..65535, got {args.port}")
    try:
        model = load_for_inference(MNISTAdder, args.ckpt_path)
    except UsageError as err:
        sys.exit(f"error: {err}")
    try:
        build_page(model).launch(server_name=args.host, server_port=args.port, share=False, show_error=True)
    except OSError as err:  # the port is taken, or the host is not this machine's
        sys.exit(
            f"error: cannot serve on {args.host}:{args.port} ({str(err).split('.')[0]}): try another --port or --host"
        )


if __name__ == "__main__":
    main()
