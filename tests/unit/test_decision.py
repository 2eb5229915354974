"""Cosine scores, the argmax decision and talk statistics (diglett.engine.decision)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from diglett.engine.decision import (
    SECOND_LOOK_MARGIN,
    score_drop,
    second_look,
    NOISE,
    RESERVED_LABELS,
    SILENCE,
    TalkStats,
    cosine_scores,
    decide,
    enrollment_reference,
    normalize,
    speaker_threshold,
)


def unit(*v) -> np.ndarray:
    return normalize(np.array(v, dtype=np.float32))


def test_reserved_labels():
    assert NOISE == "noise" and SILENCE == "silence"
    assert RESERVED_LABELS == {"noise", "silence"}


# ------------------------------------------------------------------ normalize
def test_normalize_unit_length_and_shape():
    v = normalize(np.array([[3.0, 4.0]]))
    assert v.shape == (2,)
    assert v.dtype == np.float32
    np.testing.assert_allclose(v, [0.6, 0.8])


def test_normalize_zero_stays_zero():
    np.testing.assert_array_equal(normalize(np.zeros(4)), np.zeros(4))


# ---------------------------------------------------------------- cosine
def test_cosine_scores_known_values():
    refs = {"a": unit(1, 0, 0), "b": unit(0, 1, 0), "c": unit(1, 1, 0)}
    scores = cosine_scores(np.array([10.0, 0.0, 0.0]), refs)
    assert scores["a"] == pytest.approx(1.0)
    assert scores["b"] == pytest.approx(0.0)
    assert scores["c"] == pytest.approx(1 / np.sqrt(2))
    assert all(isinstance(v, float) for v in scores.values())


def test_cosine_is_scale_invariant_and_bounded():
    rng = np.random.default_rng(0)
    refs = {f"s{i}": normalize(rng.standard_normal(192)) for i in range(5)}
    e = rng.standard_normal(192)
    s1, s2 = cosine_scores(e, refs), cosine_scores(e * 1234.5, refs)
    for k in refs:
        assert s1[k] == pytest.approx(s2[k], abs=1e-5)
        assert -1.0 - 1e-5 <= s1[k] <= 1.0 + 1e-5


def test_cosine_negative():
    assert cosine_scores(unit(-1, 0), {"a": unit(1, 0)})["a"] == pytest.approx(-1.0)


def test_cosine_scores_no_enrollments():
    assert cosine_scores(unit(1, 0), {}) == {}


def test_cosine_zero_embedding():
    assert cosine_scores(np.zeros(3), {"a": unit(1, 0, 0)}) == {"a": 0.0}


# ------------------------------------------------------------------ decide
def test_argmax_not_biased_to_first_speaker():
    assert decide({"a": 0.5, "b": 0.6}, 0.3) == "b"
    assert decide({"b": 0.6, "a": 0.5}, 0.3) == "b"


def test_argmax_for_every_order():
    scores = {"zed": 0.41, "amy": 0.9, "bob": 0.89, "carl": 0.2}
    for order in itertools.permutations(scores):
        assert decide({k: scores[k] for k in order}, 0.3) == "amy"


def test_best_below_threshold_is_noise():
    assert decide({"a": 0.29, "b": 0.1}, 0.3) == NOISE
    assert decide({"a": -0.5}, 0.3) == NOISE


def test_threshold_is_inclusive():
    assert decide({"a": 0.3, "b": 0.1}, 0.3) == "a"


def test_no_scores_is_noise():
    assert decide({}, 0.3) == NOISE


def test_negative_threshold():
    assert decide({"a": -0.2, "b": -0.4}, -0.3) == "a"


def test_ties_are_deterministic():
    a = decide({"x": 0.5, "y": 0.5}, 0.3)
    b = decide({"y": 0.5, "x": 0.5}, 0.3)
    assert a == b and a in ("x", "y")


def test_decide_with_cosine_end_to_end():
    refs = {"alice": unit(1, 0, 0), "bob": unit(0, 1, 0)}
    assert decide(cosine_scores(np.array([0.6, 0.8, 0.0]), refs), 0.3) == "bob"
    assert decide(cosine_scores(np.array([0.8, 0.6, 0.0]), refs), 0.3) == "alice"
    assert decide(cosine_scores(np.array([0.1, 0.1, 1.0]), refs), 0.3) == NOISE


# --------------------------------------------------------------- TalkStats
def test_talk_stats_empty_summary():
    s = TalkStats().summary(["alice", "bob"])
    assert s == {
        "type": "summary",
        "labels": 0,
        "audio_s": 0.0,
        "talk_s": {"alice": 0.0, "bob": 0.0, "noise": 0.0, "silence": 0.0},
    }


def test_talk_stats_accumulates():
    st = TalkStats()
    for label, sec in [
        ("alice", 0.5),
        ("alice", 0.5),
        ("bob", 0.5),
        ("noise", 0.5),
        ("silence", 0.5),
        ("alice", 0.25),
    ]:
        st.add(label, sec)
    s = st.summary(["alice", "bob"])
    assert s["labels"] == 6
    assert s["audio_s"] == pytest.approx(2.75)
    assert s["talk_s"] == {"alice": 1.25, "bob": 0.5, "noise": 0.5, "silence": 0.5}
    assert sum(s["talk_s"].values()) == pytest.approx(s["audio_s"])


def test_talk_stats_rounding_does_not_drift():
    st = TalkStats()
    for _ in range(1000):
        st.add("alice", 0.1)
    s = st.summary(["alice"])
    assert s["labels"] == 1000
    assert s["audio_s"] == pytest.approx(100.0, abs=1e-4)
    assert s["talk_s"]["alice"] == pytest.approx(100.0, abs=1e-4)


# ------------------------------------------- per-speaker thresholds, centroid
def test_decide_per_speaker_thresholds():
    scores = {"a": 0.5, "b": 0.45}
    assert decide(scores, {"a": 0.6, "b": 0.3}) == "b"  # a is under its bar
    assert decide(scores, {"a": 0.4, "b": 0.3}) == "b"  # larger margin wins
    assert decide(scores, {"a": 0.4, "b": 0.44}) == "a"
    assert decide(scores, {"a": 0.9, "b": 0.9}) == NOISE
    assert decide(scores, {"a": 0.5}) == "b"  # no bar for b: margin 1.45


def test_enrollment_reference_centroid_and_self_score():
    e = [unit(1, 0, 0), unit(0, 1, 0), 2 * unit(1, 1, 0)]
    ref, self_score = enrollment_reference(e)
    np.testing.assert_allclose(ref, unit(1 + 0.5**0.5, 1 + 0.5**0.5, 0), atol=1e-6)
    loo = [
        float(np.dot(unit(1, 0, 0), unit(0.5**0.5, 1 + 0.5**0.5, 0))),
        float(np.dot(unit(0, 1, 0), unit(1 + 0.5**0.5, 0.5**0.5, 0))),
        float(np.dot(unit(1, 1, 0), unit(1, 1, 0))),
    ]
    assert self_score == pytest.approx(np.mean(loo), abs=1e-6)
    ref, self_score = enrollment_reference([3 * unit(0, 0, 1)])
    np.testing.assert_allclose(ref, unit(0, 0, 1))
    assert self_score is None


def test_speaker_threshold():
    assert speaker_threshold(0.8, 0.35, 0.25) == pytest.approx(0.28)
    assert speaker_threshold(None, 0.35, 0.25) == 0.25
    assert speaker_threshold(0.8, 0.0, 0.25) == 0.25
    assert speaker_threshold(-0.1, 0.35, 0.25) == 0.25


# ------------------------------------------------------------- second look
BARS = {"alice": 0.3, "bob": 0.3}


def test_score_drop_is_the_largest_fall_of_any_speaker():
    assert score_drop({"alice": 0.8, "bob": 0.1}, {"alice": 0.6, "bob": 0.3}) == (
        pytest.approx(0.2)
    )
    assert score_drop({"alice": 0.5}, {"alice": 0.7}) == pytest.approx(-0.2)
    # a speaker enrolled since the previous window has nothing to fall from
    assert score_drop({"alice": 0.5}, {"alice": 0.5, "bob": 0.0}) == 0.0
    assert score_drop({}, {"alice": 0.5}) == 0.0


def test_second_look_hands_the_hop_to_a_clear_new_talker():
    m = SECOND_LOOK_MARGIN
    assert second_look("alice", {"alice": 0.1, "bob": 0.6}, BARS) == "bob"
    # bob over his bar by the margin, but not over alice by it: alice stays
    assert second_look("alice", {"alice": 0.35 + m, "bob": 0.35 + m + 0.01}, BARS) == (
        "alice"
    )
    # bob under his bar by less than the margin: alice stays
    assert second_look("alice", {"alice": 0.2, "bob": 0.3 + m / 2}, BARS) == "alice"


def test_second_look_finds_nobody_or_an_enrolled_talker_after_noise():
    m = SECOND_LOOK_MARGIN
    assert second_look("alice", {"alice": 0.299 - m, "bob": 0.0}, BARS) == "noise"
    assert second_look("alice", {"alice": 0.3 - m / 2, "bob": 0.0}, BARS) == "alice"
    assert second_look("noise", {"alice": 0.301 + m, "bob": 0.0}, BARS) == "alice"
    assert second_look("noise", {"alice": 0.3 + m / 2, "bob": 0.0}, BARS) == "noise"
