"""Which binary frames a caller may hold back before handing them to a session.

A real-time client sends a frame every 20-100 ms, but a session has nothing
new to say until a hop (0.5 s) completes. The ingress therefore holds valid
audio frames until they reach what the session still needs for its next hop
(`SessionEngine.hold_rule`), and passes them on together: one actor call per
hop instead of one per frame, with no label later than before. A frame that
deserves an answer now (any text message, a malformed or oversized frame)
is never held.

A stream that runs well ahead of real time (a file sent as fast as the
server takes it) completes hops faster than any label could be read, and
each actor call costs the server more than the frames it carries (no-op
model on 2 cores, fitted over two loads: ~5.5 ms of the SessionActor's CPU
per call against ~0.5 ms per 1 s frame).
Such a stream (`StreamPace.fast`) is answered once per `COALESCE_S` of wall
time instead, as a real-time one is, with every hop that arrived meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diglett.engine.audio import InputFormat, frame_error

Frame = tuple[bool, "str | bytes", float]  # (is_text, payload, receive time)

# Audio this far ahead of the wall clock marks a fast stream: a real-time
# source stays within about one frame (<= 1 s).
FAST_LEAD_S = 2.0
# The lead drains at twice the wall clock, so only a stream sent at more
# than twice real time stays fast, and a real-time client that catches up
# after a stall is fast only for as long as the stall lasted.
DRAIN = 2.0
# Such a stream's frames wait until the oldest is this old (one hop).
COALESCE_S = 0.5


@dataclass(frozen=True)
class HoldRule:
    """`wanted`: audio bytes the session needs before it can answer anything
    new (0: pass every frame at once); `fmt`: the session's input format."""

    wanted: int = 0
    fmt: InputFormat = field(default_factory=InputFormat)


def can_hold(held: list[Frame], new: list[Frame], rule: HoldRule) -> bool:
    """Whether `held + new` frames (is_text, payload, receive time) may wait
    for more: all are valid audio frames, together under `rule.wanted` bytes.

    `held`: frames this said could wait, under the same rule (the rule only
    changes with an answer, which takes every held frame), so only `new` is
    checked: each frame is checked once, and never decoded here.
    """
    total = sum(len(payload) for _, payload, _ in held)
    for is_text, payload, _ in new:
        if is_text or frame_error(payload, rule.fmt) is not None:
            return False
        total += len(payload)
    return total < rule.wanted


@dataclass
class StreamPace:
    """How far a connection's audio has run ahead of the wall clock, in s.

    A leaky bucket: each binary frame adds its duration (in the session's
    format), `DRAIN` times the time between arrivals drains it, never below
    0. A real-time source stays within about a frame; a file sent at 50x
    real time gains 48 s every second. A text frame (a control message)
    starts it afresh: enrollment clips are sent at once, but say nothing of
    the pace of the stream that follows them.
    """

    lead_s: float = 0.0
    last_t: float | None = None

    def add(self, frames: list[Frame], fmt: InputFormat) -> None:
        for is_text, payload, t in frames:
            if is_text:
                self.lead_s, self.last_t = 0.0, t
                continue
            if self.last_t is not None:
                self.lead_s = max(0.0, self.lead_s - DRAIN * max(0.0, t - self.last_t))
            self.lead_s += len(payload) / fmt.max_frame_bytes
            self.last_t = t

    @property
    def fast(self) -> bool:
        return self.lead_s >= FAST_LEAD_S


def send_by(
    held: list[Frame], new: list[Frame], rule: HoldRule, pace: StreamPace
) -> float | None:
    """When frames that `can_hold` would pass on may still wait for more.

    `held`: frames already held (valid audio); `new`: those taken since.
    Returns the receive-clock time to send them by (the oldest frame's
    arrival plus `COALESCE_S`), or None to send now: the stream is not
    `fast`, the session takes no audio now (`rule.wanted == 0`), or a new
    frame deserves an answer now. Only `new` is checked, so a long hold
    checks each frame once.
    """
    frames = held + new
    if not frames or rule.wanted <= 0 or not pace.fast:
        return None
    for is_text, payload, _ in new:
        if is_text or frame_error(payload, rule.fmt) is not None:
            return None
    return frames[0][2] + COALESCE_S
