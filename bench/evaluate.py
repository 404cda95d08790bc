"""Benchmark: the full in-process `$evaluate` path against `orjson.loads` of the same bytes.

The baseline is the parse alone, with the cyclic garbage collector paused (so the collector's
work on a large heap does not slow the baseline and flatter the ratio). The process is tuned as
every iectox process is once started (`tune_gc`: start-up heap frozen, gen-0 threshold 10,000). Timed for `$evaluate`:
parse, normalise, grade every scale at `at`, the course of every scale, scores, build,
validate and serialise the output.

Inputs: one synthetic patient (scenario crs-4, vitals every 15 minutes plus labs and drugs) for
7, 14, 28 and 56 days, as generated (the bench patient) and as a lean variant (the same
clinical content with what grading never reads removed: narrative, category, displays,
identifiers, meta), and at 14 days two feeds as real ones come (no target): one quantity
Observation in a hundred in a unit no rule accepts (left out and named), and every time without
its timezone (read in the site timezone, IECTOX_SITE_TIMEZONE, and said so). Prints, per input,
the ratio to the parse and µs per input resource.
Targets (issue 12): <= 4x the parse on the bench patient (14 days), <= 6x on the lean variant,
µs per resource flat within 1.5x from 7 to 56 days.

Run: .venv/bin/python bench/evaluate.py [--repeat N] [--days 7,14,28,56]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from service.app.evaluate import evaluate_body
from service.codebook import load_codebook
from service.config.runtime import tune_gc
from service.config.settings import Settings
from service.devtools.synth import generate_patient

TARGET_RATIO, TARGET_LEAN_RATIO, TARGET_FLAT = 4.0, 6.0, 1.5
DROP = frozenset({"text", "category", "meta", "identifier", "display", "performer", "encounter", "issued"})


def lean(node: Any) -> Any:
    """The same resources without the elements grading never reads."""
    if isinstance(node, dict):
        return {k: lean(v) for k, v in node.items() if k not in DROP}
    if isinstance(node, list):
        return [lean(v) for v in node]
    return node


def with_unusable(bundle: dict[str, Any], every: int = 100) -> dict[str, Any]:
    """`bundle` with every `every`-th quantity Observation in a unit no rule accepts."""
    out = orjson.loads(orjson.dumps(bundle))
    quantities = [e["resource"] for e in out["entry"] if "valueQuantity" in e["resource"]]
    for res in quantities[::every]:
        res["valueQuantity"] = {**res["valueQuantity"], "unit": "furlong", "code": "[fur_us]"}
    return out


def without_timezones(bundle: dict[str, Any]) -> dict[str, Any]:
    """`bundle` with every dateTime of its resources cut to its local date and time (no offset)."""

    def cut(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: cut_time(v) if k in TIMES else cut(v) for k, v in node.items()}
        if isinstance(node, list):
            return [cut(v) for v in node]
        return node

    def cut_time(value: Any) -> Any:
        return value[:19] if isinstance(value, str) and len(value) > 19 and value[10] == "T" else cut(value)

    return cut(bundle)  # type: ignore[no-any-return]


TIMES = frozenset({"effectiveDateTime", "start", "end", "performedDateTime", "onsetDateTime", "recordedDate"})


def best_of(fn: Callable[[], object], repeat: int, *, gc_paused: bool = False) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        if gc_paused:
            gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--days", default="7,14,28,56")
    args = parser.parse_args()
    settings = Settings()
    site_tz = settings.model_copy(update={"site_timezone": "Europe/Berlin"})
    codebook = load_codebook(settings.canonical_base)
    start = datetime(2026, 1, 5, 8, tzinfo=UTC)
    now = datetime.now(UTC)
    tune_gc()  # as every iectox process does once started (service/config/runtime.py)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; best of {args.repeat}")
    print(f"{'input':<18}{'resources':>10}{'MB':>7}{'parse ms':>10}{'evaluate ms':>13}{'ratio':>8}{'µs/res':>9}")
    per_resource: dict[str, list[float]] = {"bench": [], "lean": []}
    ratios: dict[tuple[str, int], float] = {}
    for days in [int(d) for d in args.days.split(",")]:
        patient = generate_patient(
            random.Random(42), 0, "crs-4", days=days, base=settings.canonical_base, start=start, vitals_every_min=15
        )
        variants = [("bench", patient.bundle, settings), ("lean", lean(patient.bundle), settings)]
        if days == 14:
            variants.append(("1% unusable", with_unusable(patient.bundle), settings))
            variants.append(("no timezones", without_timezones(patient.bundle), site_tz))
        for variant, bundle, settings_used in variants:
            body = orjson.dumps(bundle)
            n = len(bundle["entry"])

            def evaluate(body: bytes = body, settings: Settings = settings_used) -> bytes:
                # `at` = the latest input: the course covers every day.
                return orjson.dumps(evaluate_body(body, codebook, settings, None, now).bundle())

            evaluate()  # warm-up: imports, model classes
            loads_best, _ = best_of(lambda body=body: orjson.loads(body), args.repeat, gc_paused=True)
            eval_best, _ = best_of(evaluate, args.repeat)
            ratio = eval_best / loads_best
            ratios[(variant, days)] = ratio
            us = eval_best / n * 1e6
            per_resource.setdefault(variant, []).append(us)
            print(
                f"{variant + f' {days} d':<18}{n:>10}{len(body) / 1e6:>7.2f}{loads_best * 1e3:>10.1f}"
                f"{eval_best * 1e3:>13.1f}{ratio:>7.1f}x{us:>9.1f}"
            )
    for variant, target in (("bench", TARGET_RATIO), ("lean", TARGET_LEAN_RATIO)):
        if (variant, 14) in ratios:
            r = ratios[(variant, 14)]
            print(f"{variant} (14 d): {r:.1f}x the parse (target <= {target:g}x: {verdict(r, target)})")
    for variant, values in per_resource.items():
        if len(values) > 1:
            spread = max(values) / min(values)
            print(
                f"µs per resource, {variant}: {spread:.2f}x from shortest to longest "
                f"(target <= {TARGET_FLAT:g}x: {verdict(spread, TARGET_FLAT)})"
            )


def verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


if __name__ == "__main__":
    main()
