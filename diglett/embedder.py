"""Batched ECAPA embeddings with SpeechBrain (torch; no Ray, no FastAPI).

Inputs of equal length run as one padded-free batch; different lengths run
as separate sub-batches. Measured on the real model: padding a 0.5 s window
into a batch with a 5 s clip (SpeechBrain's relative lengths) moves its
embedding to cosine 0.98 of the unpadded one, because the convolutions see
the padding; exact-length groups keep batched and single results identical.
Stream windows all have the same length, so in practice a batch is one group.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 192
# ECAPA's reflect padding fails below ~0.05 s; shorter signals are tiled to
# this length (a repeated snippet still gives a usable embedding).
MIN_SAMPLES = 1600


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

    @classmethod
    def load(
        cls, model_dir: Path, device: str = "auto", cpu_precision: str = "fp32"
    ) -> "Embedder":
        """`cpu_precision` "int8" quantizes the model when it runs on the CPU
        (see diglett/int8.py); a GPU always runs it in fp16 autocast."""
        from diglett.model_store import load_encoder
        from diglett.settings import CPU_PRECISIONS

        if cpu_precision not in CPU_PRECISIONS:
            raise ValueError(
                f"cpu_precision must be int8 or fp32, not {cpu_precision!r}"
            )
        dev = pick_device(device)
        encoder = load_encoder(model_dir, dev)
        if dev == "cpu" and cpu_precision == "int8":
            from diglett.int8 import quantize_int8

            encoder.mods.embedding_model = quantize_int8(encoder.mods.embedding_model)
        return cls(encoder, dev, cpu_precision=cpu_precision)

    def embed(self, signals: list[np.ndarray]) -> list[np.ndarray]:
        """Raw (not length-normalised) embeddings, shape (192,) each, in order.

        Each signal has shape (n_i,), float32 in [-1, 1] at 16 kHz, n_i > 0.
        """
        signals = [_at_least(s) for s in signals]
        out: list[np.ndarray | None] = [None] * len(signals)
        groups: dict[int, list[int]] = defaultdict(list)
        for i, s in enumerate(signals):
            groups[int(s.shape[0])].append(i)
        for idx in groups.values():
            for k in range(0, len(idx), self.max_batch):
                chunk = idx[k : k + self.max_batch]
                embs = self._run(np.stack([signals[i] for i in chunk]))
                for i, e in zip(chunk, embs):
                    out[i] = e
        return out  # type: ignore[return-value]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Embed a (b, n) float32 array; returns (b, 192) float32."""
        import torch

        wavs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        wavs = wavs.to(self.device)
        lens = torch.ones(wavs.shape[0], device=self.device)
        with torch.inference_mode():
            if self.device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.float16):
                    emb = self.encoder.encode_batch(wavs, lens)
            else:
                emb = self.encoder.encode_batch(wavs, lens)
        return emb.reshape(emb.shape[0], -1).float().cpu().numpy()


def _at_least(x: np.ndarray, n: int = MIN_SAMPLES) -> np.ndarray:
    """`x` (shape (m,), m > 0) tiled up to `n` samples when shorter."""
    if x.size == 0:
        raise ValueError("cannot embed an empty signal")
    return np.resize(x, n) if x.size < n else x


class NoopEmbedder:
    """BENCHMARK ONLY: a constant embedding per signal, no model.

    Lets `bench/load.py` measure what the serving path itself costs
    (WebSocket ingress, SessionActors, batching) with the model taken out.
    Selected by `DIGLETT_EMBEDDER=noop`; never the default.
    """

    device = "none"
    precision = "none"

    def __init__(self) -> None:
        self._vec = np.ones(EMBEDDING_DIM, dtype=np.float32)

    def embed(self, signals: list[np.ndarray]) -> list[np.ndarray]:
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
        self.fbank = Fbank(n_mels=80).to(device)
        self.norm = InputNormalization(norm_type="sentence", std_norm=False).to(device)
        self.model = (
            ECAPA_TDNN(
                80,
                channels=[1024, 1024, 1024, 1024, 3072],
                kernel_sizes=[5, 3, 3, 3, 1],
                dilations=[1, 2, 3, 4, 1],
                attention_channels=128,
                lin_neurons=192,
            )
            .to(device)
            .eval()
        )

    def encode_batch(self, wavs, wav_lens):
        feats = self.norm(self.fbank(wavs), wav_lens)
        return self.model(feats, wav_lens)
