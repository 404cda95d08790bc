"""Process-level tuning applied once a process has started (not in tests that build apps).

The cyclic garbage collector walks every container object it tracks; a parsed Bundle is tens
of thousands of dicts, and the start-up heap (fhir.resources models, codebook) is larger still.
Measured on the bench patient (bench/evaluate.py, 14 days, 9,269 resources; 2 cores, best of 9,
in separate processes): default thresholds 788-895 ms; `gc.freeze()` after start-up 713-728 ms;
freeze plus a gen-0 threshold of 10,000 632-686 ms; thresholds of 50,000 or more were slower
(755-993 ms). Reference cycles are still collected, only less often.
"""

from __future__ import annotations

import gc

GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Move the start-up heap out of the collector's walks and collect the young generation less
    often (see the module docstring for the measurements)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
