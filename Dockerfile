# syntax=docker/dockerfile:1
# iectox: ASTCT 2019 CRS/ICANS grading over FHIR R4.
#   docker build -t iectox .
#   docker run -p 8000:8000 -v iectox-data:/data iectox
# Both stages use the same base image, so the venv copied from the builder
# finds its interpreter at the same path (/usr/local/bin/python3.11).

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: build the wheel and install it into a venv -------------------------------
FROM ${PYTHON_IMAGE} AS builder

# pip compiles the .pyc files at install time; the runtime venv is read-only for the app user.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first (read from pyproject.toml), so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# pyproject.toml names README.md as the package readme: the build needs it.
COPY README.md ./
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip install --no-deps /wheels/iectox-*.whl

# --- runtime ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IECTOX_HOST=0.0.0.0 \
    IECTOX_PORT=8000 \
    IECTOX_DATABASE_URL=sqlite:////data/iectox.db

# jemalloc for every Python allocation: a CDS hook parses a 2 MB prefetch into ~100,000 objects
# and frees them. Measured in the API process: a pass over a freshly parsed prefetch (one
# orjson.dumps) took 9-12 ms on CPython's own allocator, 1-2 ms in a new process and about 4 ms
# on jemalloc; end to end (bench/cds.py, 2,025-resource prefetch) jemalloc's new-patient p95 was
# the lower in four of five back-to-back pairs (README Speed); peak memory of a 50,000-entry
# $evaluate unchanged (bench/memory.py). Unset LD_PRELOAD to run without.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(dpkg -L libjemalloc2 | grep '/libjemalloc\.so\.2$')" /usr/local/lib/libjemalloc.so.2
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2 \
    PYTHONMALLOC=malloc

RUN groupadd --gid 10001 iectox \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin iectox \
    && mkdir -p /data \
    && chown 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv

WORKDIR /data
# SQLite database (and its WAL files) live here; a new named volume inherits the ownership.
VOLUME ["/data"]

USER 10001:10001

EXPOSE 8000

# Liveness only (the process answers); /readyz checks the database.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]

CMD ["iectox", "serve"]
