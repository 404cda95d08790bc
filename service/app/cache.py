"""The latest evaluation of recently graded patients, reused while their stored inputs stay the same.

An evaluation of stored data is a pure function of those data (the evaluation time defaults to
the latest input time), the settings and the codebook, which are fixed for a process. So a CDS
hook for a known patient whose inputs did not change is answered from here instead of parsing
and grading everything again. The key is a fingerprint of the stored inputs (repository.
input_fingerprint): any new version, rejected input or Medication change gives another one.
One cache per app (app.state), bounded, safe across the request threads.

Each entry also keeps a digest of what the EHR sent the last time (`received`): a hook that
sends the same bytes again, while the stored inputs still have the fingerprint they had right
after that call stored them, would store nothing new (storing is an idempotent upsert), so it is
answered without storing again (ehr.sync.store_and_evaluate).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .evaluate import Evaluation

MAX_PATIENTS = 512


class EvaluationCache:
    def __init__(self, max_patients: int = MAX_PATIENTS) -> None:
        self._items: OrderedDict[str, tuple[str, Evaluation, str | None]] = OrderedDict()
        self._max = max_patients
        self._lock = threading.Lock()

    def get(self, patient_id: str, fingerprint: str) -> Evaluation | None:
        with self._lock:
            found = self._items.get(patient_id)
            if found is None or found[0] != fingerprint:
                return None
            self._items.move_to_end(patient_id)
            return found[1]

    def seen(self, patient_id: str, received: str) -> tuple[str, Evaluation] | None:
        """(fingerprint, evaluation) when the patient's last stored call received `received`."""
        with self._lock:
            found = self._items.get(patient_id)
            if found is None or found[2] != received:
                return None
            self._items.move_to_end(patient_id)
            return found[0], found[1]

    def put(self, patient_id: str, fingerprint: str, evaluation: Evaluation, received: str | None = None) -> None:
        with self._lock:
            self._items[patient_id] = (fingerprint, evaluation, received)
            self._items.move_to_end(patient_id)
            while len(self._items) > self._max:
                self._items.popitem(last=False)
