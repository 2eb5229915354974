"""diglett/priority.py: serving processes yield the CPU to the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import os, threading
from diglett.priority import lower_cpu_priority, thread_niceness
ids, stop = [], threading.Event()
def wait():
    ids.append(threading.get_native_id())
    stop.wait()
threads = [threading.Thread(target=wait) for _ in range(2)]
for t in threads:
    t.start()
while len(ids) < 2:
    pass
kept, other = ids
base = thread_niceness()
print(lower_cpu_priority(0), thread_niceness() == base)
print(lower_cpu_priority(base + 3, keep={kept}), thread_niceness(skip={kept}) == base + 3)
print(os.getpriority(os.PRIO_PROCESS, kept) == base, os.getpriority(os.PRIO_PROCESS, other) == base + 3)
print(lower_cpu_priority(base + 1, keep={kept}), thread_niceness(skip={kept}) == base + 3)
stop.set()
for t in threads:
    t.join()
"""


def test_every_thread_is_lowered_and_never_raised():
    """In a child process with three threads: 0 changes nothing, a higher
    niceness reaches every thread but the one kept (the replica's model
    thread), a lower one is not applied (serving never gains priority)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    assert out[:4] == ["0 True", "2 True", "True True", "0 True"], out


def test_serving_nice_setting_is_validated():
    import pytest

    from diglett.settings import Settings

    assert Settings().serving_nice == 5
    assert Settings.from_env({"DIGLETT_SERVING_NICE": "0"}).serving_nice == 0
    for bad in ("-1", "20", "high"):
        with pytest.raises(ValueError, match="DIGLETT_SERVING_NICE"):
            Settings.from_env({"DIGLETT_SERVING_NICE": bad})
