"""Smoke test in a real browser: serve the app on localhost, load a page in headless Chromium, screenshot it.

Needs Debian's chromium (`apt-get install -y chromium`); skipped with that reason when it is missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dashboards.conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served_app(filled_store, tmp_path):  # noqa: ANN201
    """`streamlit run dashboards/app.py` headless on a free port; yields the base URL."""
    port = _free_port()
    log = open(tmp_path / "streamlit.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(REPO / "dashboards/app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"],
        cwd=REPO, env={**os.environ}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
            if proc.poll() is not None:
                break
        else:
            pytest.fail("streamlit did not become healthy")
        assert proc.poll() is None, (tmp_path / "streamlit.log").read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class Browser:
    """Headless Chromium driven over the DevTools protocol.

    ``--screenshot``/``--dump-dom`` alone fire at the load event, before Streamlit has rendered the page
    over its websocket (they capture the skeleton); so we wait for the page's own text, then shoot.
    """

    def __init__(self, profile: Path):
        port = _free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--window-size=1280,900", f"--remote-debugging-port={port}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(150):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2).read())
                break
            except OSError:
                time.sleep(0.2)
        else:
            self.proc.kill()
            pytest.fail("chromium did not open its DevTools port")
        from websockets.sync.client import connect

        self.ws = connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"],
                          max_size=64 * 2**20)
        self.n = 0

    def call(self, method: str, **params) -> dict:  # noqa: ANN003
        """Send one DevTools command and return its result (events in between are skipped)."""
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.n:
                assert "error" not in msg, msg
                return msg["result"]

    def text(self) -> str:
        """The page's visible text."""
        return self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''")[
            "result"].get("value", "")

    def close(self) -> None:
        """Close the connection and the browser."""
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_data_page_renders_in_headless_chromium(served_app, tmp_path):
    from PIL import Image

    browser = Browser(tmp_path / "profile")
    try:
        browser.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                     mobile=False)
        # Open the root, then a deep link: both must go through app.py's st.navigation (pages live in views/).
        browser.call("Page.navigate", url=served_app)
        for _ in range(240):
            if "Leaderboard" in browser.text():
                break
            time.sleep(0.5)
        browser.call("Page.navigate", url=f"{served_app}/data?dataset=corpus/dash_collected")
        text = ""
        for _ in range(240):
            text = browser.text()
            if "Row history" in text:  # the last section: the script has run to the end
                break
            time.sleep(0.5)
        # The page's own text, rendered by the browser from the websocket, not the static shell (tables are
        # drawn on a canvas, so we look for headings and the deep-linked dataset's subheader; the store is the
        # test session's, shared with other tests, hence the explicit ?dataset=).
        assert "dash_collected@v1" in text and "Rejections by reason" in text and "Row history" in text \
            and "Review queue" in text, \
            text.replace("\n\n", " | ")[-3000:]
        assert "Traceback" not in text and "Error" not in text.split("Schema")[0], text
        time.sleep(1.0)  # let the charts finish drawing
        shot = browser.call("Page.captureScreenshot", format="png")
    finally:
        browser.close()
    png = tmp_path / "data.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    img = Image.open(png).convert("L")
    assert img.size == (1280, 900)
    dark = sum(n for value, n in enumerate(img.histogram()) if value < 200)
    assert dark / (img.size[0] * img.size[1]) > 0.005, "screenshot is blank"
    shutil.copy(png, Path(os.environ["NEXUS_HOME"]) / "dashboard-data.png")
