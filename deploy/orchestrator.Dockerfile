# The bap-engine orchestrator (control plane), installed from source into /opt/venv.
# Build with scripts/build-images.sh: it stages a small context (pyproject.toml, README.md, LICENSE, src/,
# clients/python/ (the bap-engine-client distribution),
# requirements.txt = build requires + dependencies from pyproject.toml, and, when the host's pip uses
# a custom CA bundle, that bundle as build-ca.crt). Dependencies come from
# PyPI at build time. With a registry: --build-arg BASE_IMAGE=python:3.11-slim-bookworm
ARG BASE_IMAGE=local/python:3.11-bookworm

# Stage 1: the dependencies (the only step that needs PyPI; cached until the dependency list changes).
FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# `build-ca.cr[t]` is optional (the wildcard lets the build go on without it); it stays in this stage.
COPY requirements.txt build-ca.cr[t] /build/
RUN if [ -s /build/build-ca.crt ]; then export PIP_CERT=/build/build-ca.crt; fi \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install -r /build/requirements.txt

# Stage 2: the runtime image; installing the project itself needs no network.
FROM ${BASE_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY --from=deps /opt/venv /opt/venv
COPY pyproject.toml README.md LICENSE /build/
COPY src/ /build/src/
COPY clients/python/ /build/clients/python/
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation /build/clients/python /build && rm -rf /build
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    ORCH_HOST=0.0.0.0 \
    ORCH_PORT=8000 \
    ORCH_ENGINE_BACKEND=docker \
    ORCH_DATA_DIR=/var/lib/bap-engine
VOLUME ["/var/lib/bap-engine"]
EXPOSE 8000
STOPSIGNAL SIGTERM
CMD ["bap-engine", "serve"]
