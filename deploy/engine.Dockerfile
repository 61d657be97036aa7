# The reference engine: `python3 -m bap_engine.refengine` (stdlib + h11), listening on $PORT (8000),
# data under /data. Build with scripts/build-images.sh (it stages a small context holding src/).
#
# The default base is the local image made by scripts/build-images.sh, which already has Debian's
# python3-h11, so the build needs no network. With a registry, pass e.g.
#   --build-arg BASE_IMAGE=python:3.11-slim-bookworm   (h11 is then installed from PyPI).
ARG BASE_IMAGE=local/python:3.11-bookworm
FROM ${BASE_IMAGE}

RUN python3 -c "import h11" 2>/dev/null || python3 -m pip install --no-cache-dir "h11>=0.14"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    HOST=0.0.0.0 \
    PORT=8000 \
    SQLITE_DB_PATH=/data/brain.sqlite

COPY src/bap_engine/__init__.py /app/bap_engine/__init__.py
COPY src/bap_engine/refengine/ /app/bap_engine/refengine/
RUN mkdir -p /data

VOLUME ["/data"]
EXPOSE 8000
WORKDIR /data
# The engine handles SIGTERM itself; the docker backend also runs it under docker's init (tini).
STOPSIGNAL SIGTERM
CMD ["python3", "-m", "bap_engine.refengine"]
