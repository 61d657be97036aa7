#!/usr/bin/env bash
# Build bap-engine's container images locally, with no registry (run as root; dockerd must be up,
# see scripts/docker-up.sh).
#
#   1. local/debian:bookworm        debootstrap --variant=minbase + `docker import`   (cached by tag)
#   2. local/python:3.11-bookworm   python3, python3-venv and python3-h11 installed in a chroot copy
#                                   of (1), then `docker import`                    (cached by tag)
#   3. bap-engine/refengine:<ver>   deploy/engine.Dockerfile (stdlib + h11; no PyPI at build time),
#                                   also tagged :dev (the contract tests' default image)
#   4. bap-engine/orchestrator:<ver> deploy/orchestrator.Dockerfile (the project installed from source;
#                                   dependencies come from PyPI through the bridge NAT)
#
# Images 3 and 4 are rebuilt on every run (docker's layer cache makes a warm run cheap). The Debian
# mirror is the one apt already uses (/etc/apt/sources.list.d/*.sources), or $BAP_DEBIAN_MIRROR.
# BAP_BASE_IMAGE=python:3.11-slim-bookworm (with a registry) skips 1 and 2 and builds on that image.
# BAP_BUILD_VERBOSE=1 shows docker build's output. BAP_REBUILD_BASE=1 rebuilds 1 and 2 even when their tags exist. BAP_SKIP_ORCHESTRATOR=1 skips 4.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/src/bap_engine/__init__.py")
DEBIAN_TAG=local/debian:bookworm
PYTHON_TAG=local/python:3.11-bookworm
ENGINE_TAG=bap-engine/refengine:$VERSION
# The contract tests' default engine image (tests/backends/helpers.py: BAP_TEST_ENGINE_IMAGE).
ENGINE_DEV_TAG=bap-engine/refengine:dev
ORCH_TAG=bap-engine/orchestrator:$VERSION

