"""Live windows before enrollments (diglett/lanes.py), as pure bookkeeping."""

from __future__ import annotations

from diglett.lanes import AUTO_BULK_CPU, AUTO_BULK_GPU, Lanes, bulk_windows


def drain(lanes: Lanes) -> list:
    """Every request `lanes` hands out now, without any coming back."""
    out = []
    while (req := lanes.next_request()) is not None:
        out.append(req)
    return out


def test_live_goes_before_bulk_queued_earlier():
    lanes = Lanes(max_in_flight=16, max_windows=512, bulk_windows=8)
    for i in range(4):
        lanes.push(f"enroll{i}", 8, live=False)
    first = drain(lanes)
    assert [r.items for r in first] == [["enroll0"]]  # 8 out: the lane is full
    lanes.push("hop-a", 1, live=True)
    lanes.push("hop-b", 2, live=True)
    second = drain(lanes)
    assert [(r.items, r.n, r.live) for r in second] == [(["hop-a", "hop-b"], 3, True)]
    lanes.done(first[0])
    assert [r.items for r in drain(lanes)] == [["enroll1"]]


def test_bulk_out_at_once_never_passes_its_windows():
    lanes = Lanes(max_in_flight=16, max_windows=512, bulk_windows=8)
    for i, n in enumerate([3, 4, 2, 8]):
        lanes.push(i, n, live=False)
    reqs = drain(lanes)
    assert [(r.items, r.n) for r in reqs] == [([0, 1], 7)]
    assert lanes.bulk_out == 7
    lanes.done(reqs[0])
    assert [(r.items, r.n) for r in drain(lanes)] == [([2], 2)]
    assert lanes.next_request() is None  # 2 + 8 > 8


def test_a_live_flood_does_not_starve_enrollments():
    lanes = Lanes(max_in_flight=4, max_windows=2, bulk_windows=8)
    lanes.push("enroll", 8, live=False)
    for i in range(20):
        lanes.push(i, 2, live=True)
    reqs = drain(lanes)
    assert reqs[0].items == ["enroll"] and not reqs[0].live
    assert len(reqs) == 4 and all(r.live for r in reqs[1:])  # max_in_flight


def test_an_item_bigger_than_a_request_goes_alone():
    lanes = Lanes(max_in_flight=16, max_windows=4, bulk_windows=4)
    lanes.push("long-clip", 9, live=True)
    lanes.push("hop", 1, live=True)
    assert [(r.items, r.n) for r in drain(lanes)] == [(["long-clip"], 9), (["hop"], 1)]


def test_without_a_bulk_lane_everything_is_first_come_first_served():
    lanes = Lanes(max_in_flight=16, max_windows=512, bulk_windows=0)
    lanes.push("enroll", 40, live=False)
    lanes.push("hop", 1, live=True)
    reqs = drain(lanes)
    assert [(r.items, r.live) for r in reqs] == [(["enroll", "hop"], True)]
    assert lanes.bulk_chunks(40) == [slice(0, 40)]


def test_bulk_callers_are_cut_into_items_the_lane_takes():
    lanes = Lanes(max_in_flight=16, max_windows=512, bulk_windows=8)
    assert lanes.bulk_chunks(9) == [slice(0, 4), slice(4, 8), slice(8, 9)]
    assert lanes.bulk_chunks(4) == [slice(0, 4)]
    assert Lanes(16, 512, 1).bulk_chunks(2) == [slice(0, 1), slice(1, 2)]


def test_in_flight_is_counted_back():
    lanes = Lanes(max_in_flight=2, max_windows=1, bulk_windows=8)
    for i in range(3):
        lanes.push(i, 1, live=True)
    reqs = drain(lanes)
    assert len(reqs) == 2 and lanes.pending()
    lanes.done(reqs[0])
    assert [r.items for r in drain(lanes)] == [[2]]
    assert not lanes.pending()


def test_auto_bulk_windows():
    assert bulk_windows(0, 0) == AUTO_BULK_CPU
    assert bulk_windows(0, 1) == AUTO_BULK_GPU
    assert bulk_windows(24, 0) == 24
    assert bulk_windows(-1, 4) == 0
