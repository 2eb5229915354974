#!/usr/bin/env python
"""ECAPA alone on this CPU: windows/s and CPU per window, fp32 against int8.

Four models: fp32 (SpeechBrain's, exact), int8 (the default: pointwise
layers int8, time-major, traced, each window run alone so that its
embedding never depends on its batch), int8-batched (the same model run on
whole batches, as it was before: its activation scales are the batch's) and
int8-channel-major (int8 with SpeechBrain's own layout, eager: the first
int8 default), with each model's cosine to fp32 on the benchmark's windows.

Runs the model as the CPU replica does (`Embedder`, 1.5 s windows of real
speech), for each precision and torch thread count, side by side in one run
and `--rounds` times interleaved, so a noisy shared machine hits all
configurations alike. No Ray, no server.

    .venv/bin/python -m bench.cpu_model                 # batch 8, threads 1 and all
    .venv/bin/python -m bench.cpu_model --batch 4 --seconds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from bench.harness import SPEAKERS


def _windows(folder: Path, n: int) -> list[np.ndarray]:
    """`n` 1.5 s windows of real speech, shape (24000,) each."""
    out: list[np.ndarray] = []
    for row in csv.DictReader((folder / "manifest.csv").open()):
        x = sf.read(folder / row["file"], dtype="float32")[0]
        out += [x[k : k + 24000] for k in range(0, x.size - 24000, 24000)]
        if len(out) >= n:
            return out[:n]
    raise SystemExit(f"{folder} holds fewer than {n} windows")


def _rate(embedder, batch: list[np.ndarray], seconds: float) -> tuple[float, float]:
    """(windows/s, CPU ms per window) of repeated `embed(batch)` calls."""
    embedder.embed(batch)
    wall0, cpu0, n = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - wall0 < seconds:
        embedder.embed(batch)
        n += len(batch)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return n / wall, 1e3 * cpu / n


def main() -> int:
    import torch

    from diglett.engine.decision import normalize
    from diglett.model.embedder import Embedder
    from diglett.model.model_store import resolve_model_dir
    from diglett.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    args = ap.parse_args()
    model_dir = resolve_model_dir(Settings.from_env())
    models = {p: Embedder.load(model_dir, "cpu", p) for p in ("fp32", "int8")}
    models["int8-batched"] = Embedder.load(model_dir, "cpu", "int8")
    mods = models["int8-batched"].encoder.mods
    mods.embedding_model = mods.embedding_model.model  # whole batches at once
    models["int8-channel-major"] = _channel_major_int8(model_dir)
    batch = _windows(args.data, args.batch)
    ref = np.stack([normalize(e) for e in models["fp32"].embed(batch)])
    for name, emb in models.items():
        cos = np.sum(ref * np.stack([normalize(e) for e in emb.embed(batch)]), 1)
        print(f"{name}: cosine to fp32 mean {cos.mean():.4f} min {cos.min():.4f}")
    threads = sorted({1, os.cpu_count() or 1})
    results: dict[str, list] = {}
    for _ in range(args.rounds):
        for t in threads:
            torch.set_num_threads(t)
            for name, emb in models.items():
                results.setdefault(f"{name} threads={t}", []).append(
                    _rate(emb, batch, args.seconds)
                )
    rows = []
    for key, runs in results.items():
        rate = float(np.median([r for r, _ in runs]))
        cpu = float(np.median([c for _, c in runs]))
        rows.append(
            {
                "config": key,
                "windows_per_s": round(rate, 1),
                "cpu_ms_per_window": round(cpu, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    for t in threads:
        for base in ("fp32", "int8-batched", "int8-channel-major"):
            a, b = (results[f"{p} threads={t}"] for p in (base, "int8"))
            ratio = np.median([r for r, _ in b]) / np.median([r for r, _ in a])
            print(f"int8 / {base} windows/s with {t} thread(s): {ratio:.2f}x")
    return 0


def _channel_major_int8(model_dir: Path):
    """The int8 model with SpeechBrain's channel-major layout (the earlier
    default), for comparison."""
    from diglett.model.embedder import Embedder
    from diglett.model.int8 import quantize_int8

    emb = Embedder.load(model_dir, "cpu", "fp32")
    mods = emb.encoder.mods
    mods.embedding_model = quantize_int8(mods.embedding_model, time_major=False)
    emb.precision = "int8"
    return emb


if __name__ == "__main__":
    sys.exit(main())
