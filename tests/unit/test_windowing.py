"""Hop/window cutting (diglett.engine.windowing.HopWindower)."""

from __future__ import annotations

import numpy as np
import pytest

from diglett.engine.windowing import HopWindower

HOP, WINDOW = 8000, 24000  # 0.5 s hops, 1.5 s windows at 16 kHz


def ramp(n: int, start: int = 0) -> np.ndarray:
    """Samples whose value is their own index: easy to check positions."""
    return np.arange(start, start + n, dtype=np.float32)


def feed(w: HopWindower, x: np.ndarray, sizes) -> list:
    hops, i = [], 0
    for k in sizes:
        hops.extend(w.push(x[i : i + k]))
        i += k
    assert i == x.size
    last = w.flush()
    if last is not None:
        hops.append(last)
    return hops


def random_sizes(rng: np.random.Generator, total: int, max_chunk: int) -> list[int]:
    sizes, left = [], total
    while left:
        k = int(min(left, rng.integers(0, max_chunk + 1)))
        sizes.append(k)
        left -= k
    return sizes


FINAL_WINDOW_BUG = (
    "BUG: HopWindower._trim keeps only `emitted + hop - window` onwards, so the "
    "final partial hop's window (which starts earlier) is cut short: e.g. "
    "hop=8000, window=24000, 24500 samples -> last window has 7500 samples, not "
    "24000 (negative slice index in _take)"
)


def check_hops(
    hops, x: np.ndarray, hop: int, window: int, check_last_window: bool = True
) -> None:
    """Every sample in exactly one hop; windows end at the hop's end."""
    assert [h.seq for h in hops] == list(range(len(hops)))
    pos = 0
    for i, h in enumerate(hops):
        assert h.start == pos
        last = i == len(hops) - 1
        if not last:
            assert h.end - h.start == hop
        else:
            assert 0 < h.end - h.start <= hop
        np.testing.assert_array_equal(h.hop_audio, x[h.start : h.end])
        if last and not check_last_window:
            assert h.window.size <= min(window, h.end)
            np.testing.assert_array_equal(h.window, x[h.end - h.window.size : h.end])
            pos = h.end
            continue
        assert h.window.shape == (min(window, h.end),)
        np.testing.assert_array_equal(h.window, x[max(0, h.end - window) : h.end])
        pos = h.end
    assert pos == x.size


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        HopWindower(0, 10)
    with pytest.raises(ValueError):
        HopWindower(10, 5)
    HopWindower(10, 10)


def test_no_hop_until_a_full_hop():
    w = HopWindower(HOP, WINDOW)
    assert w.push(ramp(HOP - 1)) == []
    assert w.pending == HOP - 1
    [h] = w.push(ramp(1, HOP - 1))
    assert (h.seq, h.start, h.end) == (0, 0, HOP)
    assert w.pending == 0


def test_first_windows_are_shorter():
    w = HopWindower(HOP, WINDOW)
    hops = w.push(ramp(5 * HOP))
    assert [h.window.size for h in hops] == [8000, 16000, 24000, 24000, 24000]
    assert [h.end for h in hops] == [8000, 16000, 24000, 32000, 40000]
    np.testing.assert_array_equal(hops[4].window, ramp(WINDOW, 16000))


def test_one_push_many_hops():
    x = ramp(10 * HOP + 123)
    w = HopWindower(HOP, WINDOW)
    hops = w.push(x)
    assert len(hops) == 10
    last = w.flush()
    assert (last.seq, last.start, last.end) == (10, 10 * HOP, 10 * HOP + 123)
    check_hops(hops + [last], x, HOP, WINDOW, check_last_window=False)


def test_final_partial_hop_on_flush():
    w = HopWindower(HOP, WINDOW)
    x = ramp(HOP * 3 + 500)
    hops = w.push(x)
    assert len(hops) == 3
    last = w.flush()
    assert (last.seq, last.start, last.end) == (3, 3 * HOP, 3 * HOP + 500)
    np.testing.assert_array_equal(last.hop_audio, x[-500:])
    assert last.window[-1] == x[-1]  # the window ends where the hop ends


@pytest.mark.parametrize(
    "hop,window,n",
    [
        (HOP, WINDOW, 3 * HOP + 500),  # 1.53 s stream: 7500 samples instead of 24000
        (HOP, WINDOW, 10 * HOP + 123),
        (HOP, HOP, HOP + 500),  # window == hop: 500 samples instead of 8000
        (7, 20, 70 + 3),
    ],
)
def test_final_partial_hop_has_full_window(hop, window, n):
    x = ramp(n)
    w = HopWindower(hop, window)
    w.push(x)
    last = w.flush()
    assert last.end == n
    assert last.window.shape == (min(window, n),)
    np.testing.assert_array_equal(last.window, x[max(0, n - window) :])


@pytest.mark.parametrize("n", [500, HOP + 500, 2 * HOP + 500])
def test_final_partial_hop_window_while_stream_is_short(n):
    """Up to window_s of audio the final window is still the whole stream."""
    x = ramp(n)
    w = HopWindower(HOP, WINDOW)
    w.push(x[: n - 500])
    w.push(x[n - 500 :])
    last = w.flush()
    np.testing.assert_array_equal(last.window, x)


def test_flush_with_nothing_pending_is_none():
    w = HopWindower(HOP, WINDOW)
    assert w.flush() is None
    w.push(ramp(2 * HOP))
    assert w.flush() is None
    assert w.flush() is None


def test_short_stream_gives_one_short_hop():
    w = HopWindower(HOP, WINDOW)
    assert w.push(ramp(10)) == []
    h = w.flush()
    assert (h.seq, h.start, h.end) == (0, 0, 10)
    assert h.window.size == 10
    assert w.flush() is None


