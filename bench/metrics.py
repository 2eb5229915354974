"""Frame accuracy of label streams against a truth track (pure numpy).

Both the truth and the predictions are lists of (start_s, end_s, label)
(predictions may also be the protocol's `label` dicts). Labels are mapped
onto four role classes: the first enrolled speaker "A", the second "B",
"noise" and "silence".

Scoring uses frames of `res` seconds (default 0.1 s): frame i covers
[i*res, (i+1)*res) and takes, on both sides, the label in force at its
centre. A trailing partial frame is not scored. A frame is excluded (the
collar) when it comes closer than `collar` seconds (default 0.25 s) to a
point where the *true* label changes, i.e. when its interval overlaps
(b - collar, b + collar) for some change point b. Every other frame is
scored, and must be covered by a prediction.

`accuracy` is over the four classes; `merged_accuracy` merges noise and
silence into one "nobody enrolled" class (three classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence, Union

import numpy as np

CLASSES = ("A", "B", "noise", "silence")
MERGED_CLASSES = ("A", "B", "other")
EPS = 1e-9

Segment = Union[tuple, Mapping]


def _seg(x: Segment) -> tuple[float, float, str]:
    if isinstance(x, Mapping):
        return float(x["start_s"]), float(x["end_s"]), str(x["label"])
    s, e, lab = x
    return float(s), float(e), str(lab)


def _segments(segs: Iterable[Segment]) -> list[tuple[float, float, str]]:
    out = sorted((_seg(x) for x in segs), key=lambda t: t[0])
    return out


def role_of(label: str, speakers: Sequence[str]) -> int:
    """Class index of `label` given the enrolled `speakers` (A, B)."""
    a, b = speakers
    if label == a:
        return 0
    if label == b:
        return 1
    if label == "noise":
        return 2
    if label == "silence":
        return 3
    raise ValueError(f"label {label!r} is none of {a!r}, {b!r}, noise, silence")


def frame_centres(duration_s: float, res: float = 0.1) -> np.ndarray:
    """Centres of the whole `res`-second frames of `duration_s` seconds."""
    n = int(np.floor(duration_s / res + EPS))
    return (np.arange(n) + 0.5) * res


def labels_at(segs: Iterable[Segment], times: np.ndarray) -> list[str | None]:
    """The label in force at each time (None where no segment covers it)."""
    ss = _segments(segs)
    if not ss:
        return [None] * len(times)
    starts = np.array([s for s, _, _ in ss])
    idx = np.searchsorted(starts, np.asarray(times) + EPS, side="right") - 1
    out: list[str | None] = []
    for t, i in zip(times, idx):
        if i >= 0 and t < ss[i][1] + EPS:
            out.append(ss[i][2])
        else:
            out.append(None)
    return out


def change_points(truth: Iterable[Segment]) -> np.ndarray:
    """Times where the true label changes (adjacent equal labels merged)."""
    ss = _segments(truth)
    return np.array(
        [ss[i][0] for i in range(1, len(ss)) if ss[i][2] != ss[i - 1][2]],
        dtype=np.float64,
    )


def collar_mask(
    truth: Iterable[Segment], centres: np.ndarray, res: float = 0.1, collar=0.25
) -> np.ndarray:
    """True for frames that are scored (not within `collar` of a change)."""
    keep = np.ones(len(centres), dtype=bool)
    if collar <= 0:
        return keep
    lo, hi = centres - res / 2, centres + res / 2
    for b in change_points(truth):
        keep &= ~((lo < b + collar - EPS) & (hi > b - collar + EPS))
    return keep


@dataclass
class FrameTable:
    """Per-frame classes: `truth`/`pred` are class indices, `scored` the collar."""

    centres: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    scored: np.ndarray


def frame_table(
    truth: Iterable[Segment],
    labels: Iterable[Segment],
    speakers: Sequence[str],
    *,
    res: float = 0.1,
    collar: float = 0.25,
    duration_s: float | None = None,
) -> FrameTable:
    truth = _segments(truth)
    labels = _segments(labels)
    if duration_s is None:
        duration_s = truth[-1][1] if truth else 0.0
    centres = frame_centres(duration_s, res)
    scored = collar_mask(truth, centres, res, collar)
    t_lab = labels_at(truth, centres)
    p_lab = labels_at(labels, centres)
    t_cls = np.full(len(centres), -1)
    p_cls = np.full(len(centres), -1)
    for i, (tl, pl) in enumerate(zip(t_lab, p_lab)):
        if tl is None:
            scored[i] = False
            continue
        t_cls[i] = role_of(tl, speakers)
        if pl is None:
            if scored[i]:
                raise ValueError(f"no predicted label covers t={centres[i]:.3f} s")
            continue
        p_cls[i] = role_of(pl, speakers)
    return FrameTable(centres, t_cls, p_cls, scored)


@dataclass
class Score:
    """A confusion matrix (rows: truth, columns: prediction; `CLASSES` order)."""

    confusion: np.ndarray = field(default_factory=lambda: np.zeros((4, 4), int))
    excluded: int = 0

    @property
    def frames(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        n = self.frames
        return float(np.trace(self.confusion)) / n if n else float("nan")

    @property
    def merged_confusion(self) -> np.ndarray:
        return merge_confusion(self.confusion)

    @property
    def merged_accuracy(self) -> float:
        m = self.merged_confusion
        n = int(m.sum())
        return float(np.trace(m)) / n if n else float("nan")

    def __add__(self, other: "Score") -> "Score":
        return Score(self.confusion + other.confusion, self.excluded + other.excluded)

    def as_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "merged_accuracy": self.merged_accuracy,
            "frames": self.frames,
            "excluded_frames": self.excluded,
            "classes": list(CLASSES),
            "confusion": self.confusion.tolist(),
        }


def merge_confusion(conf: np.ndarray) -> np.ndarray:
    """4x4 confusion → 3x3 with noise and silence merged into `other`."""
    m = np.zeros((3, 3), dtype=conf.dtype)
    idx = [0, 1, 2, 2]
    for i in range(4):
        for j in range(4):
            m[idx[i], idx[j]] += conf[i, j]
    return m


def score(
    truth: Iterable[Segment],
    labels: Iterable[Segment],
    speakers: Sequence[str],
    *,
    res: float = 0.1,
    collar: float = 0.25,
    duration_s: float | None = None,
) -> Score:
    """Frame confusion of `labels` against `truth` for enrolled (A, B)."""
    ft = frame_table(
        truth, labels, speakers, res=res, collar=collar, duration_s=duration_s
    )
    return score_table(ft)


def score_table(ft: FrameTable, mask: np.ndarray | None = None) -> Score:
    keep = ft.scored if mask is None else ft.scored & mask
    conf = np.zeros((4, 4), dtype=int)
    np.add.at(conf, (ft.truth[keep], ft.pred[keep]), 1)
    return Score(conf, int(np.count_nonzero(~ft.scored)))


def total(scores: Iterable[Score]) -> Score:
    out = Score()
    for s in scores:
        out = out + s
    return out


def format_confusion(conf: np.ndarray, names: Sequence[str] = CLASSES) -> str:
    """A text table: rows truth, columns prediction, plus row recall."""
    w = max(9, *(len(n) + 1 for n in names))
    head = "truth\\pred".ljust(11) + "".join(n.rjust(w) for n in names)
    lines = [head + "recall".rjust(9)]
    for i, n in enumerate(names):
        row = conf[i]
        tot = int(row.sum())
        rec = f"{row[i] / tot:8.1%}" if tot else "      --"
        lines.append(
            n.ljust(11) + "".join(str(int(v)).rjust(w) for v in row) + " " + rec
        )
    return "\n".join(lines)
