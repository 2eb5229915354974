#!/usr/bin/env python
"""How far the verifier alone gets: perfect causal segmentation, real ECAPA.

`bench/ceiling.py`'s causal hop oracle says who talks in each 0.5 s hop as
well as a labeller without look-ahead can know it (98.8 % on the five
folds). Here that oracle decides only *whether* a hop is speech and whose
turn it is cut from; *who* it is comes from the real model (int8 ECAPA,
as a CPU replica serves it) on a window of that turn alone (its last
`Settings.window_s` up to the hop's end, never reaching into another
talker), scored against the enrollments the server builds:

- **one bar**: the best enrolled speaker over `rel_threshold` x its
  self-score, else `noise` (`decision.decide`);
- **with the session's decision**: the same with the adapting references
  and the session's others (`decision.Adaptation`, `clearly_nobody`,
  `closer_to_others`, `confident`), as `SessionEngine` applies them.

`rel_threshold` is cross-validated as `bench/cv_decision.py` does (each
fold scored with the value that did best on the other four, the
held-back fold with the value chosen on all five). Beside them, the
server's own labels at its defaults (one setting). The difference between
the rows splits what the defaults lose into the verifier's share (what is
lost with segmentation perfect) and the speech detector's and the
windows' (the rest).

    .venv/bin/python -m bench.verifier_ceiling              # ~5 min with the cache warm
    .venv/bin/python -m bench.verifier_ceiling --write-doc  # into docs/accuracy.md
    .venv/bin/python -m bench.verifier_ceiling --seed 7 \
        --cache /tmp/diglett_bench_cache/fresh7.npz        # a fresh draw
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench import ceiling, cv_decision, cv_errors, devset
from bench import metrics as mt
from bench import tune_decision as td
from bench.doc_blocks import write_block
from bench.embed_cache import EmbedCache
from diglett.engine.decision import (
    NOISE,
    SILENCE,
    Adaptation,
    EmbeddingSum,
    clearly_nobody,
    closer_to_others,
    confident,
    cosine_scores,
    decide,
    speaker_threshold,
)
from diglett.settings import Settings

SAMPLE_RATE = devset.SAMPLE_RATE
LEAST_S = 0.1  # a shorter window reaches back this far (a hop's first frame)
REL_GRID = cv_decision.GRID["rel_threshold"]
METHODS = ("one bar", "with the session's decision", "the server's defaults")


def talker_window(
    turns, label: str, hop_start: float, hop_end: float
) -> tuple[float, float] | None:
    """(start_s, end_s) of the window an oracle cuts for a hop labelled
    `label`: the last turn of that label overlapping the hop, from its
    start or `window_s` before its end within the hop, whichever is later;
    None where no such turn overlaps (an overlap at a change)."""
    cand = [
        t
        for t in turns
        if t.label == label and t.start_s < hop_end and t.end_s > hop_start
    ]
    if not cand:
        return None
    t = max(cand, key=lambda t: t.start_s)
    end = min(t.end_s, hop_end)
    return max(t.start_s, end - Settings.window_s, 0.0), end


def decide_hops(
    embeddings: list[np.ndarray],
    refs: dict[str, np.ndarray],
    bars: dict[str, float],
    adapt: bool,
) -> list[str]:
    """The label of each window embedding (d,), in stream order: one bar
    (`adapt` False), or with the references adapting and the session's
    others learnt as the server does (the oracle's speech is certain)."""
    adapted = {k: Adaptation(v) for k, v in refs.items()}
    others = EmbeddingSum()
    out = []
    for e in embeddings:
        scores = cosine_scores(e, {k: a.reference for k, a in adapted.items()})
        label = decide(scores, bars)
        if adapt:
            if label == NOISE:
                if clearly_nobody(scores, bars, 1.0):
                    others.add(e)
            elif closer_to_others(e, others, scores[label], bars[label]):
                label = NOISE
            elif confident(scores, bars, label):
                adapted[label].add(e)
        out.append(label)
    return out


def oracle_windows(d: devset.DevConversation, utts):
    """(the causal oracle's hops, the indices of those the model decides,
    their windows' audio); a hop that is an overlap stays `noise`."""
    c = d.conv
    centres = mt.frame_centres(c.duration_s, ceiling.RES)
    truth = [lab or SILENCE for lab in mt.labels_at(c.truth, centres)]
    pos = cv_errors.positions(d, centres, utts)
    n = int(round(ceiling.HOP_S / ceiling.RES))
    hops = ceiling.hop_labels(ceiling.heard_by_hop_end(truth, pos, n), n, c.duration_s)
    idx, wins = [], []
    for k, (a, b, label) in enumerate(hops):
        span = None if label == SILENCE else talker_window(c.turns, label, a, b)
        if span is None:
            continue
        s, e = (int(v * SAMPLE_RATE) for v in span)
        s = min(s, max(0, e - int(LEAST_S * SAMPLE_RATE)))
        idx.append(k)
        wins.append(np.asarray(c.signal[s:e], np.float32))
    return hops, idx, wins


def conversation_scores(d, utts, settings: Settings, cache: EmbedCache) -> dict:
    """Each method's ConvScore of one conversation, `rel_threshold` ->
    score for the oracles, and the server's own at `settings`."""
    # The engine's enrollments are the server's.
    server, eng = cv_decision.replay_engine(td.prepare(d.key, d.conv), settings, cache)
    hops, idx, wins = oracle_windows(d, utts)
    embs = list(cache.embed(wins))
    out: dict = {METHODS[2]: cv_decision.score_conv(d, server)}
    for name, adapt in ((METHODS[0], False), (METHODS[1], True)):
        out[name] = {}
        for rel in REL_GRID:
            bars = {
                k: speaker_threshold(v, rel, settings.threshold)
                for k, v in eng.self_scores.items()
            }
            labels = list(hops)
            for k, lab in zip(idx, decide_hops(embs, eng.enrollments, bars, adapt)):
                labels[k] = (hops[k][0], hops[k][1], lab)
            out[name][rel] = cv_decision.score_conv(d, labels)
    return out


def cross_validated(devs, per: list[dict], name: str) -> tuple[list, float]:
    """(each fold's ConvScores at the value the other four chose, the value
    chosen on all five) for oracle `name`."""
    folds = [f for f in dict.fromkeys(d.fold for d in devs) if f != devset.HELD]

    def best(keep) -> float:
        return max(
            REL_GRID,
            key=lambda r: cv_decision.pooled(
                [p[name][r] for d, p in zip(devs, per) if keep(d)]
            ).accuracy,
        )

    chosen = [None] * len(devs)
    for f in folds:
        rel = best(lambda d: d.fold not in (f, devset.HELD))
        for i, d in enumerate(devs):
            if d.fold == f:
                chosen[i] = per[i][name][rel]
    return chosen, best(lambda d: d.fold != devset.HELD)


def report(devs, per: list[dict]) -> str:
    """The markdown tables: by fold, then by condition and by corpus."""
    cv = [i for i, d in enumerate(devs) if d.fold != devset.HELD]
    held = [i for i, d in enumerate(devs) if d.fold == devset.HELD]
    folds = list(dict.fromkeys(devs[i].fold for i in cv))
    rows, groups = {}, {}
    for name in METHODS:
        if name == METHODS[2]:
            scores, held_sc = [p[name] for p in per], [per[i][name] for i in held]
        else:
            scores, rel = cross_validated(devs, per, name)
            held_sc = [per[i][name][rel] for i in held]
        accs = [
            cv_decision.pooled([scores[i] for i in cv if devs[i].fold == f]).accuracy
            for f in folds
        ]
        rows[name] = accs + [
            float(np.mean(accs)),
            min(accs),
            cv_decision.pooled(held_sc).accuracy,
        ]
        groups[name] = cv_decision.groups(
            [devs[i] for i in cv], [scores[i] for i in cv]
        )
    pct = lambda v: f"{v:.1%}".replace("%", " %")
    head = [f"fold {f}" for f in folds] + ["mean", "worst", "held-back"]
    lines = [
        "Four-class frame accuracy, 0.1 s frames, 0.25 s collar: the causal hop "
        "oracle's segmentation with the real model deciding who "
        "(`bench/verifier_ceiling.py`), beside the server's own labels.",
        "",
        "| method | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    lines += [
        f"| {n} | " + " | ".join(pct(v) for v in r) + " |" for n, r in rows.items()
    ]
    for key, title in (("condition", "By condition"), ("corpus", "By corpus")):
        cols = list(groups[METHODS[2]][key])
        lines += [
            "",
            f"{title}, five folds:",
            "",
            "| method | " + " | ".join(cols) + " |",
            "|---" * (len(cols) + 1) + "|",
        ]
        lines += [
            f"| {n} | " + " | ".join(pct(g[key][c]) for c in cols) + " |"
            for n, g in groups.items()
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--cache", default="/tmp/diglett_bench_cache/cv_embeddings.npz")
    ap.add_argument(
        "--seed",
        type=int,
        default=devset.SEED,
        help="draw the conversations anew (no rule was screened on them)",
    )
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)
    if args.write_doc and args.seed != devset.SEED:
        ap.error("--write-doc writes the dev set's own draw; leave out --seed")
    utts = {u.file: u.audio for s in devset.load().values() for u in s.utts}
    cache = EmbedCache(Path(args.cache))
    settings = Settings.from_env(dotenv=False)
    devs = devset.dev_set(args.per_condition, seed=args.seed)
    per = []
    for i, d in enumerate(devs):
        per.append(conversation_scores(d, utts, settings, cache))
        if i % 20 == 19:
            cache.save()
            print(f"{i + 1} of {len(devs)} conversations", file=sys.stderr, flush=True)
    cache.save()
    text = report(devs, per)
    print(text)
    if args.write_doc:
        write_block(ceiling.DOC, "verifier_ceiling", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
