"""Scoring windows against enrollments and deciding each hop's label.

The decision is an argmax over *all* enrolled speakers (no speaker is
checked first, unlike the seed project), accepted only when the best cosine
reaches the threshold; otherwise the speech belongs to nobody enrolled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NOISE = "noise"
SILENCE = "silence"
RESERVED_LABELS = frozenset({NOISE, SILENCE})


def normalize(v: np.ndarray) -> np.ndarray:
    """Unit-length copy of embedding `v` (shape (d,)); zeros stay zeros."""
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def cosine_scores(
    embedding: np.ndarray, enrollments: dict[str, np.ndarray]
) -> dict[str, float]:
    """Cosine similarity of `embedding` (shape (d,)) to each unit-length enrollment."""
    e = normalize(embedding)
    return {name: float(np.dot(e, ref)) for name, ref in enrollments.items()}


def decide(scores: dict[str, float], threshold: float) -> str:
    """The label for a hop with speech: best enrolled speaker, or `noise`."""
    if not scores:
        return NOISE
    best = max(sorted(scores), key=lambda name: scores[name])
    return best if scores[best] >= threshold else NOISE


@dataclass
class TalkStats:
    """Running totals for the `summary` message."""

    labels: int = 0
    audio_s: float = 0.0
    talk_s: dict[str, float] = field(default_factory=dict)

    def add(self, label: str, seconds: float) -> None:
        self.labels += 1
        self.audio_s += seconds
        self.talk_s[label] = self.talk_s.get(label, 0.0) + seconds

    def summary(self, speakers: list[str]) -> dict:
        talk = {name: 0.0 for name in speakers}
        talk.update({NOISE: 0.0, SILENCE: 0.0})
        talk.update(self.talk_s)
        return {
            "type": "summary",
            "labels": self.labels,
            "audio_s": round(self.audio_s, 4),
            "talk_s": {k: round(v, 4) for k, v in talk.items()},
        }
