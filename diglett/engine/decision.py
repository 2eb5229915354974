"""Scoring windows against enrollments and deciding each hop's label.

The decision is an argmax over *all* enrolled speakers (no speaker is
checked first, unlike the seed project), accepted only when the best cosine
reaches that speaker's threshold; otherwise the speech belongs to nobody
enrolled.

An enrollment is represented by the centroid of the embeddings of its
window-length sub-windows (`enrollment_reference`), and each speaker gets its
own threshold: `rel_threshold` times the speaker's *self-score*, the mean
cosine of each sub-window to the centroid of the others. A voice whose
windows match its own enrollment weakly (a noisy or varied enrollment) thus
gets a lower bar than one that matches tightly.

The reference then adapts to the session (`Adaptation`): a window labelled
a speaker with a clear margin, over its bar and over the other speakers,
joins that speaker's confident windows, and the reference becomes a blend
of the enrollment and their mean, the enrollment always keeping at least
half the weight, so a room, a microphone or a voice on a different day is
learnt, while an intruder whose windows clear the margins (one close to the
speaker) can pull the reference at most half way towards itself.

The session also learns its *others*: windows that are clearly nobody
enrolled (under every bar by `OTHERS_MARGIN`, and certain speech) are
summed, and a window about to be labelled a speaker, short of a clear win,
that is closer to their mean than to that speaker is `noise`. An
intruder's first clear windows so guard the rest of their talk, where one
window close to an enrolled voice would pass its bar.
`bench/cv_decision.py` measures each choice, cross-validated over speakers
(docs/accuracy.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Adaptation (see the module doc): a confident window clears its bar by
# ADAPT_MARGIN and the runner-up's score by ADAPT_GAP; their mean gets the
# weight n / (n + ADAPT_HALF_N), at most ADAPT_MAX_WEIGHT.
ADAPT_MARGIN = 0.1
ADAPT_GAP = 0.2
ADAPT_HALF_N = 5.0
ADAPT_MAX_WEIGHT = 0.5
# The session's others (see the module doc): a `noise` window that misses
# every bar by OTHERS_MARGIN, of speech the detector gives at least
# OTHERS_MIN_CONF, joins them.
OTHERS_MARGIN = 0.05
OTHERS_MIN_CONF = 0.9
# A second look (see `second_look`): the last part's best speaker needs to
# clear their bar, and beat the window's speaker, by SECOND_LOOK_MARGIN; a
# last part that misses every bar by as much is nobody enrolled.
SECOND_LOOK_MARGIN = 0.05

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


def decide(scores: dict[str, float], threshold: float | dict[str, float]) -> str:
    """The label for a hop with speech: best enrolled speaker, or `noise`.

    `threshold` is one cosine for every speaker, or one per speaker (a
    speaker missing from the dict has no bar). The best speaker is the one
    whose score exceeds its own threshold the most; it wins if that margin
    is not negative.
    """
    if not scores:
        return NOISE
    if not isinstance(threshold, dict):
        best = max(sorted(scores), key=lambda name: scores[name])
        return best if scores[best] >= threshold else NOISE
    best, over = best_over_bar(scores, threshold)
    return best if over >= 0 else NOISE


def best_over_bar(
    scores: dict[str, float], bars: dict[str, float]
) -> tuple[str, float]:
    """(the speaker whose score exceeds their bar the most, by how much);
    a speaker missing from `bars` has no bar (-1). Ties go to the first
    name in sorted order, so the result does not depend on dict order."""
    over = {k: v - bars.get(k, -1.0) for k, v in scores.items()}
    best = max(sorted(over), key=over.__getitem__)
    return best, over[best]


def enrollment_reference(
    embeddings: list[np.ndarray],
) -> tuple[np.ndarray, float | None]:
    """(centroid, self-score) of an enrollment's sub-window embeddings.

    Each embedding has shape (d,). The centroid is the unit-length mean of
    the unit-length embeddings; the self-score is the mean cosine of each
    one to the unit-length mean of the others (None for fewer than two).
    """
    units = np.stack([normalize(e) for e in embeddings])
    centroid = normalize(units.sum(axis=0))
    if len(units) < 2:
        return centroid, None
    total = units.sum(axis=0)
    loo = [float(np.dot(u, normalize(total - u))) for u in units]
    return centroid, float(np.mean(loo))


def speaker_threshold(
    self_score: float | None, rel_threshold: float, threshold: float
) -> float:
    """A speaker's cosine bar: `rel_threshold` x self-score, else `threshold`.

    The absolute `threshold` applies when relative thresholds are off
    (`rel_threshold` <= 0) or the enrollment gave no self-score.
    """
    if rel_threshold > 0 and self_score is not None and self_score > 0:
        return rel_threshold * self_score
    return threshold


@dataclass
class EmbeddingSum:
    """A running sum of unit embeddings: `total` (d,), of `count` windows,
    and their unit `mean` (d,; None before the first), kept up to date on
    each `add` so that the hops that read it do not recompute it. All three
    are derived from the `add`s, so none is given to the constructor."""

    total: np.ndarray | None = field(default=None, init=False)
    count: int = field(default=0, init=False)
    mean: np.ndarray | None = field(default=None, init=False)

    def add(self, embedding: np.ndarray) -> None:
        """Count a window's embedding (d,)."""
        u = normalize(embedding)
        self.total = u if self.total is None else self.total + u
        self.count += 1
        self.mean = normalize(self.total)


