#!/usr/bin/env python
"""How well any labeller of 0.5 s hops could do on the dev set: three oracles.

The protocol labels each `hop_s` of audio with one label, and the dev set's
truth is in 0.1 s frames (a pause inside a turn is that speaker's, as in
diarization references). So even a labeller that never errs loses frames:

- **hop oracle**: each hop gets the label most of its frames' truth has.
  What tiling the stream into hops costs, with perfect knowledge.
- **causal hop oracle**: the same, but it knows only what has been said by
  the hop's end: a frame of a pause inside a turn (`bench.cv_errors`'s
  `pause in turn`) counts as that speaker only where the speaker is heard
  again later in the same hop; otherwise as `silence`, since nothing yet
  tells it from the gap after a turn. The best a labeller without
  look-ahead can do at these hops.
- **0.5 s look-ahead oracle**: the same, knowing what is said up to half a
  second after the hop's end (`DIGLETT_LOOKAHEAD_HOPS=1`).

All are scored as `bench/cv_decision.py` scores the server (0.1 s frames,
0.25 s collar), over the five folds and the held-back fold, the
conversations as built and their quick copies, and by the true talker's
corpus on the five folds (the corpus targets). No model runs.

    .venv/bin/python -m bench.ceiling              # prints the table
    .venv/bin/python -m bench.ceiling --write-doc  # and puts it in docs/accuracy.md
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from bench import cv_decision, cv_errors, devset
from bench import metrics as mt
from bench.doc_blocks import write_block
from diglett.settings import Settings

HOP_S = Settings.hop_s  # the server's default hop
RES = cv_errors.RES  # the scoring's frames
PAUSE = cv_errors.POSITIONS.index("pause in turn")
DOC = Path(__file__).resolve().parents[1] / "docs" / "accuracy.md"


def hop_labels(
    frame_labels: list[str], frames_per_hop: int, duration_s: float
) -> list[tuple[float, float, str]]:
    """(start, end, label) of each hop: the most common of its frames'
    `frame_labels` (ties to the first met), the last hop cut at `duration_s`."""
    out = []
    for k in range(0, len(frame_labels), frames_per_hop):
        chunk = frame_labels[k : k + frames_per_hop]
        label = Counter(chunk).most_common(1)[0][0]
        start = k * RES
        out.append((start, min(start + frames_per_hop * RES, duration_s), label))
    return out


def heard_by_hop_end(
    truth: list[str], pos: np.ndarray, frames_per_hop: int, ahead: int = 0
) -> list[str]:
    """`truth` per frame as a labeller knows it `ahead` frames after each
    hop's end (0: no look-ahead): a pause frame is its speaker's only if
    that speaker is heard (a frame of theirs that is no pause) later by
    then, else `silence`."""
    out = list(truth)
    for k in range(0, len(truth), frames_per_hop):
        for i in range(k, min(k + frames_per_hop, len(truth))):
            if pos[i] != PAUSE:
                continue
            later = range(i + 1, min(k + frames_per_hop + ahead, len(truth)))
            if not any(truth[j] == truth[i] and pos[j] != PAUSE for j in later):
                out[i] = "silence"
    return out


ORACLES = ("hop oracle", "causal hop oracle", "0.5 s look-ahead oracle")


def oracle_scores(d: devset.DevConversation, utts) -> dict[str, cv_decision.ConvScore]:
    """Each oracle's score of one conversation (`ORACLES`), overall and by
    the true talker's corpus."""
    c = d.conv
    centres = mt.frame_centres(c.duration_s, RES)
    truth = [lab or "silence" for lab in mt.labels_at(c.truth, centres)]
    pos = cv_errors.positions(d, centres, utts)
    n = int(round(HOP_S / RES))
    known = (truth, heard_by_hop_end(truth, pos, n), heard_by_hop_end(truth, pos, n, n))
    return {
        name: cv_decision.score_conv(d, hop_labels(frames, n, c.duration_s))
        for name, frames in zip(ORACLES, known)
    }


def table(rows: dict[str, dict[str, float]], title: str) -> str:
    """The markdown table of `rows` (oracle -> column -> accuracy)."""
    cols = list(next(iter(rows.values())))
    lines = [
        title,
        "",
        "| oracle | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.1%}" for c in cols) + " |")
    return "\n".join(lines).replace("%", " %") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-condition", type=int, default=4)
    ap.add_argument("--write-doc", action="store_true")
    args = ap.parse_args(argv)
    utts = {u.file: u.audio for s in devset.load().values() for u in s.utts}
    groups = {
        "5 folds": lambda d: d.fold != devset.HELD,
        "5 folds, as built": lambda d: d.fold != devset.HELD and d.gaps != "quick",
        "5 folds, quick": lambda d: d.fold != devset.HELD and d.gaps == "quick",
        "held-back": lambda d: d.fold == devset.HELD,
    }
    got = {n: {g: [] for g in groups} for n in ORACLES}
    corpus: dict[str, dict[str, mt.Score]] = {n: {} for n in ORACLES}
    for d in devset.dev_set(args.per_condition):
        for name, s in oracle_scores(d, utts).items():
            for g, keep in groups.items():
                if keep(d):
                    got[name][g].append(s.total)
            if d.fold != devset.HELD:
                for corp, sc in s.by_corpus.items():
                    corpus[name][corp] = corpus[name].get(corp, mt.Score()) + sc
    rows = {n: {g: mt.total(ss).accuracy for g, ss in got[n].items()} for n in ORACLES}
    by_corpus = {
        n: {c: sc.accuracy for c, sc in sorted(corpus[n].items())} for n in ORACLES
    }
    text = (
        table(
            rows,
            "Four-class frame accuracy of oracles that label 0.5 s hops "
            "(`bench/ceiling.py`), scored as the server is.",
        )
        + "\n"
        + table(
            by_corpus,
            "The same by the true talker's corpus, five folds "
            "(`(silence)`: the frames of nobody talking).",
        )
    )
    print(text)
    if args.write_doc:
        write_block(DOC, "ceiling", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
