"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright, against a real server.

Playwright's own browser downloads are never used (they need a network CI lacks): the test launches
``/usr/bin/chromium``, which ``.ci/run`` installs. Without it the test skips on a developer's machine and
fails in CI (``CI=true``). The screenshot is kept in ``tests/artifacts/web-page.png`` (ignored by git).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from playwright.sync_api import expect, sync_playwright

from .conftest import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "examples" / "images" / "Labrador_retriever_06457.jpg"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# no network, no first-run or background services: the page must work from this server alone
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
BREEDS = ["Affenpinscher", "Afghan_hound", "Beagle", "Boxer", "Brittany", "Bulldog", "Collie", "Dalmatian",
          "Labrador_retriever", "Pug"]  # fmt: skip


# the canvas's pixels: share opaque, share clearly red (the heat map's hot end), spread of the red channel
CANVAS_STATS = """() => {
    const canvas = document.getElementById("heatmap");
    const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let opaque = 0, red = 0, sum = 0, squares = 0;
    for (let i = 0; i < data.length; i += 4) {
        opaque += data[i + 3] === 255;
        red += data[i] > data[i + 2] + 60;
        sum += data[i];
        squares += data[i] * data[i];
    }
    const n = data.length / 4;
    return {opaque: opaque / n, red: red / n, std: Math.sqrt(squares / n - (sum / n) ** 2)};
}"""


def _require_browser() -> None:
    """Skip without Debian's Chromium (a system package, not a pip one), except in CI, where the test must run."""
    if CHROMIUM.is_file():
        return
    reason = f"the browser test needs {CHROMIUM} (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must run it (.ci/run installs it).")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def page_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ResNet-18 with 10 breed names at 96 px: layer4 is 3x3, so the heat map has a shape."""
    from dogbreed.artifacts import write_model_dir
    from dogbreed.models.backbone import create_backbone
    from dogbreed.transforms import Preprocessing

    torch.manual_seed(0)
    net, head = create_backbone("resnet18", num_classes=len(BREEDS))
    torch.nn.init.normal_(net.get_submodule(head).weight, std=0.5)  # distinct logits
    return write_model_dir(
        tmp_path_factory.mktemp("page") / "model", net, backbone="resnet18", class_names=BREEDS,
        preprocessing=Preprocessing(image_size=96, resize_size=110),
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(page_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    _require_browser()
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "dogbreed.serve", str(page_model), "--host", "127.0.0.1", "--port", str(port),
               "--threads", "1"]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/ping", process, timeout=90, log=log)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.slow
def test_photo_gives_top5_and_heat_map_in_chromium(server: str, page_model: Path, tmp_path: Path) -> None:
    """Upload the Labrador through the file input; the top 5 with bars and a non-uniform heat map appear."""

    problems: list[str] = []  # console errors (a CSP violation is one) and uncaught exceptions
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(server, wait_until="load")
            # the page names what it serves: the classes, the run and the runtime (GET /model)
            expect(page.locator("h1")).to_have_text(f"Which of its {len(BREEDS)} classes is it?")
            about = page.locator("#about")
            expect(about).to_contain_text(f"A resnet18 that knows {len(BREEDS)} classes (Affenpinscher, Afghan hound,")
            expect(about).to_contain_text(f"trained in run {page_model.parent.name}, served with the eager runtime")
            page.set_input_files("#file", PHOTO)
            items = page.locator("#top5 li")
            expect(items).to_have_count(5, timeout=60_000)
            expect(page.locator("#status")).to_have_text(PHOTO.name)
            labels = [items.nth(i).get_attribute("data-label") for i in range(5)]
            assert len(set(labels)) == 5 and set(labels) <= set(BREEDS)
            assert [items.nth(i).locator(".label").inner_text() for i in range(5)] == [
                label.replace("_", " ") for label in labels
            ]
            widths = [items.nth(i).locator(".bar span").bounding_box()["width"] for i in range(5)]
            assert widths[0] > 0 and widths == sorted(widths, reverse=True)
            probabilities = [float(items.nth(i).get_attribute("data-probability")) for i in range(5)]
            assert 0 < sum(probabilities) <= 1 + 1e-4 and probabilities == sorted(probabilities, reverse=True)
            assert items.first.locator(".probability").inner_text() == f"{100 * probabilities[0]:.1f} %"
            expect(page.locator("#caption")).to_contain_text("Grad-CAM on layer4")
            ARTIFACTS.mkdir(exist_ok=True)  # before the pixel checks: a failure is easier to see than to read
            page.screenshot(path=tmp_path / "web-page.png", full_page=True)
            shutil.copy2(tmp_path / "web-page.png", ARTIFACTS / "web-page.png")
            # the canvas holds the crop with the heat map: opaque, and far from one flat colour
            stats = page.evaluate(CANVAS_STATS)
            assert stats["opaque"] == 1 and stats["std"] > 20, stats
            assert 0.02 < stats["red"] < 0.95, stats  # a hot region, not everywhere
            page.fill("#opacity", "0")  # the slider takes the heat map off: the photo alone is far less red
            assert page.evaluate(CANVAS_STATS)["red"] < stats["red"] / 2
            assert not problems, problems
            # a file that is no image: the server's reason, and no answer about the previous photo left on show
            (tmp_path / "notes.jpg").write_text("not a photo")
            page.set_input_files("#file", tmp_path / "notes.jpg")
            expect(page.locator("#status")).to_have_class("error")
            expect(page.locator("#status")).to_contain_text("notes.jpg: the body is not an image")
            expect(page.locator("#result")).to_be_hidden()
        finally:
            browser.close()
