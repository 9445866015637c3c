"""The studio in a real browser: `pixgen studio` on a free port, Debian's chromium driven by
Playwright; a generation cancelled half way, a generation, nuclei drawn on the Paint canvas with the
mouse and their tissue, and a large image zoomed and panned in its viewer.

Marked ``browser`` (not in the default run): needs ``apt-get install chromium`` and
``pip install playwright`` (Playwright's own browser download is not used). Run it with
``python -m pytest -m browser tests/test_studio_browser.py``; ``PIXGEN_STUDIO_SHOTS=docs/studio``
keeps the screenshots there (default: the test's temporary folder). CI runs it (.ci/run).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = int(os.environ.get("PIXGEN_STUDIO_BROWSER_TIMEOUT_MS", "240000"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def studio_url(tmp_path, shared_data):
    """`pixgen studio` running on a free port (stopped after the test)."""
    pytest.importorskip("streamlit")
    if "studio" not in {e.name for e in entry_points(group="pixgen.commands")}:
        pytest.skip("`pixgen studio` is not registered here: pip install -e '.[studio]'")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "studio.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "pixgen.cli", "studio", "--root", str(shared_data), "--port",
                                   str(port), "--work", str(tmp_path / "work")], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://localhost:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"pixgen studio did not start: {(tmp_path / 'studio.log').read_text()[-2000:]}")
                    time.sleep(0.5)
            yield url
        finally:
            server.send_signal(signal.SIGINT)  # streamlit stops promptly on SIGINT (as on Ctrl-C), not always on SIGTERM
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture
def page(studio_url, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1500})
        pg.set_default_timeout(TIMEOUT_MS)
        pg.studio_url = studio_url
        try:
            yield pg
        finally:
            pg.screenshot(path=str(tmp_path / "last.png"))  # what the page showed last, to read a failure
            browser.close()


def shots_folder(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PIXGEN_STUDIO_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def settle(pg) -> None:
    """Wait until the app has finished the run the last action started (Streamlit marks its state on stApp)."""
    pg.wait_for_timeout(700)
    pg.locator("[data-testid='stApp'][data-test-script-state='notRunning']").wait_for()


def set_number(pg, label: str, value: int) -> None:
    box = pg.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    settle(pg)


def test_generate_and_paint_in_a_browser(page, tmp_path):
    pg, shots = page, shots_folder(tmp_path)
    pg.goto(pg.studio_url)
    pg.get_by_role("button", name="Generate", exact=True).wait_for()

    # cancel: 16 images in two batches of 8, 10 steps each; Cancel while the second batch runs
    set_number(pg, "Images (per condition)", 16)
    set_number(pg, "Steps", 10)
    pg.get_by_role("button", name="Generate", exact=True).click()
    pg.get_by_text(re.compile(r"denoising: 1[1-6] / 20")).wait_for()
    pg.get_by_role("button", name="Cancel").click()
    pg.get_by_text("Cancelled: what was finished is kept").wait_for()
    settle(pg)
    assert pg.get_by_text("Incomplete set (cancelled): 8 images finished").is_visible()
    assert pg.locator("[data-testid='stImage'] img").count() == 8  # the finished batch, and nothing else
    (manifest,) = (tmp_path / "work").glob("*/generate/*/manifest.json")
    written = json.loads(manifest.read_text())
    assert written["complete"] is False and len(written["files"]) == 8
    assert sorted(p.name for p in manifest.parent.glob("*.png")) == [f"{i:04d}.png" for i in range(8)]
    pg.screenshot(path=str(shots / "cancel.jpg"), type="jpeg", quality=80)

    set_number(pg, "Images (per condition)", 8)
    set_number(pg, "Steps", 12)
    pg.get_by_role("button", name="Generate", exact=True).click()
    pg.get_by_text("8 images").wait_for()
    settle(pg)
    images = pg.locator("[data-testid='stImage'] img")
    assert images.count() == 8
    assert all(images.nth(i).evaluate("im => im.complete && im.naturalWidth === 128") for i in range(8))
    assert pg.get_by_role("button", name="Download the set (zip: images + manifest.json)").is_visible()
    pg.screenshot(path=str(shots / "generate.jpg"), type="jpeg", quality=80)

    pg.get_by_role("link", name="Paint").click()
    pg.get_by_role("button", name="Generate tissue").wait_for()
    canvas = pg.locator("canvas").last
    canvas.wait_for()
    box = canvas.bounding_box()
    nuclei = {"epithelial": [(80, 90), (120, 100), (100, 140), (150, 150), (250, 270), (280, 240)],
              "inflammatory": [(200, 80), (215, 100), (320, 120), (60, 300)],
              "spindle-shaped": [(180, 320), (300, 330)]}
    for klass, centres in nuclei.items():
        pg.get_by_text(klass, exact=True).click()
        settle(pg)
        radius = 14 if klass == "epithelial" else 8
        for x, y in centres:
            pg.mouse.move(box["x"] + x, box["y"] + y)
            pg.mouse.down()
            pg.mouse.move(box["x"] + x + radius, box["y"] + y + radius, steps=4)
            pg.mouse.up()
            settle(pg)
    set_number(pg, "Steps", 12)
    set_number(pg, "Images per layout", 2)
    pg.get_by_role("button", name="Generate tissue").click()
    pg.get_by_text("2 mask | image pairs").wait_for()
    settle(pg)
    shown = pg.locator("[data-testid='stImage'] img")
    assert shown.count() == 4  # mask | image, twice
    mask = pg.locator("[data-testid='stImage']").filter(has_text="mask inst/drawn_0.png")
    assert mask.count() == 1
    pg.screenshot(path=str(shots / "paint.jpg"), type="jpeg", quality=80)

    # a large image, zoomed with the wheel and panned by dragging in its pyramid viewer
    pg.get_by_role("link", name="Large image").click()
    pg.get_by_role("button", name="Generate the large image").wait_for()
    set_number(pg, "Size (px, square)", 384)
    set_number(pg, "Steps", 8)
    pg.get_by_role("button", name="Generate the large image").click()
    pg.get_by_text(re.compile(r"384 x 384 px, \d levels")).wait_for()
    settle(pg)
    viewer = pg.locator(".pixgen-viewer")
    status = viewer.locator(".pixgen-viewer-status")
    status.wait_for()
    fitted = (status.inner_text(), float(viewer.get_attribute("data-zoom")))
    viewer.get_by_title("zoom out").click()
    viewer.get_by_title("zoom out").click()
    assert float(viewer.get_attribute("data-zoom")) == pytest.approx(fitted[1] / 4, rel=1e-3)
    assert viewer.get_attribute("data-level") != "0"  # seen small: a coarser pyramid level is drawn
    box = viewer.locator("canvas").bounding_box()
    pg.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(12):
        pg.mouse.wheel(0, -200)
        pg.wait_for_timeout(100)
    zoomed = (status.inner_text(), float(viewer.get_attribute("data-zoom")), viewer.get_attribute("data-level"))
    assert zoomed[1] > 2 * fitted[1] and zoomed[2] == "0" and zoomed[0] != fitted[0]  # closer, at full resolution
    pg.mouse.down()
    pg.mouse.move(box["x"] + box["width"] / 2 - 150, box["y"] + box["height"] / 2 - 80, steps=5)
    pg.mouse.up()
    panned = status.inner_text()
    assert panned != zoomed[0] and float(viewer.get_attribute("data-zoom")) == zoomed[1]  # moved, same zoom
    pg.screenshot(path=str(shots / "large_image.jpg"), type="jpeg", quality=80)
    for name in ("cancel", "generate", "paint", "large_image"):
        assert (shots / f"{name}.jpg").stat().st_size > 10_000
