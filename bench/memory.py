"""Benchmark: peak memory of one in-process `$evaluate` of a 50,000-entry Bundle.

The Bundle (one synthetic patient, vitals every 10 minutes over 56 days, cut to 50,000 entries)
is written to a file; a fresh process reads its bytes, notes its resident size, evaluates them
once and prints its peak resident size (VmHWM) and the growth. Target (issue 12): peak at
most 250 MiB.

Run: .venv/bin/python bench/memory.py [--entries N]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import orjson

TARGET_MIB = 250


def peak_rss_mib() -> float:
    """This process's peak resident size (VmHWM). Not ru_maxrss: on Linux that keeps, across
    exec, the parent's size at fork (here the parent that generated the Bundle)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child(path: str) -> None:
    from service.app.evaluate import evaluate_body
    from service.codebook import load_codebook
    from service.config.runtime import tune_gc
    from service.config.settings import Settings

    settings = Settings()
    codebook = load_codebook(settings.canonical_base)
    tune_gc()  # as every iectox process once started
    body = Path(path).read_bytes()
    before = peak_rss_mib()
    out = orjson.dumps(evaluate_body(body, codebook, settings, None, datetime.now(UTC)).bundle())
    peak = peak_rss_mib()
    print(f"input {len(body) / 1e6:.1f} MB, output {len(out) / 1e3:.0f} kB")
    print(f"resident before $evaluate {before:.0f} MiB (imports and the input bytes)")
    verdict = "met" if peak <= TARGET_MIB else "NOT met"
    print(f"peak resident {peak:.0f} MiB, growth {peak - before:.0f} MiB (target <= {TARGET_MIB} MiB: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from service.config.settings import Settings
    from service.devtools.synth import generate_patient

    settings = Settings()
    start = datetime(2026, 1, 5, 8, tzinfo=UTC)
    patient = generate_patient(
        random.Random(7), 0, "crs-4", days=56, base=settings.canonical_base, start=start, vitals_every_min=10
    )
    bundle = patient.bundle
    bundle = {**bundle, "entry": bundle["entry"][: args.entries]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.json"
        path.write_bytes(orjson.dumps(bundle))
        print(f"{len(bundle['entry'])} entries; load average {os.getloadavg()[0]:.2f}")
        subprocess.run([sys.executable, __file__, "--child", str(path)], check=True)  # noqa: S603


if __name__ == "__main__":
    main()