def test_empty_pushes_are_no_ops():
    w = HopWindower(HOP, WINDOW)
    for _ in range(5):
        assert w.push(np.zeros(0, dtype=np.float32)) == []
    assert w.pending == 0
    assert w.flush() is None


def test_push_after_flush_continues_the_timeline():
    w = HopWindower(HOP, WINDOW)
    x = ramp(HOP + 100 + 2 * HOP)
    hops = w.push(x[: HOP + 100])
    hops.append(w.flush())
    hops += w.push(x[HOP + 100 :])
    assert [h.seq for h in hops] == [0, 1, 2, 3]
    assert [(h.start, h.end) for h in hops] == [
        (0, HOP),
        (HOP, HOP + 100),
        (HOP + 100, 2 * HOP + 100),
        (2 * HOP + 100, 3 * HOP + 100),
    ]
    for h in hops:
        np.testing.assert_array_equal(h.window, x[max(0, h.end - WINDOW) : h.end])


def test_hop_audio_is_float32_copy():
    w = HopWindower(HOP, WINDOW)
    x = ramp(HOP).astype(np.float64)
    [h] = w.push(x)
    assert h.hop_audio.dtype == np.float32 and h.window.dtype == np.float32
    h.hop_audio[:] = -1
    [h2] = w.push(ramp(HOP, HOP))
    np.testing.assert_array_equal(h2.window[:HOP], ramp(HOP))


def test_buffer_stays_bounded():
    w = HopWindower(HOP, WINDOW)
    for _ in range(200):
        w.push(np.ones(3333, dtype=np.float32))
    assert w._buf.size <= WINDOW + HOP


@pytest.mark.parametrize(
    "hop,window", [(HOP, WINDOW), (HOP, HOP), (160, 480), (7, 20), (1, 1), (3, 1000)]
)
def test_arbitrary_chunkings_give_identical_hops(hop, window):
    rng = np.random.default_rng(hop * 1000 + window)
    total = hop * 9 + int(rng.integers(0, hop))
    x = rng.standard_normal(total).astype(np.float32)
    reference = feed(HopWindower(hop, window), x, [total])
    # The final hop's window is covered by test_final_partial_hop_has_full_window.
    check_hops(reference, x, hop, window, check_last_window=False)
    for _ in range(25):
        max_chunk = int(rng.choice([1, 2, hop - 1 or 1, hop, hop + 1, 3 * hop, total]))
        max_chunk = max(max_chunk, total // 2000)  # keep the test in milliseconds
        sizes = random_sizes(rng, total, max_chunk)
        hops = feed(HopWindower(hop, window), x, sizes)
        check_hops(hops, x, hop, window, check_last_window=False)
        assert len(hops) == len(reference)
        for a, b in zip(hops, reference):
            assert (a.seq, a.start, a.end) == (b.seq, b.start, b.end)
            np.testing.assert_array_equal(a.hop_audio, b.hop_audio)
            np.testing.assert_array_equal(a.window, b.window)


def test_hops_are_ready_without_look_ahead():
    """A hop comes out of the very push that delivers its last sample."""
    rng = np.random.default_rng(3)
    w = HopWindower(HOP, WINDOW)
    received = 0
    emitted = 0
    for k in random_sizes(rng, 20 * HOP + 17, 5000):
        hops = w.push(np.zeros(k, dtype=np.float32))
        received += k
        emitted += len(hops)
        assert emitted == received // HOP
        assert w.pending == received - emitted * HOP


# ================================================================ look-ahead
@pytest.mark.parametrize("ahead", [4000, HOP])
def test_lookahead_hands_a_hop_over_once_its_lookahead_has_come(ahead):
    w = HopWindower(HOP, WINDOW, ahead)
    x = ramp(5 * HOP)
    assert w.push(x[: HOP + ahead - 1]) == []
    assert w.missing == 1
    [h0] = w.push(x[HOP + ahead - 1 : HOP + ahead])
    assert (h0.start, h0.end, h0.ahead_end) == (0, HOP, HOP + ahead)
    assert np.array_equal(h0.window, x[:HOP])
    assert np.array_equal(h0.ahead_window, x[: HOP + ahead])
    hops = w.push(x[HOP + ahead :])
    assert [h.seq for h in hops] == [1, 2, 3]  # hop 4 waits for its look-ahead
    for h in hops:
        assert np.array_equal(h.hop_audio, x[h.start : h.end])
        assert np.array_equal(h.window, x[max(0, h.end - WINDOW) : h.end])
        assert h.ahead_end == h.end + ahead
        a0 = max(0, h.ahead_end - WINDOW)
        assert np.array_equal(h.ahead_window, x[a0 : h.ahead_end])
    assert w.missing == HOP + ahead - w.pending


def test_lookahead_drains_the_waiting_hops_when_the_stream_ends():
    w = HopWindower(HOP, WINDOW, HOP)
    x = ramp(3 * HOP + 100)
    assert [h.seq for h in w.push(x)] == [0, 1]
    [h2] = w.drain()
    assert (h2.start, h2.end, h2.ahead_end) == (2 * HOP, 3 * HOP, 3 * HOP + 100)
    last = w.flush()
    assert (last.start, last.end, last.ahead_end) == (3 * HOP, 3 * HOP + 100, last.end)
    assert np.array_equal(last.ahead_window, last.window)
    assert w.drain() == [] and w.flush() is None


def test_lookahead_past_a_hop_is_refused():
    with pytest.raises(ValueError):
        HopWindower(HOP, WINDOW, HOP + 1)
    assert HopWindower(HOP, WINDOW).push(ramp(HOP))[0].ahead_window is None
