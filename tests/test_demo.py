"""`iectox demo` as a newcomer runs it: the table says when and why, in one unit per concept and
with times and their offsets, never cut mid-word; then the exact command and URL to open the
worklist, which work as printed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.browser import free_port

pytestmark = pytest.mark.integration  # runs the CLI and the server it prints


def test_demo_table_and_the_command_it_prints(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ}
    env.pop("IECTOX_DATABASE_URL", None)
    demo = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--patients", "4", "--days", "7", "--port", str(port)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the default database, ./iectox.db, lands here
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    assert "…" not in out  # nothing is cut
    assert "[degF]" not in out and "Cel" not in out  # one unit per concept: °C
    assert re.search(
        r"CRS peak grade 3, first \d{4}-\d\d-\d\d \d\d:\d\d [−+]\d\d:\d\d \(day \d+\): .*Temperature [\d.]+ °C", out
    )
    times = re.findall(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(?::\d\d)?(?: [−+]\d\d:\d\d)?", out)
    assert times and all(re.search(r"[−+]\d\d:\d\d$", t) for t in times), times  # every time with its offset
    assert "fever masked: a fever was treated" in out  # a masked fever beside grade 0 is explained
    assert f"Worklist: http://127.0.0.1:{port}/app/" in out
    # the exact command it prints serves the same data (no terminal here: the demo's server stopped)
    line = next(x.strip() for x in out.splitlines() if x.strip().startswith("IECTOX_AUTH_MODE=dev"))
    words = shlex.split(line)
    assigned = dict(w.split("=", 1) for w in words if re.match(r"IECTOX_[A-Z_]+=", w))
    command = [w for w in words if not re.match(r"IECTOX_[A-Z_]+=", w)]
    assert Path(command[0]).name == "iectox" and Path(command[0]).is_file()  # not a bare name off the PATH
    assert assigned["IECTOX_DATABASE_URL"] == f"sqlite:///{(tmp_path / 'iectox.db').resolve()}"
    server = subprocess.Popen(
        command, env={**os.environ, **assigned}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = next(x for x in out.split() if x.startswith("http://") and x.endswith("/app/"))
        for _ in range(200):
            try:
                rows = httpx.get(url.replace("/app/", "/app/api/worklist"), timeout=30)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert rows.status_code == 200 and len(rows.json()) == 4
        assert httpx.get(url, timeout=30).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
