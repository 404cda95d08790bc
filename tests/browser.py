"""A real browser and a real server for the clinician app's tests.

* ``chromium`` (per test): Debian's Chromium (``apt-get install chromium``; the README's test
  command installs it) driven by Playwright, headless. It FAILS, never skips, when Chromium is
  missing. ``IECTOX_CHROMIUM`` may name another binary.
* ``LiveServer``: the app under uvicorn on a loopback port, in a thread (real HTTP: the browser
  talks to it as to a deployed service).
* ``ARTIFACTS``: where screenshots are kept (``tests/artifacts/``, not committed; CI may collect).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.sync_api import Browser, sync_playwright

ARTIFACTS = Path(os.environ.get("IECTOX_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """`app` served by uvicorn on 127.0.0.1:`port` until `stop()`."""

    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the app did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture
def chromium() -> Iterator[Browser]:
    # Per test: Playwright's sync API runs an event loop in this thread while it is open, which
    # would stop pytest-asyncio's session loop from running the async tests in between.
    path = os.environ.get("IECTOX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "Chromium is not installed: run the README's test command (it runs `apt-get install chromium`), "
            "or set IECTOX_CHROMIUM to a Chromium binary",
            pytrace=False,
        )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield browser
        browser.close()
