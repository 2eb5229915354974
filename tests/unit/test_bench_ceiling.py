"""The oracles of bench/ceiling.py: hop majorities, and what is known at a hop's end."""

import numpy as np

from bench.ceiling import PAUSE, heard_by_hop_end, hop_labels


def test_each_hop_takes_its_most_common_frame_label_and_the_last_is_cut():
    frames = ["a"] * 3 + ["b"] * 2 + ["b"] * 4 + ["a"] + ["silence"] * 2
    assert hop_labels(frames, 5, 1.2) == [
        (0.0, 0.5, "a"),
        (0.5, 1.0, "b"),
        (1.0, 1.2, "silence"),
    ]


def test_a_pause_is_the_speakers_only_when_they_are_heard_again_in_the_hop():
    truth = ["a", "a", "a", "a", "a", "a", "a", "a", "a", "a"]
    pos = np.array([0, PAUSE, PAUSE, 0, PAUSE, 0, 0, 0, PAUSE, PAUSE])
    assert heard_by_hop_end(truth, pos, 5) == [
        "a",
        "a",
        "a",
        "a",
        "silence",  # the hop ends in the pause: nothing tells it from a gap
        "a",
        "a",
        "a",
        "silence",
        "silence",
    ]


def test_look_ahead_hears_the_speaker_resume_only_within_its_reach():
    truth = ["a"] * 7 + ["silence"] * 3
    pos = np.array([0, 0, 0, PAUSE, PAUSE, PAUSE, 0, 0, 0, 0])
    # The first hop ends in the pause; "a" resumes two frames after its end
    # (the next hop's pause frame hears it within its own hop).
    assert heard_by_hop_end(truth, pos, 5)[3:6] == ["silence", "silence", "a"]
    assert heard_by_hop_end(truth, pos, 5, ahead=1)[3:5] == ["silence"] * 2
    assert heard_by_hop_end(truth, pos, 5, ahead=2)[3:6] == ["a"] * 3
    # Another talker heard after the pause does not make it the speaker's.
    other = ["a"] * 5 + ["b"] * 5
    pos2 = np.array([0, 0, 0, PAUSE, PAUSE, 0, 0, 0, 0, 0])
    assert heard_by_hop_end(other, pos2, 5, ahead=5)[3:5] == ["silence"] * 2
