"""Lower this process's CPU priority (Linux niceness), every thread of it.

On a node that embeds on its CPU, the embedding replica's torch thread is
the bottleneck: when it waits behind the SessionActors, the ingress and the
batchers (tens of processes that wake together at each hop), every session's
labels wait. Those processes do little per hop, so they run a few nice
levels lower and the kernel lets the model thread go first when both are
ready; with idle cores the niceness changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Collection


def lower_cpu_priority(niceness: int, keep: Collection[int] = ()) -> int:
    """Raise the niceness of every thread of this process but those in
    `keep` (native thread ids) to at least `niceness` (never lowers it; 0
    does nothing). Returns how many threads changed. Threads started later
    inherit it from the thread that starts them. Raising niceness needs no
    privilege; where the platform has no per-thread niceness, only the
    calling thread changes."""
    if niceness <= 0:
        return 0
    changed = 0
    for tid in _thread_ids():
        if tid in keep:
            continue
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
                changed += 1
        except OSError:  # the thread ended meanwhile
            pass
    return changed


def thread_niceness(skip: Collection[int] = ()) -> int:
    """The lowest niceness among this process's threads but those in `skip`
    (what the least nice of them runs at)."""
    values = []
    for tid in _thread_ids():
        if tid in skip:
            continue
        try:
            values.append(os.getpriority(os.PRIO_PROCESS, tid))
        except OSError:
            pass
    return min(values)


def _thread_ids() -> list[int]:
    """Native ids of this process's threads ([0], the caller, off Linux)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
