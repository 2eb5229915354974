#!/usr/bin/env python
"""The CPU int8 models side by side: traced (torch.ao + TorchScript) against
torchao's int8, eager and compiled ahead of time (the server's default).

The traced model (diglett/model/int8.py) rests on two APIs torch 2.11 deprecates;
the compiled one (diglett/model/compiled_int8.py) is torchao's
`Int8DynamicActivationInt8WeightConfig` on the same time-major network,
exported and built by AOTInductor. Measured on the same 1.5 s windows of
real speech:

- `traced`: fbgemm int8 GEMMs, activations scaled per batch;
- `torchao eager`: torchao's int8 without compiling (activations scaled per
  frame, so a window's embedding no longer depends on its batch);
- `compiled`: this machine's package from the cache, as a replica loads it
  (built first if missing; the build time is printed);
- with `--torch-compile`, also `torch.compile` of the torchao network at
  run time, static shapes (a new batch size compiles again) and dynamic.

ECAPA's network only (features computed once), one torch thread, side by
side and interleaved `--rounds` times, at each batch size of `--batches`.
Prints windows/s, CPU per window, cosine to float32 and how far a window
moves with its batch neighbours.

    .venv/bin/python -m bench.compiled_int8 --batches 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from bench.cpu_model import SPEAKERS, _windows


def _rate(net, feats, seconds: float) -> tuple[float, float]:
    """(windows/s, CPU ms per window) of repeated forwards of `feats`
    (batch, frames, 80)."""
    import torch

    with torch.inference_mode():
        net(feats)
        wall0, cpu0, n = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - wall0 < seconds:
            net(feats)
            n += feats.shape[0]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return n / wall, 1e3 * cpu / n


def _cosines(net, feats, ref) -> tuple[float, float, float]:
    """(mean and min cosine to float32 `ref`, (batch, 192); and the largest
    1 - cosine between a window embedded alone and within the batch)."""
    import torch

    cos = torch.nn.functional.cosine_similarity
    with torch.inference_mode():
        batch = net(feats).reshape(feats.shape[0], -1)
        n = min(4, feats.shape[0])
        alone = torch.cat([net(feats[i : i + 1]).reshape(1, -1) for i in range(n)])
    c = cos(batch, ref)
    moved = float((1 - cos(alone, batch[:n])).max())
    return float(c.mean()), float(c.min()), moved


def main() -> int:
    import torch

    from diglett.model import compiled_int8
    from diglett.model.int8 import quantize_int8
    from diglett.model.model_store import load_encoder, resolve_model_dir
    from diglett.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--batches", default="8", help="batch sizes, comma-separated: 1,2,4,8"
    )
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--torch-compile", action="store_true", help="also torch.compile at run time"
    )
    ap.add_argument("--data", type=Path, default=SPEAKERS)
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # deprecations of the traced model's APIs
    torch.set_num_threads(1)
    settings = Settings.from_env()
    model_dir = resolve_model_dir(settings)
    encoder = load_encoder(model_dir, "cpu")
    ecapa = encoder.mods.embedding_model.eval()
    batches = [int(b) for b in args.batches.split(",")]
    largest = max(batches)
    wavs = torch.from_numpy(np.stack(_windows(args.data, largest)))
    ones = torch.ones(largest)
    with torch.inference_mode():
        feats = encoder.mods.mean_var_norm(encoder.mods.compute_features(wavs), ones)
        ref = ecapa(feats, ones).reshape(largest, -1)

    traced = quantize_int8(copy.deepcopy(ecapa))
    package = compiled_int8.package_path(settings.cache_dir, 1)
    if not package.exists():
        t0 = time.monotonic()
        compiled_int8.build(model_dir, package, 1)
        print(f"built {package} in {time.monotonic() - t0:.0f} s")
    nets = {
        "traced": traced,
        "torchao eager": compiled_int8.quantized_network(ecapa),
        "compiled": compiled_int8.load(package, traced),
    }
    for name, dynamic in (
        ("torch.compile static", False),
        ("torch.compile dynamic", True),
    ):
        if not args.torch_compile:
            break
        net = torch.compile(compiled_int8.quantized_network(ecapa), dynamic=dynamic)
        t0 = time.monotonic()
        with torch.inference_mode():
            net(feats)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        with torch.inference_mode():
            net(feats[:1])  # another batch size
        print(
            f"{name}: first call {first:.1f} s, "
            f"then batch 1 {time.monotonic() - t0:.1f} s"
        )
        nets[name] = net
    for name, net in nets.items():
        mean, low, moved = _cosines(net, feats, ref)
        print(
            f"{name}: cosine to fp32 mean {mean:.4f} min {low:.4f}; "
            f"alone against in its batch: 1 - cosine up to {moved:.2e}"
        )
    # Interleaved: every round runs each batch size of each model once.
    results: dict[tuple[str, int], list] = {}
    for _ in range(args.rounds):
        for batch in batches:
            for name, net in nets.items():
                rate = _rate(net, feats[:batch], args.seconds)
                results.setdefault((name, batch), []).append(rate)
    for (name, batch), runs in results.items():
        print(
            json.dumps(
                {
                    "model": name,
                    "batch": batch,
                    "windows_per_s": round(float(np.median([r for r, _ in runs])), 1),
                    "cpu_ms_per_window": round(
                        float(np.median([c for _, c in runs])), 1
                    ),
                }
            ),
            flush=True,
        )
    for batch in batches:
        base = np.median([r for r, _ in results[("traced", batch)]])
        for name in nets:
            if name != "traced":
                ratio = np.median([r for r, _ in results[(name, batch)]]) / base
                print(f"batch {batch}: {name} / traced, windows/s: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