@dataclass
class Adaptation:
    """A speaker's reference as the session refines it.

    `enrolled` is the enrollment's unit reference (d,); `confident` the
    confident windows counted so far.
    """

    enrolled: np.ndarray
    confident: EmbeddingSum = field(default_factory=EmbeddingSum)

    @property
    def count(self) -> int:
        """How many confident windows the reference has taken in."""
        return self.confident.count

    @property
    def reference(self) -> np.ndarray:
        """The unit reference to score against now (d,)."""
        if not self.count:
            return self.enrolled
        w = min(ADAPT_MAX_WEIGHT, self.count / (self.count + ADAPT_HALF_N))
        return normalize((1 - w) * self.enrolled + w * self.confident.mean)

    def add(self, embedding: np.ndarray) -> None:
        """Count a confident window's embedding (d,)."""
        self.confident.add(embedding)


def clearly_nobody(
    scores: dict[str, float], bars: dict[str, float], confidence: float | None
) -> bool:
    """Whether a `noise` window is someone else for sure: it misses every
    enrolled speaker's bar by `OTHERS_MARGIN` and the speech detector is
    near-certain it is speech (a talker, not background; None: no
    probabilities, never sure)."""
    if confidence is None or confidence < OTHERS_MIN_CONF:
        return False
    return all(v - bars.get(k, -1.0) <= -OTHERS_MARGIN for k, v in scores.items())


def clear_win(score: float, bar: float) -> bool:
    """Whether a speaker's `score` clears their `bar` by `ADAPT_MARGIN`: a
    win sure enough to adapt on, and to stand against the session's others
    and the stream's background level."""
    return score - bar >= ADAPT_MARGIN


def closer_to_others(
    embedding: np.ndarray, others: EmbeddingSum, score: float, bar: float
) -> bool:
    """Whether `embedding` (d,), about to be labelled a speaker with `score`
    over their `bar`, is closer to the session's others than to them.

    A clear win (by `ADAPT_MARGIN`) stands: so a speaker whose first windows
    were taken for someone else is never shut out, and still adapts.
    """
    mean = others.mean
    if mean is None or clear_win(score, bar):
        return False
    return float(np.dot(normalize(embedding), mean)) > score


def confident(scores: dict[str, float], bars: dict[str, float], label: str) -> bool:
    """Whether a window labelled `label` is sure enough to adapt its reference."""
    if label not in scores:
        return False
    others = [v for k, v in scores.items() if k != label]
    runner_up = max(others) if others else -1.0
    return (
        clear_win(scores[label], bars.get(label, -1.0))
        and scores[label] - runner_up >= ADAPT_GAP
    )


def score_drop(before: dict[str, float], now: dict[str, float]) -> float:
    """How far any speaker's score fell from `before` (the previous hop's
    window) to `now`: the sign that the talker changed inside the window
    (negative when every score rose)."""
    return max((before[k] - v for k, v in now.items() if k in before), default=0.0)


def second_look(label: str, last: dict[str, float], bars: dict[str, float]) -> str:
    """The label of a hop whose window may straddle a turn change, given the
    scores `last` of the window's last part (the new talker's, if one took
    over).

    `label` is the whole window's (a speaker or `noise`). The last part
    overrides it only where it is clear: another speaker over their bar and
    over the window's speaker by `SECOND_LOOK_MARGIN`, a speaker where the
    window was `noise` by that margin over the bar, or `noise` where it
    misses every bar by that margin.
    """
    best, over = best_over_bar(last, bars)
    if label == NOISE:
        return best if over >= SECOND_LOOK_MARGIN else NOISE
    if best != label and over >= SECOND_LOOK_MARGIN:
        if last[best] - last.get(label, -1.0) >= SECOND_LOOK_MARGIN:
            return best
    if over <= -SECOND_LOOK_MARGIN:
        return NOISE
    return label


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
