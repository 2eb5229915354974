"""Embeddings of audio snippets, computed once and kept on disk by content.

The tuning and cross-validation scripts ask for the embeddings of many
windows, again and again as they try settings; the model's answer depends
only on the samples, so they are keyed by a digest of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

DEFAULT_MODEL_DIR = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "models"
    / "spkrec-ecapa-voxceleb"
)


def digest(x: np.ndarray) -> str:
    return hashlib.blake2b(
        np.ascontiguousarray(x, np.float32).tobytes(), digest_size=12
    ).hexdigest()


class EmbedCache:
    """`embed(xs)` -> (n, 192) raw embeddings; misses go to the model in
    batches of equal-length signals, hits come from `path` (an .npz)."""

    def __init__(self, path: Path, model_dir: Path | None = None, precision="int8"):
        self.path = Path(path)
        self.model_dir = Path(
            model_dir or os.environ.get("DIGLETT_MODEL_DIR") or DEFAULT_MODEL_DIR
        )
        self.precision = precision
        self._model = None
        self.cache: dict[str, np.ndarray] = {}
        if self.path.is_file():
            z = np.load(self.path)
            self.cache = {k: z[k] for k in z.files}
        self.new = 0
        self.added: list[str] = []  # keys computed here (a worker hands them back)

    def model(self):
        if self._model is None:
            from diglett.model.embedder import Embedder

            self._model = Embedder.load(self.model_dir, "cpu", self.precision)
            self._model.max_batch = 32
        return self._model

    def embed(self, xs: list[np.ndarray]) -> np.ndarray:
        keys = [digest(x) for x in xs]
        todo: dict[str, np.ndarray] = {}
        for k, x in zip(keys, xs):
            if k not in self.cache:
                todo[k] = x
        if todo:
            embs = self.model().embed(list(todo.values()))
            self.cache.update(zip(todo, (np.asarray(e, np.float32) for e in embs)))
            self.new += len(todo)
            self.added.extend(todo)
        if not keys:
            return np.zeros((0, 192), np.float32)
        return np.stack([self.cache[k] for k in keys])

    def save(self) -> None:
        if not self.new:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **self.cache)
        os.replace(tmp, self.path)
        self.new = 0
