"""bench/devset.py: the accuracy dev set's folds and conversations."""

from __future__ import annotations

import numpy as np
import pytest

from bench import devset
from conftest import SHARED

pytestmark = pytest.mark.skipif(
    not all((d / "manifest.csv").is_file() for d in devset.SPEAKER_DIRS),
    reason="no ../shared/data/speakers and speakers-more",
)


@pytest.fixture(scope="module")
def speakers():
    return devset.load()


def test_folds_are_speaker_disjoint_and_mix_corpora(speakers):
    folds = devset.folds(speakers)
    names = [n for f in folds.values() for n in f]
    assert len(names) == len(set(names)) == len(speakers) == 41
    assert folds[devset.HELD] == list(devset.HELD_SPEAKERS)
    for f, members in folds.items():
        assert len({speakers[n].corpus for n in members}) >= 3, f


@pytest.mark.parametrize("condition", devset.CONDITIONS)
def test_a_conversation_of_each_condition(speakers, condition):
    fold = devset.folds(speakers)["0"]
    d = devset.fold_conversations(speakers, "0", fold, 1, seed=7)[
        devset.CONDITIONS.index(condition)
    ]
    c = d.conv
    assert d.condition == condition and {c.a, c.b, c.c} <= set(fold)
    # the truth tiles the signal, with all four classes in it
    assert c.truth[0][0] == 0 and c.truth[-1][1] == pytest.approx(c.duration_s)
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(c.truth, c.truth[1:]))
    assert {lab for *_, lab in c.truth} >= {c.a, c.b, "noise", "silence"}
    # turns of 0.5-6 s at -45..-12 dBFS, from utterances no enrollment used
    used = {f for s in (c.a, c.b) for f in c.enroll_files[s]}
    for t in c.turns:
        assert 0.5 - 1e-6 <= t.end_s - t.start_s <= 6.0 + 1.0  # + reverb tail
        assert -45 <= t.level_dbfs <= -12
        assert t.file not in used
    # what a pcm_s16le client sends, not clipped
    q = c.signal * 32768.0
    assert np.array_equal(q, np.round(q)) and np.max(np.abs(c.signal)) < 1.0
    if condition in ("white", "pink", "babble"):
        assert 5 <= d.snr_db <= 30
    assert set(c.enroll) == {c.a, c.b}


def test_the_same_seed_builds_the_same_set(speakers):
    fold = devset.folds(speakers)["1"]
    a = devset.fold_conversations(speakers, "1", fold, 1, seed=3)[1].conv
    b = devset.fold_conversations(speakers, "1", fold, 1, seed=3)[1].conv
    assert np.array_equal(a.signal, b.signal) and a.truth == b.truth


def test_shared_path_is_the_tests_one():
    assert devset.SHARED == SHARED / "data"
