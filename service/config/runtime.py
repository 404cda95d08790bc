"""Process-level tuning applied once a process has started (not in tests that build apps).

The cyclic garbage collector walks every container object it tracks; a parsed Bundle is tens
of thousands of dicts, and the start-up heap (fhir.resources models, codebook) is larger still.
Measured on the bench patient (bench/evaluate.py, 14 days, 9,269 resources; 2 cores, best of 9,
in separate processes): default thresholds 788-895 ms; `gc.freeze()` after start-up 713-728 ms;
freeze plus a gen-0 threshold of 10,000 632-686 ms; thresholds of 50,000 or more were slower
(755-993 ms). Reference cycles are still collected, only less often.

`gc_paused()` keeps the collector out of one evaluation altogether: a parse allocates hundreds
of thousands of acyclic objects (freed by reference counting), and each young-generation pass
over them finds nothing to collect. Measured on the bench patient: 9% less time per `$evaluate`
(min of 7: 349 -> 321 ms). Cycles made meanwhile are collected once the collector runs again.
The pause must end after the parsed JSON is freed: the first young-generation pass after it
walks every object made during the pause that is still alive (measured: 54 ms when the parsed
Bundle of the bench patient was still referenced).
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Move the start-up heap out of the collector's walks and collect the young generation less
    often (see the module docstring for the measurements)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


_GC_SWITCH = threading.Lock()  # makes "read the state, then switch" one step across threads


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector paused for the block; the block that paused it resumes it (a block
    may span awaits: the CDS hook route). A block that starts while another has paused it leaves
    the switch alone (it may end unpaused)."""
    with _GC_SWITCH:
        paused_here = gc.isenabled()
        gc.disable()
    try:
        yield
    finally:
        if paused_here:
            with _GC_SWITCH:
                gc.enable()
