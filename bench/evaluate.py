"""Benchmark: the full in-process `$evaluate` path against `orjson.loads` of the same bytes.

One synthetic patient, 14 days of vitals every 15 minutes plus labs and drugs (~10,000
resources). Timed: parse, normalise, grade, build, validate and serialise the output.
Target (issue 2): `$evaluate` costs at most 4x `orjson.loads` of its input.

Run: .venv/bin/python bench/evaluate.py [--repeat N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from service.app.evaluate import evaluate_body
from service.codebook import load_codebook
from service.config.settings import Settings
from service.devtools.synth import generate_patient

TARGET_RATIO = 4.0


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    settings = Settings()
    codebook = load_codebook(settings.canonical_base)
    start = datetime(2026, 1, 5, 8, tzinfo=UTC)
    patient = generate_patient(
        random.Random(42), 0, "crs-4", days=14, base=settings.canonical_base, start=start, vitals_every_min=15
    )
    body = orjson.dumps(patient.bundle)
    n = len(patient.bundle["entry"])
    now = datetime.now(UTC)

    def evaluate() -> bytes:
        # `at` = the latest input: the course covers all 14 days.
        return orjson.dumps(evaluate_body(body, codebook, settings, None, now).bundle())

    evaluate()  # warm-up: imports, model classes
    loads_best, loads_med = best_of(lambda: orjson.loads(body), args.repeat)
    eval_best, eval_med = best_of(evaluate, args.repeat)
    ratio = eval_best / loads_best
    print(f"input: {n} resources, {len(body) / 1e6:.2f} MB")
    print(f"orjson.loads : best {loads_best * 1e3:7.1f} ms  median {loads_med * 1e3:7.1f} ms")
    print(f"$evaluate    : best {eval_best * 1e3:7.1f} ms  median {eval_med * 1e3:7.1f} ms")
    print(
        f"ratio (best) : {ratio:.2f}x  (target <= {TARGET_RATIO:g}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
