"""A real two-speaker conversation for image/test.sh, and the check of its labels.

    python image/conversation.py make DIR     # DIR/alice.wav, bob.wav, conv.wav, turns.json
    python image/conversation.py check DIR/turns.json TIMELINE.json

`make` cuts, from the dev set's real speech (the folder DIGLETT_SPEAKERS
names; image/test.sh sets it), 10 s enrollment clips of two LibriSpeech speakers and a
conversation of four turns (alice, bob, alice, bob) from *other*
utterances of theirs. `check` prints the labels of each turn and fails
unless, inside each turn (from 1 s after it starts, when the window has
left the previous speaker), at least 4 labels and 75% of the labels that
name a speaker or `noise` name the turn's speaker, and the other speaker
gets at most one label. `silence` (a pause in the reading) counts neither
way.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000
SPEAKERS = {"alice": "LS-19", "bob": "LS-26"}
ENROLL_S = 10.0
TURNS = [("alice", 1, 7.0), ("bob", 1, 7.0), ("alice", 2, 6.0), ("bob", 2, 6.0)]
SETTLE_S = 1.0  # labels of a turn's first second may still hear the last speaker
MIN_RIGHT = 0.75  # share of a turn's non-silence labels that must name its speaker


def speakers_dir() -> Path:
    env = os.environ.get("DIGLETT_SPEAKERS")
    if not env:
        raise SystemExit("set DIGLETT_SPEAKERS to the dev set's speakers folder")
    return Path(env)


def utterances(base: Path) -> dict[str, list[Path]]:
    """Utterances by speaker, longest first (as tests/conftest.py)."""
    by: dict[str, list[tuple[float, Path]]] = {}
    with (base / "manifest.csv").open() as f:
        for row in csv.DictReader(f):
            by.setdefault(row["speaker"], []).append(
                (float(row["duration_s"]), base / row["file"])
            )
    return {k: [p for _, p in sorted(v, reverse=True)] for k, v in by.items()}


def load(path: Path, seconds: float) -> np.ndarray:
    x, rate = sf.read(path, dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    assert rate == RATE, f"{path}: {rate} Hz"
    return x[: int(seconds * RATE)]


def make(out: Path) -> None:
    base = speakers_dir()
    u = utterances(base)
    out.mkdir(parents=True, exist_ok=True)
    for name, spk in SPEAKERS.items():
        sf.write(out / f"{name}.wav", load(u[spk][0], ENROLL_S), RATE, "PCM_16")
    parts, turns, t = [], [], 0.0
    for name, index, seconds in TURNS:
        path = u[SPEAKERS[name]][index]
        x = load(path, seconds)
        parts.append(x)
        turns.append(
            {
                "speaker": name,
                "start_s": round(t, 3),
                "end_s": round(t + x.size / RATE, 3),
                "source": str(path.relative_to(base)),
            }
        )
        t += x.size / RATE
    sf.write(out / "conv.wav", np.concatenate(parts), RATE, "PCM_16")
    (out / "turns.json").write_text(json.dumps(turns, indent=1))
    print(
        f"conversation: {t:.1f} s, turns "
        + ", ".join(f"{x['speaker']} {x['start_s']:g}-{x['end_s']:g} s" for x in turns)
        + f"; enrollment {ENROLL_S:g} s each ({base})"
    )


def check(turns_path: Path, timeline_path: Path) -> int:
    turns = json.loads(turns_path.read_text())
    doc = json.loads(timeline_path.read_text())
    rows = doc["labels"]
    ok = True
    print(f"labels: {len(rows)} over {rows[-1]['end_s'] if rows else 0:g} s")
    for turn in turns:
        inside = [
            r["label"]
            for r in rows
            if r["start_s"] >= turn["start_s"] + SETTLE_S
            and r["end_s"] <= turn["end_s"]
        ]
        right = inside.count(turn["speaker"])
        other = sum(inside.count(n) for n in SPEAKERS if n != turn["speaker"])
        voiced = [label for label in inside if label != "silence"]
        good = right >= 4 and right >= MIN_RIGHT * len(voiced) and other <= 1
        ok &= good
        print(
            f"  {turn['speaker']:5s} {turn['start_s']:5.1f}-{turn['end_s']:5.1f} s: "
            f"{right}/{len(voiced)} of the non-silence labels, {other} for the "
            f"other speaker: {'ok' if good else 'WRONG'}  {' '.join(inside)}"
        )
    print(f"talk time: {doc.get('talk_s')}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("dir", type=Path)
    p = sub.add_parser("check")
    p.add_argument("turns", type=Path)
    p.add_argument("timeline", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "make":
        make(args.dir)
        return 0
    return check(args.turns, args.timeline)


if __name__ == "__main__":
    sys.exit(main())
