# One Dockerfile for every kvstack service (see docs/packaging.md):
#   DOCKER_BUILDKIT=1 docker build --target service --build-arg SERVICE=server -t kvstack-server .
# `kvstack images` (make images) runs this once per service in src/kvstack/ops/services.toml.
# Stages: build (Debian's Python 3.11, locked deps in /opt/venv, then a distroless-style root file
# system in /rootfs), app (the source, precompiled), runtime (FROM scratch: rootfs + app, shared by
# every image), service (the service's own package and its metadata).

# Docker Desktop pulls the official image; a machine that reaches no registry gets one made from
# Debian's packages under another name (kvstack.ops.images), passed in here.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions come from the bookworm release the base image points at (the same Python 3.11 on
# both paths); apt cannot pin them without breaking at the next Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

# Locked, hashed runtime dependencies before any source: a code change reuses this layer.
# The proxy's CA (if any) is a BuildKit secret: mounted for this RUN only, never in a layer.
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=secret,id=pipca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-input --disable-pip-version-check \
      --require-hashes --no-deps -r /tmp/requirements.lock \
 && /opt/venv/bin/pip uninstall --yes --quiet pip setuptools

# The distroless-style root file system: the interpreter, the stdlib without what a service never
# imports, only the shared libraries ldd says are needed, a nonroot user, /tmp and /data.
ENV PYTHONHASHSEED=0
# SC2086: $unused is a glob on purpose, expanded inside the copied stdlib.
# hadolint ignore=SC2086
RUN R=/rootfs; py=/usr/lib/python3.11; \
    mkdir -p "$R/usr/bin" "$R/usr/lib" "$R/usr/lib64" "$R/etc" "$R/opt" \
 && ln -s usr/bin "$R/bin" && ln -s usr/lib "$R/lib" && ln -s usr/lib64 "$R/lib64" \
 && cp -a /usr/bin/python3.11 "$R/usr/bin/" && ln -s python3.11 "$R/usr/bin/python3" \
 && cp -a "$py" "$R/usr/lib/" && cp -a /opt/venv "$R/opt/" \
 && for unused in test idlelib tkinter turtledemo turtle.py ensurepip lib2to3 pydoc_data venv \
      distutils config-3.11-* site-packages dist-packages sqlite3 dbm curses lib-dynload/_tkinter* \
      lib-dynload/_sqlite3* lib-dynload/_dbm* lib-dynload/_gdbm* lib-dynload/_curses* \
      lib-dynload/readline* lib-dynload/_test* lib-dynload/xx*; do \
      rm -rf "$R$py"/$unused; \
    done \
 && find "$R" -name __pycache__ -prune -exec rm -rf {} + \
 && find "$R/opt/venv" -name '*.dist-info' -prune -exec sh -c 'rm -f "$1"/RECORD "$1"/INSTALLER' _ {} \; \
 && { ldd /usr/bin/python3.11; find "$R$py/lib-dynload" "$R/opt/venv" -name '*.so*' -type f -exec ldd {} +; } \
    | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && NF > 1 {print $1}' | sort -u \
    | while read -r lib; do \
        dir=$(realpath "$(dirname "$lib")"); mkdir -p "$R$dir"; cp -L "$lib" "$R$dir/"; \
      done \
 && printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$R/etc/passwd" \
 && printf 'root:x:0:\nnonroot:x:65532:\n' >"$R/etc/group" \
 && mkdir -p "$R/tmp" "$R/data" "$R/home/nonroot" && chmod 1777 "$R/tmp" \
 && chown 65532:65532 "$R/data" "$R/home/nonroot" \
 && python3.11 -m compileall -q -j0 --invalidation-mode unchecked-hash -s "$R" -p / "$R$py" "$R/opt/venv/lib" \
 && chroot "$R" /opt/venv/bin/python -c 'import grpc, lmdb, google.protobuf, prometheus_client, ssl, json, ctypes'

# The source last, in two parts: the code every service shares, then the service's own package.
# A change to one service's code rebuilds only its own layer, and every other image keeps its
# ID, so a deploy restarts only the changed service. A new shared subpackage is listed here
# (tests/unit/test_packaging_inputs.py fails until it is).
FROM build AS shared
COPY src/kvstack/*.py src/kvstack/py.typed /app/kvstack/
COPY src/kvstack/v1 /app/kvstack/v1
RUN python3 -m compileall -q --invalidation-mode unchecked-hash -d /opt/venv/lib/python3.11/site-packages/kvstack /app/kvstack

FROM build AS own
ARG SERVICE
COPY src/kvstack/${SERVICE} /app/${SERVICE}
RUN python3 -m compileall -q --invalidation-mode unchecked-hash -d "/opt/venv/lib/python3.11/site-packages/kvstack/${SERVICE}" "/app/${SERVICE}"

FROM scratch AS runtime
COPY --from=build /rootfs /
COPY --from=shared /app/kvstack /opt/venv/lib/python3.11/site-packages/kvstack
# KVSTACK_HOST: a container serves on its own interfaces (the services default to loopback).
ENV PATH=/opt/venv/bin:/usr/bin \
    KVSTACK_HOST=[::] \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/nonroot

# Per service: its own package (the one layer images do not share) and its metadata.
FROM runtime AS service
ARG SERVICE
COPY --from=own /app/${SERVICE} /opt/venv/lib/python3.11/site-packages/kvstack/${SERVICE}
ARG VERSION=0.0.0
ARG REVISION=unknown
ARG SOURCE=""
ARG CONTEXT_HASH=""
# KVSTACK_VERSION: the version a backup's manifest names (kvstack.backup).
ENV KVSTACK_SERVICE=${SERVICE} \
    KVSTACK_VERSION=${VERSION}
LABEL org.opencontainers.image.title="kvstack-${SERVICE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="MIT" \
      dev.kvstack.service="${SERVICE}" \
      dev.kvstack.context="${CONTEXT_HASH}"
USER 65532:65532
ENTRYPOINT ["/opt/venv/bin/python", "-m", "kvstack"]
