"""The dev set again with the silence between turns cut short.

`bench/devset.py` leaves 0.2–2 s between turns, so a third of a
conversation is nobody talking and a rule that learns the stream's
background from whole quiet hops always finds some. People in a quick
conversation leave a few hundred milliseconds, and no 0.5 s hop falls
wholly into such a gap. This replays the same conversations (the same
speech, noise and enrollments) with every stretch of silence longer than
`--gap-s` cut to its middle `--gap-s`, through the server's
`SessionEngine` with the defaults beside a few rows of settings, scored
like `bench/cv_decision.py` (one setting, no cross-validation: the rows
differ only in the rules named). It writes bench/results/short_gaps.json
and the `short_gaps` block of docs/accuracy.md.

    .venv/bin/python -m bench.short_gaps                 # 0.3 s gaps
    .venv/bin/python -m bench.short_gaps --gap-s 0.05 --table ''
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import conversations as cv  # noqa: E402
from bench import cv_decision as cvd  # noqa: E402
from bench import devset, tune_decision as td  # noqa: E402
from bench.doc_blocks import write_block  # noqa: E402
from bench.embed_cache import EmbedCache  # noqa: E402
from diglett.engine import session  # noqa: E402
from diglett.settings import SAMPLE_RATE, Settings  # noqa: E402


def _whole_hop_floor():
    """The background level over whole hops at 3 dB: the code before."""
    undo = [
        cvd._patch(session, "FLOOR_BLOCK_S", 0.5),
        cvd._patch(session, "FLOOR_BLOCK", SAMPLE_RATE // 2),
    ]
    return lambda: [u() for u in undo]


# (name, patch returning its undo, settings changed)
ROWS = (
    ("defaults", lambda: (lambda: None), {}),
    ("without faint matches at the background level", cvd._no_faint_match, {}),
    (
        "without the background-level rule",
        lambda: (lambda: None),
        {"background_margin_db": 0.0},
    ),
    (
        "background level over whole hops, 3 dB (before)",
        _whole_hop_floor,
        {"background_margin_db": 3.0},
    ),
)


def run(args) -> dict:
    t0 = time.perf_counter()
    base = Settings.from_env(dotenv=False)
    cache = EmbedCache(Path(args.cache))
    regimes = {}
    for gap in (None, args.gap_s):
        devs = devset.dev_set(args.per_condition, quick=False)
        if gap is not None:
            devs = [devset.squeeze_gaps(d, gap) for d in devs]
        preps = [td.prepare(d.key, d.conv) for d in devs]
        talk = sum(
            e - s for d in devs for s, e, lab in d.conv.truth if lab != cv.SILENCE
        )
        total = sum(d.conv.duration_s for d in devs)
        rows = {}
        for name, patch, change in ROWS:
            undo = patch()
            try:
                settings = dataclasses.replace(base, **change)
                scores = cvd.score_all(devs, preps, settings, cache, args.jobs)
            finally:
                undo()
            five = [s for d, s in zip(devs, scores) if d.fold != devset.HELD]
            held = [s for d, s in zip(devs, scores) if d.fold == devset.HELD]
            g = cvd.groups([d for d in devs if d.fold != devset.HELD], five)
            rows[name] = {
                "five_folds": round(cvd.pooled(five).accuracy, 4),
                "worst_fold": min(g["fold"].values()),
                "held": round(cvd.pooled(held).accuracy, 4),
                "groups": g,
            }
            print(f"gaps {gap}: {name}: {rows[name]['five_folds']:.4f}", flush=True)
        key = "as built" if gap is None else f"gaps cut to {gap:g} s"
        regimes[key] = {"silence_share": round(1 - talk / total, 3), "rows": rows}
    if cache.new:
        cache.save()
    return {
        "gap_s": args.gap_s,
        "regimes": regimes,
        "runtime_s": time.perf_counter() - t0,
    }


def report(res: dict) -> str:
    names = [n for n, _, _ in ROWS]
    keys = list(res["regimes"])
    head = " | ".join(
        f"{k} ({res['regimes'][k]['silence_share'] * 100:.0f} % silence): 5 folds / worst / held-back"
        for k in keys
    )
    lines = [
        "Four-class frame accuracy at the default setting (no cross-validation),",
        "the dev set as built and with every silence cut to"
        f" {res['gap_s']:g} s (`bench/short_gaps.py`).",
        "",
        f"| settings | {head} |",
        "|---|" + "---|" * len(keys),
    ]
    for n in names:
        cells = []
        for k in keys:
            r = res["regimes"][k]["rows"][n]
            cells.append(
                f"{r['five_folds'] * 100:.1f} / {r['worst_fold'] * 100:.1f} / {r['held'] * 100:.1f} %"
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gap-s", type=float, default=0.3)
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/diglett_bench_cache/cv_embeddings.npz")
    ap.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "short_gaps.json")
    )
    ap.add_argument("--table", default=str(ROOT / "docs" / "accuracy.md"))
    args = ap.parse_args(argv)
    if args.gap_s <= 0:
        ap.error("--gap-s must be over 0")
    res = run(args)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    text = report(res)
    print(text)
    if args.table:
        write_block(Path(args.table), "short_gaps", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
