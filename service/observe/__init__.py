"""Observability: Prometheus metrics, structured logs with a request id, opt-in traces.

A leaf, like config: every layer may record here; nothing here imports the service's other
packages. Labels and log fields are route templates, statuses, stages, kinds and counts: never a
patient identifier, a concrete path or a clinical value (tests/test_observe.py).
"""