log() { printf 'build-images: [%3ss] %s\n' "$SECONDS" "$*" >&2; }
have_image() { [ "${BAP_REBUILD_BASE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

if ! docker info >/dev/null 2>&1; then
    log "Docker daemon not reachable; run scripts/docker-up.sh first"
    exit 1
fi

SCRATCH=$(mktemp -d /var/tmp/bap-images.XXXXXX)
cleanup() { rm -rf "$SCRATCH"; }
trap cleanup EXIT

# The URI of the deb822 stanza whose Suites list contains exactly "bookworm" (not -updates/-security).
find_mirror() {
    if [ -n "${BAP_DEBIAN_MIRROR:-}" ]; then echo "$BAP_DEBIAN_MIRROR"; return; fi
    awk 'BEGIN { RS = ""; FS = "\n" }
         { uri = ""; main = 0
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
             if ($i ~ /^Suites:/) { n = split($i, s, /[ \t]+/); for (j = 2; j <= n; j++) if (s[j] == "bookworm") main = 1 }
           }
           if (main && uri != "") { print uri; exit } }' /etc/apt/sources.list.d/*.sources 2>/dev/null
}

build_debian() {
    if have_image "$DEBIAN_TAG"; then log "$DEBIAN_TAG exists; skipping"; return; fi
    local mirror rootfs="$SCRATCH/rootfs"
    mirror=$(find_mirror)
    [ -n "$mirror" ] || { log "no bookworm mirror in /etc/apt/sources.list.d/*.sources; set BAP_DEBIAN_MIRROR"; exit 1; }
    command -v debootstrap >/dev/null || { apt-get update -q; DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap; }
    log "debootstrap bookworm from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$SCRATCH/debootstrap.log" 2>&1 \
        || { tail -20 "$SCRATCH/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
           "$rootfs"/usr/share/{doc,man,info,locale}/*
    tar -C "$rootfs" --numeric-owner -c . | docker import -c 'CMD ["bash"]' -c 'ENV LANG=C.UTF-8' - "$DEBIAN_TAG" >/dev/null
    rm -rf "$rootfs"
    log "built $DEBIAN_TAG"
}

build_python() {
    if have_image "$PYTHON_TAG"; then log "$PYTHON_TAG exists; skipping"; return; fi
    local rootfs="$SCRATCH/rootfs-py" cid
    mkdir -p "$rootfs"
    cid=$(docker create "$DEBIAN_TAG" true)
    docker export "$cid" | tar -C "$rootfs" --numeric-owner -xpf -
    docker rm "$cid" >/dev/null
    rm -f "$rootfs/.dockerenv" "$rootfs/etc/resolv.conf"
    cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
    log "installing python3, python3-venv, python3-h11 in a chroot"
    chroot "$rootfs" sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends python3 python3-venv python3-h11 && apt-get clean \
        && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*' >"$SCRATCH/chroot.log" 2>&1 \
        || { tail -20 "$SCRATCH/chroot.log" >&2; exit 1; }
    rm -f "$rootfs/etc/resolv.conf"
    tar -C "$rootfs" --numeric-owner -c . \
        | docker import -c 'CMD ["python3"]' -c 'ENV LANG=C.UTF-8' - "$PYTHON_TAG" >/dev/null
    rm -rf "$rootfs"
    log "built $PYTHON_TAG"
}

# A small build context (the repository holds .venv and caches we must not send to the daemon).
stage_context() {
    local ctx="$SCRATCH/context"
    mkdir -p "$ctx"
    cp "$ROOT/pyproject.toml" "$ROOT/LICENSE" "$ctx/"
    # The dependency layer keys on this list only, so editing [tool.*] in pyproject.toml keeps it cached.
    # bap-engine-client is installed from clients/python (it is not on PyPI): its own dependencies are
    # listed instead.
    python3 -c 'import sys, tomllib; d = tomllib.load(open(sys.argv[1], "rb")); c = tomllib.load(open(sys.argv[2], "rb"))
deps = [r for r in d["project"]["dependencies"] if not r.startswith("bap-engine-client")]
print("\n".join(d["build-system"]["requires"] + deps + c["project"]["dependencies"]))' \
        "$ROOT/pyproject.toml" "$ROOT/clients/python/pyproject.toml" >"$ctx/requirements.txt"
    mkdir -p "$ctx/clients"
    tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -c clients/python | tar -C "$ctx" -xf -
    if [ -f "$ROOT/README.md" ]; then cp "$ROOT/README.md" "$ctx/"; else echo "# bap-engine" >"$ctx/README.md"; fi
    # pip inside the build must trust the same CAs as the host's pip (e.g. a TLS-intercepting egress proxy).
    local ca
    for ca in "${BAP_BUILD_CA_BUNDLE:-}" "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}"; do
        if [ -n "$ca" ] && [ -s "$ca" ]; then cp -L "$ca" "$ctx/build-ca.crt"; break; fi
    done
    tar -C "$ROOT" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -c src | tar -C "$ctx" -xf -
    echo "$ctx"
}

build_app_images() {
    local ctx quiet=(-q)
    [ "${BAP_BUILD_VERBOSE:-0}" = 1 ] && quiet=()
    ctx=$(stage_context)
    log "building $ENGINE_TAG"
    docker build "${quiet[@]}" --build-arg "BASE_IMAGE=$PYTHON_TAG" -f "$ROOT/deploy/engine.Dockerfile" -t "$ENGINE_TAG" -t "$ENGINE_DEV_TAG" "$ctx" >&2
    if [ "${BAP_SKIP_ORCHESTRATOR:-0}" = 1 ]; then log "skipping $ORCH_TAG"; return; fi
    log "building $ORCH_TAG"
    docker build "${quiet[@]}" --build-arg "BASE_IMAGE=$PYTHON_TAG" -f "$ROOT/deploy/orchestrator.Dockerfile" -t "$ORCH_TAG" "$ctx" >&2
    # Name the dependency stage (a no-op rebuild from cache) so `docker image prune` keeps it.
    docker build -q --build-arg "BASE_IMAGE=$PYTHON_TAG" -f "$ROOT/deploy/orchestrator.Dockerfile" \
        --target deps -t "bap-engine/orchestrator-deps:cache" "$ctx" >/dev/null
}

if [ -n "${BAP_BASE_IMAGE:-}" ]; then
    log "using base image $BAP_BASE_IMAGE (no local debootstrap base)"
    PYTHON_TAG=$BAP_BASE_IMAGE
else
    build_debian
    build_python
fi
build_app_images
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
    | grep -E "^($DEBIAN_TAG|$PYTHON_TAG|$ENGINE_TAG|$ENGINE_DEV_TAG|$ORCH_TAG) " >&2 || true
log "done"
