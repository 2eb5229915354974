"""EmbeddingDeployment: one shared, autoscaled tier that batches windows.

Each request carries *all* the windows one session has ready (usually 1-3),
and `@serve.batch` merges requests from many sessions into one model call,
so Ray Serve's fixed per-request cost is paid per session-message, not per
window. `batch_size_fn` counts windows, so `max_batch_size` bounds what the
model sees.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from ray import serve

from diglett.priority import lower_cpu_priority, thread_niceness
from diglett.settings import Settings
from diglett.engine.speech import window_lengths
from serve_app import metrics
from serve_app.autoscaling import EMBED_AUTOSCALING
from serve_app.placement import model_worker_options

logger = logging.getLogger("ray.serve")


def default_torch_threads() -> int:
    """All of this process's cores but one (at least 1).

    The replica shares its node with the ingress, the proxy and the
    SessionActors; with every core in torch's pool, a torch op waits for
    whichever of its threads those processes preempted. Measured side by
    side on a 2-core machine (int8, real-time sessions, bench/load.py):
    1 thread held 6 sessions at p95 331 ms; 2 threads held 4 with passive
    OpenMP threads (6 at 1.0 s) and none with spinning ones (4 at 2.0 s).
    """
    return max(1, len(os.sched_getaffinity(0)) - 1)


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _count_windows(requests: list) -> int:
    return sum(len(r) for r in requests)


def _thread_ids(pool: ThreadPoolExecutor, n: int) -> list[int]:
    """The native ids of `pool`'s `n` threads, all started now."""
    barrier = threading.Barrier(n)

    def tid() -> int:
        barrier.wait(timeout=30)  # so that each call holds a thread of its own
        return threading.get_native_id()

    return sorted(f.result() for f in [pool.submit(tid) for _ in range(n)])


# Batch sizes when DIGLETT_BATCH_SIZE is 0. A CPU replica's batches are
# small anyway (its model takes ~21 ms a window). A GPU is busy only with
# big ones: raw ECAPA on an H100, fp16 eager, ~3,200 windows/s at batch 32,
# 7,700 at 128, 9,500 at 512 (issue #5's anchors); at low load the batches
# stay small, since `@serve.batch` does not wait for a full one.
CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 512


def use_compiled_int8(
    embedder, model_dir: Path, settings: Settings, threads: int
) -> str:
    """Run the compiled int8 model if this machine has one (else start its
    build); "" if it runs, else why the traced model serves, which is logged
    as a warning and counted (`diglett_fallbacks_total`,
    mechanism=cpu_compile). A speed-up, never a failure."""
    from diglett.model import compiled_int8

    try:
        if embedder.use_compiled_int8(model_dir, settings.cache_dir, threads) == (
            "compiled"
        ):
            return ""
        reason = compiled_int8.traced_reason(
            embedder.cpu_int8_package, embedder.cpu_int8_build is not None
        )
    except Exception as exc:
        reason = repr(exc)
    logger.warning("compiled int8 model not used, the traced one serves: %s", reason)
    metrics.fallback("cpu_compile")
    return reason


