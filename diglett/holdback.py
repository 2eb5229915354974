"""Which binary frames a caller may hold back before handing them to a session.

A real-time client sends a frame every 20-100 ms, but a session has nothing
new to say until a hop (0.5 s) completes. The ingress therefore holds valid
audio frames until they reach what the session still needs for its next hop
(`SessionEngine.hold_rule`), and passes them on together: one actor call per
hop instead of one per frame, with no label later than before. A frame that
deserves an answer now (any text message, a malformed or oversized frame)
is never held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diglett.audio import AudioError, InputFormat, decode_frame


@dataclass(frozen=True)
class HoldRule:
    """`wanted`: audio bytes the session needs before it can answer anything
    new (0: pass every frame at once); `fmt`: the session's input format."""

    wanted: int = 0
    fmt: InputFormat = field(default_factory=InputFormat)


def can_hold(frames: list[tuple[bool, str | bytes, float]], rule: HoldRule) -> bool:
    """Whether `frames` (is_text, payload, receive time) may wait for more:
    all are valid audio frames, together under `rule.wanted` bytes."""
    total = 0
    for is_text, payload, _ in frames:
        if is_text:
            return False
        try:
            decode_frame(payload, rule.fmt)  # would it get an error now?
        except AudioError:
            return False
        total += len(payload)
        if total >= rule.wanted:
            return False
    return True
