"""The page at `/` of `ldm serve`, in a real headless browser (Playwright driving the system's chromium): type a
prompt, press Generate, see the bar move and the image appear with its infotext and in the gallery."""
from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi")
playwright = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")

import ldm  # noqa: E402
from ldm.demo import DEMO_CHECKPOINT  # noqa: E402

from test_server import Server  # noqa: E402


def test_generate_from_the_page():
    server = Server(ldm.load(DEMO_CHECKPOINT))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_function("document.getElementById('sampler').options.length > 5")
            page.fill("#prompt", "small green triangle on the right, white background")
            page.fill("#steps", "300")  # slow enough to watch the bar move
            page.fill("#seed", "12")
            page.click("#generate")
            page.wait_for_function("document.getElementById('bar').value > 0 && "
                                   "document.getElementById('bar').value < 1", timeout=60_000)
            page.wait_for_function("!document.getElementById('preview').hidden", timeout=60_000)  # live preview
            page.wait_for_selector("#result img", timeout=120_000)
            assert page.locator("#status").inner_text() == "done"
            assert "Seed: 12" in page.locator("#info").inner_text()
            assert "Size: 64x64" in page.locator("#info").inner_text()  # blank size fields: the model's own
            assert page.locator("#gallery img").count() == 1
            browser.close()
    finally:
        server.stop()
