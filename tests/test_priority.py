"""diglett/priority.py: serving processes yield the CPU to the model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import os, threading
from diglett.priority import lower_cpu_priority, thread_niceness
start, stop = threading.Event(), threading.Event()
def wait():
    start.set()
    stop.wait()
t = threading.Thread(target=wait)
t.start()
start.wait()
base = thread_niceness()
print(lower_cpu_priority(0), thread_niceness() == base)
print(lower_cpu_priority(base + 3), thread_niceness() == base + 3)
print(lower_cpu_priority(base + 1), thread_niceness() == base + 3)
stop.set()
t.join()
"""


def test_every_thread_is_lowered_and_never_raised():
    """In a child process with two threads: 0 changes nothing, a higher
    niceness reaches both threads, a lower one is not applied (the
    serving processes never gain priority)."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    assert out[:3] == ["0 True", "2 True", "0 True"], out


def test_serving_nice_setting_is_validated():
    import pytest

    from diglett.settings import Settings

    assert Settings().serving_nice == 5
    assert Settings.from_env({"DIGLETT_SERVING_NICE": "0"}).serving_nice == 0
    for bad in ("-1", "20", "high"):
        with pytest.raises(ValueError, match="DIGLETT_SERVING_NICE"):
            Settings.from_env({"DIGLETT_SERVING_NICE": bad})
