"""bench/devset.py's quick copies: how the silence between turns is cut."""

from __future__ import annotations

import numpy as np
import pytest

from bench import conversations as cv
from bench import devset

SR = 16000


def _dev(truth: list[tuple[float, float, str]]) -> devset.DevConversation:
    n = int(round(truth[-1][1] * SR))
    conv = cv.Conversation(
        a="A",
        b="B",
        c="C",
        enroll={},
        enroll_files={},
        signal=np.arange(n, dtype=np.float32),  # each sample its own index
        truth=truth,
        turns=[cv.Turn("A", "A", "a.wav", 0.0, 1.5, 1.0, 2.5, -20.0)],
    )
    return devset.DevConversation("k", "0", "clean", None, conv, {})


def test_long_silences_are_cut_to_their_middle_talk_and_overlaps_stay():
    d = _dev(
        [
            (0.0, 1.0, cv.SILENCE),
            (1.0, 2.5, "A"),
            (2.5, 2.7, cv.SILENCE),  # shorter than the cut: kept whole
            (2.7, 3.0, cv.NOISE),
            (3.0, 5.0, cv.SILENCE),
        ]
    )
    out = devset.squeeze_gaps(d, 0.3).conv
    assert out.truth == [
        (0.0, 0.3, cv.SILENCE),
        (0.3, 1.8, "A"),
        (1.8, 2.0, cv.SILENCE),
        (2.0, 2.3, cv.NOISE),
        (2.3, 2.6, cv.SILENCE),
    ]
    assert out.signal.size == int(2.6 * SR)
    # The first silence keeps its middle 0.3 s; A's turn follows whole.
    assert out.signal[0] == int(0.35 * SR)
    assert np.array_equal(
        out.signal[int(0.3 * SR) : int(1.8 * SR)], np.arange(SR, int(2.5 * SR))
    )
    turn = out.turns[0]  # where A's turn now sits
    assert (turn.start_s, turn.end_s) == pytest.approx((0.3, 1.8))
    assert d.conv.signal.size == 5 * SR  # the original is left alone


def test_a_quick_copy_is_keyed_and_marked_apart():
    d = _dev([(0.0, 1.0, cv.SILENCE), (1.0, 2.0, "A"), (2.0, 3.0, cv.SILENCE)])
    q = devset.quick_copy(d)
    assert (q.key, q.gaps, d.gaps) == ("quick-k", "quick", "as built")
    assert q.conv.duration_s < d.conv.duration_s
