"""CPU time of the SessionEngine per hop, settings side by side.

The SessionActor's own work for a hop (resampling, the speech detector, the
decision), without the embedding model: each dev-set conversation of a fold
(`bench/devset.py`) is replayed through a fresh engine in 0.1 s frames, every
embedding answered with a fixed random unit vector, and the thread's CPU time
is divided by the hops labelled. Variants alternate round by round, so the
machine's noise falls on each alike; the medians over rounds are compared.
It also counts the hops whose quiet speech was scored again
(`speech.SileroDetector.recheck_quiet`).

    .venv/bin/python -m bench.engine_cost                      # off vs on
    .venv/bin/python -m bench.engine_cost --variant vad=energy --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import devset, tune_decision as td  # noqa: E402
from diglett.engine import speech  # noqa: E402
from diglett.settings import Settings  # noqa: E402


def parse_variant(text: str, base: Settings) -> Settings:
    """'key=value,key=value' over `base` ('' = `base` itself)."""
    change = {}
    for part in filter(None, text.split(",")):
        key, _, raw = part.partition("=")
        if not hasattr(base, key):
            raise ValueError(f"no setting {key!r} (see diglett/settings.py)")
        change[key] = type(getattr(base, key))(raw)
    return dataclasses.replace(base, **change)


class RecheckCounter:
    """Counts the hops whose quiet frames were scored again, while installed."""

    def __init__(self) -> None:
        self.hops = 0
        self._orig = speech.SileroDetector.recheck_quiet

    def __enter__(self) -> "RecheckCounter":
        orig = self._orig

        def counted(det, *args, **kw):
            n = orig(det, *args, **kw)
            self.hops += n > 0
            return n

        speech.SileroDetector.recheck_quiet = counted
        return self

    def __exit__(self, *exc) -> None:
        speech.SileroDetector.recheck_quiet = self._orig


def cpu_per_hop(preps: list[td.Prepared], settings: Settings) -> tuple[float, int, int]:
    """(CPU ms per labelled hop, hops, hops scored again) over `preps`."""
    vec = np.random.default_rng(0).standard_normal(192).astype(np.float32)
    vec /= np.linalg.norm(vec)

    def embed(job):
        return vec

    cpu, hops = 0.0, 0
    with RecheckCounter() as counter:
        for p in preps:
            t0 = time.thread_time()
            msgs, _ = td.drive(p, settings, embed, embed)
            cpu += time.thread_time() - t0
            hops += len(td.label_msgs(msgs))
    return 1000 * cpu / max(hops, 1), hops, counter.hops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fold", default="0", help="the dev-set fold replayed")
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--variant",
        action="append",
        help="settings over the defaults, 'key=value,...' (repeatable); "
        "default: quiet_gain_db=0 against the defaults",
    )
    args = ap.parse_args(argv)
    base = Settings.from_env(dotenv=False)
    variants = args.variant or ["quiet_gain_db=0", ""]
    settings = [parse_variant(v, base) for v in variants]
    convs = devset.dev_set(args.per_condition, which=[args.fold])
    preps = [td.prepare(d.key, d.conv) for d in convs]
    audio_s = sum(d.conv.duration_s for d in convs)
    print(f"fold {args.fold}: {len(preps)} conversations, {audio_s / 60:.1f} min")
    results: dict[str, list[float]] = {v: [] for v in variants}
    counts: dict[str, tuple[int, int]] = {}
    for r in range(args.rounds):
        for v, s in zip(variants, settings):
            ms, hops, again = cpu_per_hop(preps, s)
            results[v].append(ms)
            counts[v] = (hops, again)
            print(f"round {r + 1} {v or 'defaults'}: {ms:.3f} ms/hop", flush=True)
    print(
        "\n| settings | CPU per hop, median (ms) | rounds (ms) | hops | scored again |"
    )
    print("|---|---|---|---|---|")
    for v in variants:
        hops, again = counts[v]
        runs = ", ".join(f"{x:.3f}" for x in results[v])
        print(
            f"| {v or 'defaults'} | {statistics.median(results[v]):.3f} | {runs} "
            f"| {hops} | {again} ({100 * again / max(hops, 1):.1f} %) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
