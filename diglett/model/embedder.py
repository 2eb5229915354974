"""Batched ECAPA embeddings with SpeechBrain (torch; no Ray, no FastAPI).

Inputs of equal length run as one padded-free batch; different lengths run
as separate sub-batches. Measured on the real model: padding a 0.5 s window
into a batch with a 5 s clip (SpeechBrain's relative lengths) moves its
embedding to cosine 0.98 of the unpadded one, because the convolutions see
the padding; exact-length groups keep batched and single results identical.
Stream windows all have the same length, so in practice a batch is one group.

Signals may be int16 (how windows travel, diglett/engine/audio.py): a group of them
is stacked as int16 and scaled to float on the model's device, which on a
GPU halves the bytes copied to it and takes the conversion off the CPU
(17-30 ms a batch of 512 on this project's 2-core machine).

On a GPU, batches are padded up to a few fixed sizes (`batch_shapes`,
filled with copies of their first row: rows do not mix in eval mode), so
cuDNN's autotuned kernels and, with `compile`, `torch.compile`'s graphs are
made once per size at start-up instead of once per batch size met in use
(a new shape recompiles for ~a minute).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 192
# ECAPA's reflect padding fails below ~0.05 s; shorter signals are tiled to
# this length (a repeated snippet still gives a usable embedding).
MIN_SAMPLES = 1600


def gpu_batch_shapes(batch_size: int) -> tuple[int, ...]:
    """The padded batch sizes a GPU replica uses by default: 8, 16, 32, 64,
    then every multiple of 64 up to `batch_size`, and `batch_size` itself.

    A batch of over 448 then carries at most 1/8 filler (449 runs as 512):
    near saturation, where batches are large, the GPU loses little, and
    small batches cost a GPU little either way. ~12 shapes at 512, each
    warmed up at start (cuDNN's autotuning: seconds in all, eager).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    shapes = {batch_size, *(k for k in (8, 16, 32) if k < batch_size)}
    shapes.update(range(64, batch_size, 64))
    return tuple(sorted(shapes))


def padded_size(n: int, shapes: tuple[int, ...]) -> int:
    """The smallest of `shapes` (sorted) holding `n` rows; `n` when none is
    set or none is large enough."""
    for k in shapes:
        if k >= n:
            return k
    return n


def pick_device(setting: str) -> str:
    """`auto` → `cuda` when a GPU is visible, else `cpu`; other values pass."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


class Embedder:
    """Wraps a SpeechBrain EncoderClassifier for lists of 16 kHz signals."""

    def __init__(
        self, encoder, device: str, max_batch: int = 256, cpu_precision: str = "fp32"
    ) -> None:
        self.encoder = encoder
        self.device = device
        self.max_batch = max_batch
        # What the model computes in (reported by the replica's `info()`).
        self.precision = "fp16" if device.startswith("cuda") else cpu_precision
        self.batch_shapes: tuple[int, ...] = ()
        self.compiled = False
        self._warmed: set[tuple[int, int]] = set()  # (rows, samples) run once
        self._lanes = threading.local()  # per model thread, on a GPU
        # torch.compile'd code is not thread-safe (pytorch/pytorch#118260):
        # with it, model threads enqueue their kernels one at a time.
        self._compiled_lock = threading.Lock()
        # On a CPU with int8: "traced" or "compiled" (use_compiled_int8).
        self.cpu_int8 = "traced" if self.precision == "int8" else ""
        self.cpu_int8_package: Path | None = None  # this machine's compiled one
        self.cpu_int8_build = None  # its background build, if this one started it

    def set_batch_shapes(self, shapes: tuple[int, ...]) -> None:
        """Pad each batch to the next of `shapes` and run at most the largest
        at once; `()` runs batches as they come (at most `max_batch`)."""
        self.batch_shapes = tuple(sorted(set(shapes)))
        if self.batch_shapes:
            self.max_batch = self.batch_shapes[-1]

    def compile(self) -> None:
        """Run ECAPA (not its feature extraction) through `torch.compile`.

        Each batch shape compiles on its first use (~80 s for the first on
        an H100, less for the next), so call `warm_up` before serving, with
        `batch_shapes` set; other signal lengths (enrollments' fallback)
        compile when they come.
        """
        import torch

        mods = self.encoder.mods
        mods["embedding_model"] = torch.compile(mods["embedding_model"], dynamic=False)
        self.compiled = True
        self._warmed.clear()  # the compiled graphs are still to be made

    def warm_up(self, n_samples: int) -> float:
        """Run every batch shape not run yet once with `n_samples`-long
        signals, so the kernels they pick (and compiled graphs) are ready;
        returns seconds. Shapes set again (a replica's start, then its
        `user_config`) are not run again."""
        import time

        t0 = time.monotonic()
        n = max(n_samples, MIN_SAMPLES)
        row = np.zeros(n, dtype=np.int16)
        for k in self.batch_shapes:
            if (k, n) not in self._warmed:
                self._run([row] * k)
                self._warmed.add((k, n))
        return time.monotonic() - t0

    @classmethod
    def load(
        cls, model_dir: Path, device: str = "auto", cpu_precision: str = "fp32"
    ) -> "Embedder":
        """`cpu_precision` "int8" quantizes the model when it runs on the CPU
        (see diglett/model/int8.py); a GPU always runs it in fp16 autocast."""
        from diglett.model.model_store import load_encoder
        from diglett.settings import CPU_PRECISIONS

        if cpu_precision not in CPU_PRECISIONS:
            raise ValueError(
                f"cpu_precision must be int8 or fp32, not {cpu_precision!r}"
            )
        dev = pick_device(device)
        encoder = load_encoder(model_dir, dev)
        if dev == "cpu" and cpu_precision == "int8":
            from diglett.model.int8 import quantize_int8

            encoder.mods.embedding_model = quantize_int8(encoder.mods.embedding_model)
        return cls(encoder, dev, cpu_precision=cpu_precision)

    def use_compiled_int8(
        self, model_dir: Path, cache_dir: str | Path, threads: int
    ) -> str:
        """Run this machine's compiled int8 package (diglett/model/compiled_int8.py)
        if one is built for `threads` torch threads; otherwise start its
        build in the background (`cpu_int8_build`) for replicas started
        later, and keep the traced model. Returns what runs now: "compiled"
        or "traced"."""
        from diglett.model import compiled_int8

        if self.device != "cpu" or self.precision != "int8":
            raise ValueError("only a CPU int8 model has a compiled form")
        package = self.cpu_int8_package = compiled_int8.package_path(cache_dir, threads)
        if not self.adopt_compiled_int8():
            try:  # our cache's, unusable: build anew
                package.unlink(missing_ok=True)
                compiled_int8.runner_path(package).unlink(missing_ok=True)
            except OSError:
                pass  # a read-only cache: start_build says so
            self.cpu_int8_build = compiled_int8.start_build(model_dir, package, threads)
        return self.cpu_int8

    def adopt_compiled_int8(self) -> bool:
        """Load the compiled package if it is built and loads; True if it
        runs now. Called once, before the replica serves: a model is never
        swapped under live sessions, whose enrollments it embedded.
        """
        from diglett.model import compiled_int8

        if self.cpu_int8 == "compiled":
            return True
        package = self.cpu_int8_package
        if package is None or not package.exists():
            return False
        mods = self.encoder.mods
        compiled = compiled_int8.load(package, mods.embedding_model)
        if compiled is None:
            return False
        mods.embedding_model = compiled
        self.cpu_int8 = "compiled"
        return True

    def embed(self, signals: list[np.ndarray]) -> list[np.ndarray]:
        """Raw (not length-normalised) embeddings, shape (192,) each, in order.

        Each signal has shape (n_i,), n_i > 0, at 16 kHz: float32 in [-1, 1]
        or int16 (full scale 32768, see diglett.engine.audio.to_int16).
        """
        signals = [_at_least(s) for s in signals]
        out: list[np.ndarray | None] = [None] * len(signals)
        groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
        for i, s in enumerate(signals):
            groups[int(s.shape[0]), s.dtype == np.int16].append(i)
        for (_, is_int16), idx in groups.items():
            dtype = np.int16 if is_int16 else np.float32
            for k in range(0, len(idx), self.max_batch):
                chunk = idx[k : k + self.max_batch]
                rows = [np.asarray(signals[i], dtype=dtype) for i in chunk]
                for i, e in zip(chunk, self._run(rows)):
                    out[i] = e
        return out  # type: ignore[return-value]

    def _run(self, rows: list[np.ndarray]) -> np.ndarray:
        """Embed equal-length rows, all int16 or all float32, each shape
        (n,); returns (len(rows), 192) float32."""
        import torch

        if self.device.startswith("cuda"):
            return self._run_cuda(rows)
        b = len(rows)
        wavs = torch.from_numpy(np.stack(rows))
        return self._forward(wavs, b).cpu().numpy()

    def _forward(self, wavs, b: int):
        """(b, n) int16 or float32 on the model's device → (b, 192) float32
        there; pads to `batch_shapes` and drops the padding again."""
        import torch

        if wavs.dtype == torch.int16:  # on the model's device: see the top
            wavs = wavs.float().mul_(1.0 / 32768.0)
        k = padded_size(b, self.batch_shapes)
        if k > b:
            wavs = torch.cat([wavs, wavs[:1].expand(k - b, -1)])
        lens = torch.ones(k, device=wavs.device)
        lock = self._compiled_lock if self.compiled else contextlib.nullcontext()
        with torch.inference_mode(), lock:
            if wavs.is_cuda:
                with torch.autocast("cuda", dtype=torch.float16):
                    emb = self.encoder.encode_batch(wavs, lens)
            else:
                emb = self.encoder.encode_batch(wavs, lens)
        return emb[:b].reshape(b, -1).float()

    def _run_cuda(self, rows: list[np.ndarray]) -> np.ndarray:
        """`_run` on a GPU, in this thread's own CUDA stream.

        The rows are stacked straight into a pinned buffer, which the GPU
        copies from without the CPU; with two model threads (the replica's
        `DIGLETT_GPU_STREAMS`), one thread stacks and copies the next batch
        while the GPU computes the other's. The buffer is reused only after
        `.cpu()` has waited for this stream, so a copy never reads it torn.
        """
        import torch

        lane = getattr(self._lanes, "lane", None)
        if lane is None:
            lane = self._lanes.lane = _CudaLane(torch.device(self.device))
        host = lane.host(rows[0].dtype, len(rows), rows[0].shape[0])
        np.stack(rows, out=host.numpy())
        with torch.cuda.stream(lane.stream):
            wavs = host.to(self.device, non_blocking=True)
            return self._forward(wavs, len(rows)).cpu().numpy()


class _CudaLane:
    """A model thread's CUDA stream and its reusable pinned host buffer."""

    def __init__(self, device) -> None:
        import torch

        self.stream = torch.cuda.Stream(device)
        self._buf = torch.empty(0, dtype=torch.uint8)

    def host(self, dtype: np.dtype, b: int, n: int):
        """A pinned (b, n) tensor of `dtype` (int16 or float32)."""
        import torch

        tdtype = torch.int16 if dtype == np.int16 else torch.float32
        nbytes = b * n * tdtype.itemsize
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self._buf[:nbytes].view(tdtype).view(b, n)


def _at_least(x: np.ndarray, n: int = MIN_SAMPLES) -> np.ndarray:
    """`x` (shape (m,), m > 0) tiled up to `n` samples when shorter."""
    if x.size == 0:
        raise ValueError("cannot embed an empty signal")
    return np.resize(x, n) if x.size < n else x


class NoopEmbedder:
    """BENCHMARK ONLY: a constant embedding per signal, no model.

    Lets `bench/load.py` measure what the serving path itself costs
    (WebSocket ingress, SessionActors, batching) with the model taken out.
    Selected by `DIGLETT_EMBEDDER=noop`; never the default. With
    `window_s` > 0 it takes that long per window, asleep: a model of known
    cost that uses no CPU (the multi-node autoscaling test keeps a replica
    busy with it on a 2-core machine).
    """

    device = "none"
    precision = "none"
    compiled = False

    def __init__(self, window_s: float = 0.0) -> None:
        self._vec = np.ones(EMBEDDING_DIM, dtype=np.float32)
        self.batch_shapes: tuple[int, ...] = ()
        self.window_s = window_s

    def set_batch_shapes(self, shapes: tuple[int, ...]) -> None:
        self.batch_shapes = tuple(sorted(set(shapes)))

    def warm_up(self, n_samples: int) -> float:
        return 0.0

    def embed(self, signals: list[np.ndarray]) -> list[np.ndarray]:
        if self.window_s > 0:
            time.sleep(self.window_s * len(signals))
        return [self._vec for _ in signals]


class RandomEcapa:
    """BENCHMARK ONLY: ECAPA-TDNN of the real shape with random weights.

    The GPU machine cannot receive the 83 MB of weights beside Ray's wheels,
    and speed does not depend on the weight values. Mirrors the pieces of
    `EncoderClassifier.encode_batch`: Fbank → sentence mean norm → ECAPA.
    """

    def __init__(self, device: str) -> None:
        import torch
        from speechbrain.lobes.features import Fbank
        from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN
        from speechbrain.processing.features import InputNormalization

        torch.manual_seed(0)
        # Named as in SpeechBrain's EncoderClassifier (`Embedder.compile`).
        self.mods = torch.nn.ModuleDict(
            {
                "compute_features": Fbank(n_mels=80),
                "mean_var_norm": InputNormalization(
                    norm_type="sentence", std_norm=False
                ),
                "embedding_model": ECAPA_TDNN(
                    80,
                    channels=[1024, 1024, 1024, 1024, 3072],
                    kernel_sizes=[5, 3, 3, 3, 1],
                    dilations=[1, 2, 3, 4, 1],
                    attention_channels=128,
                    lin_neurons=192,
                ),
            }
        )
        self.mods.to(device).eval()

    def encode_batch(self, wavs, wav_lens):
        """(batch, samples) float32 → (batch, 1, 192) embeddings."""
        feats = self.mods["mean_var_norm"](
            self.mods["compute_features"](wavs), wav_lens
        )
        return self.mods["embedding_model"](feats, wav_lens)