@serve.deployment(
    name="EmbeddingDeployment",
    # Caps how many requests can wait in a replica: must exceed the batch.
    max_ongoing_requests=256,
    autoscaling_config=EMBED_AUTOSCALING,
    ray_actor_options=model_worker_options({"num_cpus": 1}),
)
class EmbeddingDeployment:
    """Loads ECAPA once per replica and embeds batches of 16 kHz signals."""

    def __init__(self) -> None:
        from diglett.model.embedder import (
            Embedder,
            NoopEmbedder,
            RandomEcapa,
            pick_device,
        )
        from diglett.model.model_store import resolve_model_dir

        # Before torch loads OpenMP: idle pool threads sleep instead of
        # spinning, so a multi-threaded replica does not burn the cores the
        # sessions need (2 threads, side by side: lag p95 at 4 sessions
        # 2.0 -> 0.3 s, at 6 1.6 -> 1.0 s). An explicit OMP_WAIT_POLICY is kept.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        settings = Settings.from_env()
        t0 = time.monotonic()
        if settings.embedder == "noop":
            logger.warning("BENCHMARK-ONLY no-op embedder: labels are meaningless")
            self.embedder = NoopEmbedder(settings.noop_window_s)
            self.model_dir = ""
        elif settings.embedder == "ecapa-random":
            logger.warning("BENCHMARK-ONLY random-weight ECAPA: labels are meaningless")
            device = pick_device(settings.device)
            self.embedder = Embedder(RandomEcapa(device), device)
            self.model_dir = ""
        else:
            model_dir = resolve_model_dir(settings)
            self.embedder = Embedder.load(
                model_dir, settings.device, settings.cpu_precision
            )
            self.model_dir = str(model_dir)
        self._on_gpu = self.embedder.device.startswith("cuda")
        self.cpu_int8_fallback = ""  # why the compiled int8 model is not used
        if self.embedder.device == "cpu":
            import torch

            threads = settings.torch_threads or default_torch_threads()
            torch.set_num_threads(threads)
            if self.model_dir and settings.cpu_precision == "int8":
                if settings.cpu_compile:
                    self.cpu_int8_fallback = use_compiled_int8(
                        self.embedder, Path(self.model_dir), settings, threads
                    )
                logger.info("int8 model: %s", self.embedder.cpu_int8)
        elif self._on_gpu:
            # torch here, not at module level: a deployment class that
            # touches torch.backends at import fails to pickle.
            import torch

            # Batch shapes are fixed (padded, below), so cuDNN's autotuning
            # runs once per shape, in the warm-up.
            torch.backends.cudnn.benchmark = True
            if settings.gpu_compile:
                self.embedder.compile()
        self._shapes_setting = settings.parsed_batch_shapes()
        self._window_samples = settings.window_samples
        self._batch_shapes: tuple[int, ...] = ()
        self.warm_up_s = 0.0
        # The model runs in a thread of its own, at the priority the replica
        # started with (Ray starts workers at niceness 15 and its own RPC
        # threads at 0; this replica's worker starts at 0, see placement.py).
        # Its other threads (Serve's event loops, Ray's RPC threads) serve
        # requests and yield the CPU to it like the SessionActors do
        # (Settings.serving_nice); torch's intra-op threads start from it.
        # On a GPU, `gpu_streams` model threads take batches in turn (see
        # Embedder._run_cuda); `@serve.batch` runs as many batches at once.
        streams = settings.gpu_streams if self._on_gpu else 1
        self._model_thread = ThreadPoolExecutor(
            streams, thread_name_prefix="diglett-model"
        )
        self._model_tids = _thread_ids(self._model_thread, streams)
        if getattr(self.embedder, "cpu_int8_build", None) is not None:
            threading.Thread(
                target=self._report_build, name="diglett-int8-build", daemon=True
            ).start()
        lower_cpu_priority(settings.serving_nice, keep=set(self._model_tids))
        self._default_batch_size = settings.batch_size or (
            GPU_BATCH_SIZE if self._on_gpu else CPU_BATCH_SIZE
        )
        self._embed_batch = serve.batch(
            max_batch_size=self._default_batch_size,
            batch_wait_timeout_s=settings.batch_wait_s,
            max_concurrent_batches=streams,
            batch_size_fn=_count_windows,
        )(self._embed_many)
        # Model time, for the autoscaler's busy share (record_autoscaling_stats).
        self._model_s = self._stats_model_s = 0.0
        self._stats_t = time.monotonic()
        self._configure(settings.batch_size, settings.batch_wait_s)
        self.load_s = time.monotonic() - t0
        logger.info(
            "embedding replica ready on %s in %.1f s", self.embedder.device, self.load_s
        )

    def _report_build(self) -> None:
        """Wait for the compiled int8 build this replica started and say how
        it ended. This replica keeps the traced model for its whole life:
        its sessions' enrollments were embedded by it, and a stream scored
        by other numerics than its enrollment drifts (cosine ~0.995).
        Replicas started later load the package (`use_compiled_int8`)."""
        rc = self.embedder.cpu_int8_build.wait()
        package = self.embedder.cpu_int8_package
        if package is not None and package.exists():
            logger.info(
                "int8 model: compiled package built (%s); replicas started from "
                "now on run it, this one stays traced",
                package,
            )
        else:
            log = package.with_suffix(".log") if package is not None else None
            logger.warning("int8 model: compiled build ended %s (%s)", rc, log)

    def reconfigure(self, config: dict) -> None:
        """`user_config`: {"batch_size": int, "batch_wait_s": float}."""
        self._configure(
            int(config.get("batch_size", self._batch_size)),
            float(config.get("batch_wait_s", self._batch_wait_s)),
        )

    def _configure(self, batch_size: int, batch_wait_s: float) -> None:
        """`batch_size` 0: this replica's default (CPU_BATCH_SIZE or
        GPU_BATCH_SIZE, unless DIGLETT_BATCH_SIZE is set)."""
        if batch_size < 0:
            raise ValueError("batch_size must be 0 (the default) or more")
        batch_size = batch_size or self._default_batch_size
        self._batch_size, self._batch_wait_s = batch_size, batch_wait_s
        self._embed_batch.set_max_batch_size(batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch_wait_s)
        # A GPU pads by default; any replica pads when the shapes are set.
        if self._shapes_setting or self._on_gpu:
            from diglett.model.embedder import gpu_batch_shapes

            shapes = self._shapes_setting or gpu_batch_shapes(batch_size)
            if shapes != self._batch_shapes:
                self._batch_shapes = shapes
                self.embedder.set_batch_shapes(shapes)
                # In the model thread, where every batch runs. Serve calls
                # this before the replica takes requests; a live reconfigure
                # to new shapes holds the replica while they warm up
                # (compiled: minutes).
                # Shapes already run are skipped (Embedder.warm_up).
                # Every window length a stream sends: the whole window and
                # the speech parts it is cut to (diglett/engine/speech.py).
                took = sum(
                    self._model_thread.submit(self.embedder.warm_up, n).result()
                    for n in window_lengths(self._window_samples)
                )
                self.warm_up_s += took
                logger.info("batch shapes %s warmed up in %.1f s", shapes, took)

    async def embed(self, signals: list[np.ndarray]) -> list[np.ndarray]:
        """Embeddings (shape (192,), raw) of one caller's signals, in order.

        Signals are float32 in [-1, 1] or int16 (see diglett.engine.audio.to_int16).
        """
        if not signals:
            return []
        # int16 stays int16: the model's device scales it (diglett/model/embedder.py).
        # A backlog (a fast client, a stalled network) can bring more windows
        # than one batch holds: `@serve.batch` refuses an item larger than
        # `max_batch_size`, so such a request is split into batch-sized parts.
        n = self._batch_size
        if len(signals) <= n:
            return await self._embed_batch(signals)
        parts = [signals[i : i + n] for i in range(0, len(signals), n)]
        done = await asyncio.gather(*(self._embed_batch(p) for p in parts))
        return [e for part in done for e in part]

    async def _embed_many(
        self, requests: list[list[np.ndarray]]
    ) -> list[list[np.ndarray]]:
        """The requests `@serve.batch` merged (see __init__), as one model call."""
        flat = [s for r in requests for s in r]
        # The model runs in a thread so the replica keeps accepting requests
        # (and so forms the next batch) while this one computes.
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        embs = await loop.run_in_executor(self._model_thread, self.embedder.embed, flat)
        took = time.monotonic() - t0
        self._model_s += took
        metrics.batch(len(flat), took)
        out, k = [], 0
        for r in requests:
            out.append(embs[k : k + len(r)])
            k += len(r)
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        """For Serve's autoscaler (serve_app/autoscaling.py): the share of
        the time since the last call that the model threads computed."""
        now = time.monotonic()
        span = max(1e-6, now - self._stats_t) * len(self._model_tids)
        busy = min(1.0, (self._model_s - self._stats_model_s) / span)
        self._stats_t, self._stats_model_s = now, self._model_s
        return {"model_busy": busy}

    def _device_name(self) -> str:
        if not self._on_gpu:
            return self.embedder.device
        import torch

        return torch.cuda.get_device_name(torch.device(self.embedder.device))

    def info(self) -> dict:
        """Where the model runs and how the batcher is set."""
        return {
            "device": self.embedder.device,
            "device_name": self._device_name(),
            "pid": os.getpid(),
            "model_dir": self.model_dir,
            "batch_size": self._batch_size,
            "batch_wait_s": self._batch_wait_s,
            "load_s": round(self.load_s, 2),
            "torch_threads": _torch_threads(),
            "model_threads": len(self._model_tids),
            "precision": self.embedder.precision,
            # "compiled" or "traced" (int8 on a CPU; diglett/model/compiled_int8.py)
            "cpu_int8": getattr(self.embedder, "cpu_int8", ""),
            "cpu_int8_fallback": self.cpu_int8_fallback,
            "batch_shapes": list(self._batch_shapes),
            "compiled": self.embedder.compiled,
            "warm_up_s": round(self.warm_up_s, 2),
            "niceness": {
                "model_thread": os.getpriority(os.PRIO_PROCESS, self._model_tids[0]),
                "others": thread_niceness(skip=set(self._model_tids)),
            },
        }
