"""bench/verifier_ceiling.py's oracle windows and its decision over them."""

from types import SimpleNamespace

import numpy as np

from bench.verifier_ceiling import decide_hops, talker_window


def turn(label: str, start: float, end: float) -> SimpleNamespace:
    return SimpleNamespace(label=label, start_s=start, end_s=end)


TURNS = [turn("a", 0.0, 2.0), turn("b", 2.2, 4.0), turn("a", 3.9, 6.0)]


def test_the_window_is_the_labelled_talkers_latest_turn_up_to_the_hop_end():
    # b's turn started 1.8 s before the hop's end: its last 1.5 s.
    assert talker_window(TURNS, "b", 3.5, 4.0) == (2.5, 4.0)
    # a's new turn started 0.1 s before: that 0.1 s only, not a's old turn.
    assert talker_window(TURNS, "a", 3.5, 4.0) == (3.9, 4.0)
    # A turn that ended inside the hop is cut at its end.
    assert talker_window(TURNS, "b", 3.8, 4.3) == (2.5, 4.0)


def test_a_label_no_turn_of_overlaps_has_no_window():
    assert talker_window(TURNS, "noise", 0.0, 0.5) is None
    assert talker_window(TURNS, "b", 4.0, 4.5) is None


REFS = {"a": np.array([1.0, 0.0, 0.0]), "b": np.array([0.0, 1.0, 0.0])}
BARS = {"a": 0.5, "b": 0.5}


def unit(*v: float) -> np.ndarray:
    x = np.array(v, dtype=np.float32)
    return x / np.linalg.norm(x)


def test_one_bar_takes_the_best_speaker_over_their_bar_else_noise():
    embs = [unit(0.9, 0.1, 0.0), unit(0.1, 0.9, 0.0), unit(0.2, 0.2, 1.0)]
    assert decide_hops(embs, REFS, BARS, adapt=False) == ["a", "b", "noise"]


def test_the_sessions_others_turn_a_near_miss_to_noise_only_with_the_decision():
    intruder = unit(0.3, 0.0, 1.0)  # misses every bar by far
    close = unit(0.55, 0.0, 0.835)  # just over a's bar, nearer the intruder
    embs = [intruder, close]
    assert decide_hops(embs, REFS, BARS, adapt=False) == ["noise", "a"]
    assert decide_hops(embs, REFS, BARS, adapt=True) == ["noise", "noise"]
