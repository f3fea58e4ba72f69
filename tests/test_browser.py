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


def test_demo_page_reads_an_uploaded_digit_and_adds(tmp_path, default_checkpoint, browser_page, serve):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    serve([sys.executable, str(ROOT / "demo.py"), "--ckpt_path", str(default_checkpoint), "--port", str(port)], url)
    printed_digit(3, 0, np.random.default_rng(1)).save(tmp_path / "three.png")
    page = browser_page
    page.goto(url)
    page.get_by_role("tab", name="Upload a photo").click()
    page.locator("#photo input[type=file]").set_input_files(str(tmp_path / "three.png"))
    page.locator("#number").get_by_label("4").check()
    page.locator("#predict").click()
    page.wait_for_function("document.querySelector('#result textarea').value.includes('sum')", timeout=60_000)
    result = page.locator("#result textarea").input_value()
    assert re.match(r"digit 3 \(\d+\.\d %\) \+ number 4 -> sum 7 \(", result), result
    assert page.get_by_text("what the net read (28x28)").is_visible()
    keep_screenshot(page, "demo.png")


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
    for title in ("digit accuracy", "sum accuracy", "losses", "learning rate", "sum = predicted digit + number"):
        page.get_by_text(title, exact=True).first.wait_for(timeout=60_000)
    page.wait_for_timeout(3000)  # the charts draw their lines
    keep_screenshot(page, "dashboard.png")
