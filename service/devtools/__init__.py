"""Developer tools, out of the production path: the synthetic cohort generator (synth.py) and
the demo that feeds it to a real server over HTTP (demo.py).

What never lives here: anything the API, the worker or the poll import. Synthetic data agree
with our rules by construction; real-data tests use the corpus in tests/.
"""
