"""Pages tested as a person uses them, in a real headless Chromium (Debian's package, driven by
Playwright): the demo page, and TensorBoard's dashboard after a default run. With SCREENSHOTS=DIR set,
the screenshots are kept there (the README's come from `SCREENSHOTS=docs pytest -m slow tests/test_browser.py`)."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from printed import printed_digit
from test_cli import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = "/usr/bin/chromium"
QUIET_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited before serving"
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing served at {url}")


@pytest.fixture
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=QUIET_FLAGS)
        yield browser.new_page(viewport={"width": 1200, "height": 900})
        browser.close()


def keep_screenshot(page, name: str) -> None:
    if os.environ.get("SCREENSHOTS"):
        Path(os.environ["SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["SCREENSHOTS"]) / name), full_page=True)


@pytest.fixture
def serve():
    """Starts a server's command, waits until `url` answers, and stops the server after the test."""
    processes = []

    def start(command: list[str], url: str) -> None:
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until_served(url, processes[-1])

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


def draw_a_stroke(page) -> None:
    """A vertical stroke down the middle of the Draw tab's canvas, drawn with the mouse."""
    page.locator("#drawing").get_by_role("button", name="Brush").click()  # Gradio's sketchpad starts with no tool
    page.locator("#drawing canvas").first.wait_for(state="visible", timeout=60_000)
    box = page.locator("#drawing canvas").first.bounding_box()
    x, top = box["x"] + box["width"] / 2, box["y"] + box["height"] / 4
    page.mouse.move(x, top)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(x, top + step * box["height"] / 20)
    page.mouse.up()


def draw_an_x(page) -> None:
    """Two diagonal strokes across the Draw tab's canvas, corner to corner of its middle half."""
    page.locator("#drawing").get_by_role("button", name="Brush").click()
    page.locator("#drawing canvas").first.wait_for(state="visible", timeout=60_000)
    box = page.locator("#drawing canvas").first.bounding_box()
    side = min(box["width"], box["height"]) / 2
    left, top = box["x"] + box["width"] / 2 - side / 2, box["y"] + box["height"] / 2 - side / 2
    for start, end in (((left, top), (left + side, top + side)), ((left + side, top), (left, top + side))):
        page.mouse.move(*start)
        page.mouse.down()
        for step in range(1, 11):
            page.mouse.move(start[0] + (end[0] - start[0]) * step / 10, start[1] + (end[1] - start[1]) * step / 10)
        page.mouse.up()


def demo_page(page, checkpoint, serve):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    serve([sys.executable, str(ROOT / "demo.py"), "--ckpt_path", str(checkpoint), "--port", str(port)], url)
    page.goto(url)
    return page.locator("#result textarea")


def test_a_drawn_x_is_answered_not_a_digit(default_checkpoint, browser_page, serve):
    expect = pytest.importorskip("playwright.sync_api").expect
    result = demo_page(browser_page, default_checkpoint, serve)
    for _ in range(3):  # a stroke drawn while a slow page still lays out its canvas is lost: then the X again
        draw_an_x(browser_page)
        try:
            expect(result).to_have_value(re.compile("^not a digit"), timeout=20_000)
            break
        except AssertionError:
            browser_page.locator("#clear").click()
    expect(result).to_have_value(re.compile("^not a digit"), timeout=1_000)
    for label in ("#digit", "#sum"):  # no digit and no sum to show
        expect(browser_page.locator(f"{label} [data-testid=label-output-value]")).to_have_count(0, timeout=30_000)


def test_a_number_picked_while_a_photo_uploads_is_answered_with_that_photo(
    tmp_path, default_checkpoint, browser_page, serve
):
    """A photo on screen, then a bigger one uploading slowly (the browser's upload throttled to 400 kB/s, about
    8 s): the number picked meanwhile is answered with the new photo once it is there, not left unanswered."""
    expect = pytest.importorskip("playwright.sync_api").expect
    printed_digit(5, 0, np.random.default_rng(2)).save(tmp_path / "five.png")
    three = np.asarray(printed_digit(3, 0, np.random.default_rng(1)).resize((1200, 1200)), np.int16)
    grain = np.random.default_rng(0).integers(-20, 20, three.shape)  # grain: the PNG stays large (about 3 MB)
    Image.fromarray((three + grain).clip(0, 255).astype(np.uint8)).save(tmp_path / "three.png")
    page = browser_page
    result = demo_page(page, default_checkpoint, serve)
    page.get_by_role("tab", name="Upload a photo").click()
    page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "five.png"))
    expect(result).to_have_value(re.compile(r"^digit 5 .* number 7 -> sum 12 "), timeout=60_000)
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    conditions = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 400_000}
    network.send("Network.emulateNetworkConditions", conditions)
    page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "three.png"))
    page.locator("#number").get_by_label("4").check()  # while the photo is on its way
    expect(result).to_have_value(re.compile(r"^digit 3 \(\d+\.\d %\) \+ number 4 -> sum 7 \("), timeout=90_000)


def test_demo_page_answers_the_input_on_screen_as_it_changes(tmp_path, default_checkpoint, browser_page, serve):
    expect = pytest.importorskip("playwright.sync_api").expect
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    serve([sys.executable, str(ROOT / "demo.py"), "--ckpt_path", str(default_checkpoint), "--port", str(port)], url)
    printed_digit(3, 0, np.random.default_rng(1)).save(tmp_path / "three.png")
    page = browser_page
    page.goto(url)
    result = page.locator("#result textarea")
    answered = re.compile(r"^digit \d \(\d+\.\d %\) \+ number 7 -> sum \d+ \(")
    for _ in range(3):  # Predict is never pressed here: each change is answered
        draw_a_stroke(page)  # a stroke drawn while a slow page still lays out its canvas is lost: then another
        try:
            expect(result).to_have_value(answered, timeout=20_000)
            break
        except AssertionError:
            continue
    expect(result).to_have_value(answered, timeout=1_000)
    page.get_by_role("tab", name="Upload a photo").click()  # the stroke stays on the hidden tab, unread
    expect(result).to_have_value("Draw a digit or upload a photo first.", timeout=60_000)
    page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "three.png"))
    expect(result).to_have_value(re.compile(r"^digit 3 \(\d+\.\d %\) \+ number 7 -> sum 10 \("), timeout=60_000)
    page.locator("#number").get_by_label("4").check()  # then the number changes, and the answer with it
    expect(result).to_have_value(re.compile(r"^digit 3 \(\d+\.\d %\) \+ number 4 -> sum 7 \("), timeout=60_000)
    expect(page.locator("#read img")).to_be_visible(timeout=30_000)
    keep_screenshot(page, "demo.png")
    page.locator("#clear").click()
    expect(result).to_have_value("Draw a digit or upload a photo first.", timeout=60_000)
    for emptied in (
        "#photo img",
        "#read img",
        "#digit [data-testid=label-output-value]",
        "#sum [data-testid=label-output-value]",
    ):
        expect(page.locator(emptied)).to_have_count(0, timeout=30_000)


def test_tensorboard_opens_on_the_dashboard_after_a_default_run(default_checkpoint, browser_page, serve):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    serve(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(default_checkpoint.parents[2]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        url,
    )
    page = browser_page
    page.goto(url + "#custom_scalars")
    for title in (
        "digit accuracy",
        "sum accuracy",
        "losses",
        "learning rate",
        "sum = predicted digit + number",
        "calibration error (in-sample: the temperatures fitted on the same pass)",
    ):
        page.get_by_text(title, exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(3000)  # the charts draw their lines
    keep_screenshot(page, "dashboard.png")
