#!/usr/bin/env python
"""Where the session decision errs on the dev set: truth -> label, by place.

Replays every conversation through the server's `SessionEngine`, as
`bench/cv_decision.py` does (same replay, cache and scoring), with one
setting (`DIGLETT_*` as set), and splits the scored frames' confusion by
condition, by the true talker's corpus and by *position*:

- `turn start` / `turn end`: the first / last `EDGE_S` of a turn of A or B;
- `pause in turn`: a frame of A's or B's turn where the turn's own clean
  source is more than `PAUSE_DB` under its loud frames (the speaker pauses);
- `in turn`: the rest of A's and B's turns;
- `intruder`: C's turns; `overlap`: two talkers at a change (truth noise);
- `gap`: silence between turns; `edge`: silence before the first or after
  the last turn.

Each cell is given as a share of all scored frames, so the cells add up to
the error rate. Only five folds by default (the held-back fold is kept out
of analysis, like tuning); `--held` adds it.

`--seed` draws the conversations anew from the same speakers, a check on
what choosing rules on the dev set's own draw has bought: every rule was
screened on that draw's five folds (docs/accuracy.md, "A fresh draw").

    .venv/bin/python -m bench.cv_errors                  # ~3 min, cached
    .venv/bin/python -m bench.cv_errors --seed 7 --held  # ~15 min at first
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np

from bench import cv_decision as cvd
from bench import devset
from bench import metrics as mt
from bench import tune_decision as td
from bench.embed_cache import EmbedCache
from diglett.engine import levels
from diglett.settings import Settings

EDGE_S = 0.5  # a turn's first / last half second
PAUSE_DB = 25.0  # under the turn's loud frames: a pause in the turn
RES = 0.1
POSITIONS = (
    "turn start",
    "in turn",
    "pause in turn",
    "turn end",
    "intruder",
    "overlap",
    "gap",
    "edge",
)


def positions(d: devset.DevConversation, centres: np.ndarray, utts) -> np.ndarray:
    """The position (index into POSITIONS) of each frame centre."""
    c = d.conv
    pos = np.full(centres.size, POSITIONS.index("gap"))
    first = min(t.start_s for t in c.turns)
    last = max(t.end_s for t in c.turns)
    pos[(centres < first) | (centres >= last)] = POSITIONS.index("edge")
    for t in c.turns:
        inside = (centres >= t.start_s) & (centres < t.end_s)
        if t.label == "noise":
            pos[inside] = POSITIONS.index("intruder")
            continue
        rel = centres - t.start_s
        x = utts[t.file][
            int(t.src_start_s * devset.SAMPLE_RATE) : int(
                t.src_end_s * devset.SAMPLE_RATE
            )
        ]
        db = levels.frame_dbfs(x, int(RES * devset.SAMPLE_RATE))
        loud = np.percentile(db, 90) if db.size else 0.0
        k = np.clip((rel / RES).astype(int), 0, max(db.size - 1, 0))
        quiet = db[k] < loud - PAUSE_DB if db.size else np.zeros_like(rel, bool)
        p = np.where(
            quiet, POSITIONS.index("pause in turn"), POSITIONS.index("in turn")
        )
        p = np.where(rel < EDGE_S, POSITIONS.index("turn start"), p)
        p = np.where(t.end_s - centres < EDGE_S, POSITIONS.index("turn end"), p)
        pos[inside] = p[inside]
    # Overlaps: truth noise outside any intruder turn.
    truth = mt.labels_at(c.truth, centres)
    for i, lab in enumerate(truth):
        if lab == "noise" and pos[i] != POSITIONS.index("intruder"):
            pos[i] = POSITIONS.index("overlap")
    return pos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/diglett_bench_cache/cv_embeddings.npz")
    ap.add_argument("--held", action="store_true", help="add the held-back fold")
    ap.add_argument("--top", type=int, default=12, help="largest error cells shown")
    ap.add_argument(
        "--seed",
        type=int,
        default=devset.SEED,
        help="draw the conversations anew (a check on what tuning saw)",
    )
    ap.add_argument(
        "--turn-spread-db",
        type=float,
        default=devset.TURN_SPREAD_DB,
        help="each turn's level around its talker's",
    )
    args = ap.parse_args(argv)
    devs = [
        d
        for d in devset.dev_set(
            args.per_condition, seed=args.seed, turn_spread_db=args.turn_spread_db
        )
        if args.held or d.fold != devset.HELD
    ]
    utts = {u.file: u.audio for s in devset.load().values() for u in s.utts}
    cache = EmbedCache(args.cache)
    settings = Settings.from_env(dotenv=False)
    cells: dict[tuple, np.ndarray] = defaultdict(lambda: np.zeros((4, 4), int))
    total = np.zeros((4, 4), int)
    for d in devs:
        labels = cvd.replay(td.prepare(d.key, d.conv), settings, cache)
        c = d.conv
        ft = mt.frame_table(c.truth, labels, c.speakers, duration_s=c.duration_s)
        pos = positions(d, ft.centres, utts)
        corpus_of = {0: d.corpus[c.a], 1: d.corpus[c.b], 2: d.corpus[c.c], 3: "-"}
        for i in np.flatnonzero(ft.scored):
            t, p = ft.truth[i], ft.pred[i]
            total[t, p] += 1
            for key in (
                ("fold", d.fold),
                ("condition", d.condition),
                ("corpus", corpus_of[t] if POSITIONS[pos[i]] != "overlap" else "-"),
                ("position", POSITIONS[pos[i]]),
                ("position x condition", f"{POSITIONS[pos[i]]} / {d.condition}"),
            ):
                cells[key][t, p] += 1
    cache.save()
    n = int(total.sum())
    print(
        f"{len(devs)} conversations, {n} scored frames, accuracy "
        f"{np.trace(total) / n:.2%}\n"
    )
    print(mt.format_confusion(total))
    for group in ("fold", "condition", "corpus", "position"):
        print(f"\nby {group}: frames, accuracy, errors as % of all frames")
        for (g, name), conf in sorted(cells.items()):
            if g != group:
                continue
            m = int(conf.sum())
            err = m - int(np.trace(conf))
            print(f"  {name:16s} {m:6d}  {np.trace(conf) / m:6.1%}  {err / n:6.2%}")
    flat = []
    for (g, name), conf in cells.items():
        if g != "position x condition":
            continue
        for t in range(4):
            for p in range(4):
                if t != p and conf[t, p]:
                    flat.append((conf[t, p], name, mt.CLASSES[t], mt.CLASSES[p]))
    print("\nlargest error cells (position / condition, truth -> label):")
    for k, name, t, p in sorted(flat, reverse=True)[: args.top]:
        print(f"  {k / n:6.2%}  {name:28s} {t} -> {p}")
    by_pos = defaultdict(int)
    for (g, name), conf in cells.items():
        if g == "position":
            for t in range(4):
                for p in range(4):
                    if t != p and conf[t, p]:
                        by_pos[(name, mt.CLASSES[t], mt.CLASSES[p])] += conf[t, p]
    print("\nerror cells by position (truth -> label):")
    for (name, t, p), k in sorted(by_pos.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {k / n:6.2%}  {name:16s} {t} -> {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
