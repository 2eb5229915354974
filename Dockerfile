# Diglett server image: CUDA-capable (torch CUDA wheels on a slim Python base;
# the NVIDIA driver comes from the host via the NVIDIA container runtime),
# non-root, model baked in at build time, health-checked on /healthz.
#
#   docker build -t diglett .
#   docker run --gpus all -p 8000:8000 diglett            # one machine: diglett serve
#   (on Ray clusters the same image runs `ray start ...`; see cluster/)
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DIGLETT_CACHE_DIR=/opt/diglett/cache \
    DIGLETT_HOST=0.0.0.0 \
    DIGLETT_PORT=8000 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_ENABLE_HA_PROXY=1 \
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 \
    RAY_SERVE_LOG_TO_STDERR=1 \
    RAY_SERVE_USE_GRPC_BY_DEFAULT=0 \
    RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5 \
    RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S=86400 \
    RAY_SERVE_PORT_QUARANTINE_S=150
# The RAY_SERVE_ variables: serve_app/serve_env.py, for `ray start` in
# this image on cluster nodes (`diglett serve` sets them itself).

# libsndfile for soundfile; curl for the HEALTHCHECK; tini reaps Ray's children;
# g++ builds the compiled int8 model for the CPU a container runs on, once,
# in the background (diglett/compiled_int8.py; without it: the traced model).
# Unpinned on purpose: Debian stable only ships security fixes for these.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsndfile1 curl tini g++ \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 diglett \
 && mkdir -p /opt/diglett/cache \
 && chown -R diglett:diglett /opt/diglett
WORKDIR /opt/diglett/app

# Dependencies first (cached layer): the same `pip install -e .` as the README
# and `make`, with torch from the CUDA 12.8 wheel index (these wheels also run
# on CPU-only hosts).
COPY --chown=diglett:diglett pyproject.toml README.md ./
COPY --chown=diglett:diglett diglett ./diglett
COPY --chown=diglett:diglett serve_app ./serve_app
COPY --chown=diglett:diglett actors ./actors
COPY --chown=diglett:diglett client ./client
COPY --chown=diglett:diglett cluster ./cluster
COPY --chown=diglett:diglett docs ./docs
RUN pip install --extra-index-url https://download.pytorch.org/whl/cu128 -e .

USER 1000
# The model, verified against its pinned sha256s, fetched at build time.
RUN diglett fetch-model

EXPOSE 8000 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${DIGLETT_PORT}/healthz || exit 1"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["diglett", "serve"]
