"""Where the speech is: per-frame speech flags of a stream, and what follows.

Two detectors behind one small interface (`SpeechDetector`):
- `SileroDetector` (the default): Silero VAD on 32 ms frames, run with
  onnxruntime, no torch (`diglett/engine/vad.py`); chosen by `bench/vad_compare.py`
  over WebRTC VAD, TEN VAD and the level gate. It finds quiet talkers and
  rejects stationary noise that a level gate cannot tell from speech.
- `EnergyDetector`: the level gate (20 ms frames at or above `gate_dbfs`),
  dependency-free and deterministic, for engines without the model (tests
  of the protocol's rules) and for comparison.

The pure functions below turn flags into the engine's decisions: how much of
a hop is speech, and where the speech part of a window starts (a window that
reaches back over a pause into an earlier turn is cut at the pause, so its
embedding is of the talker now speaking; `bench/cv_decision.py` measures it).
"""

from __future__ import annotations

import numpy as np

from diglett.engine import levels

# Speech part of a window: a pause of at least PART_GAP_S (two Silero
# frames) ends a run; the part is at least PART_MIN_S long and rounded up to
# PART_QUANTUM_S, so that windows come in few lengths (a model batch holds
# windows of one length). Chosen by bench/cv_decision.py (docs/accuracy.md).
PART_GAP_S = 0.064
PART_MIN_S = 0.75
PART_QUANTUM_S = 0.25
# A 32 ms frame is speech at this probability: 0.4, under Silero's own
# 0.5, keeps more of quiet and reverberant talkers; chosen by
# bench/cv_decision.py (docs/accuracy.md).
SILERO_THRESHOLD = 0.4
# Silero's probabilities fall with the level of the speech: a talker under
# noise at -39 dBFS may never reach the threshold where the same recording
# near full scale is near-certain speech. A hop's frames that stand at
# least QUIET_OVER_DB over the stream's background yet fall under the
# threshold are scored again with the hop's window raised by
# `Settings.quiet_gain_db` (`SileroDetector.recheck_quiet`). Frames at the
# background (a floor, steady noise, most of faint babble) are not raised,
# so background stays what the detector is unsure of. Chosen by
# bench/cv_decision.py (docs/accuracy.md).
QUIET_OVER_DB = 5.0


class SpeechDetector:
    """Speech flags of the frames of one 16 kHz stream.

    `push` every sample of the stream in order (positions count from the
    first sample pushed since `reset`); `frame_flags(start, audio)` answers
    for the whole, already scored frames of samples [start, start + n), given
    those samples `audio` (shape (n,), float32).
    """

    frame_samples: int = levels.FRAME_SAMPLES

    def push(self, x: np.ndarray) -> None:
        """Add the stream's next samples, shape (n,)."""

    def reset(self) -> None:
        """A new stream at sample 0."""

    def frame_flags(self, start: int, audio: np.ndarray) -> tuple[int, np.ndarray]:
        """(first frame's start sample, flags (k,) bool) of [start, start+n)."""
        raise NotImplementedError

    def speech_confidence(self, start: int, end: int) -> float | None:
        """How sure the detector is of the speech in samples [start, end):
        the mean speech probability of its speech frames there (0.0 with
        none); None for a detector without probabilities."""
        return None

    def recheck_quiet(
        self,
        start: int,
        window: np.ndarray,
        hop_start: int,
        floor_dbfs: float | None,
        gain_db: float,
    ) -> int:
        """Score again the quiet speech a hop's frames may hold (see
        `QUIET_OVER_DB`); `window` (n,) holds samples [start, start + n),
        the hop [hop_start, start + n) at its end. Returns how many frames
        were scored again (0: the model was not run, as always for a
        detector without probabilities)."""
        return 0


class EnergyDetector(SpeechDetector):
    """The level gate: a 20 ms frame is speech at or above `gate_dbfs`.

    Frames are cut from `start` on (a trailing part of at least half a frame
    counts as a frame, as `levels.frame_dbfs` does), so it needs no stream.
    """

    def __init__(self, gate_dbfs: float) -> None:
        self.gate_dbfs = gate_dbfs

    def frame_flags(self, start: int, audio: np.ndarray) -> tuple[int, np.ndarray]:
        return start, levels.frame_dbfs(audio, self.frame_samples) >= self.gate_dbfs


class SileroDetector(SpeechDetector):
    """Silero VAD's frames (32 ms, aligned to the stream's start)."""

    def __init__(
        self, threshold: float = SILERO_THRESHOLD, history_s: float | None = None
    ) -> None:
        """`history_s`: seconds of frames kept for queries (None: the
        model wrapper's default, ample for a stream's window; a whole clip
        needs its own length)."""
        from diglett.engine import vad

        self.frame_samples = vad.FRAME_SAMPLES
        history_s = vad.DEFAULT_HISTORY_S if history_s is None else history_s
        self._vad = vad.create(threshold=threshold, history_s=history_s)
        self._pending: list[np.ndarray] = []

    def push(self, x: np.ndarray) -> None:
        # Scored when asked: one model call per hop, not one per frame the
        # client sent (bench: ~0.3 ms of CPU a hop at 0.1 s frames).
        self._pending.append(x)

    def reset(self) -> None:
        self._pending = []
        self._vad.reset()

    def _score_pending(self) -> None:
        if self._pending:
            self._vad.push(np.concatenate(self._pending))
            self._pending = []

    def frame_flags(self, start: int, audio: np.ndarray) -> tuple[int, np.ndarray]:
        self._score_pending()
        end = start + audio.size
        f0, _ = self._vad.frame_range(start, end)
        return f0 * self.frame_samples, self._vad.frame_flags(start, end)

    def speech_confidence(self, start: int, end: int) -> float | None:
        self._score_pending()
        probs = self._vad.frame_probs(start, end)
        return mean_speech_prob(probs, self._vad.threshold)

    def recheck_quiet(
        self,
        start: int,
        window: np.ndarray,
        hop_start: int,
        floor_dbfs: float | None,
        gain_db: float,
    ) -> int:
        # A fresh model state on the raised window (the part before the hop
        # warms it up), so the stream's own state is not disturbed; only
        # the hops with such frames pay it (docs/accuracy.md measures how
        # many).
        if floor_dbfs is None or gain_db <= 0:
            return 0
        self._score_pending()
        end = start + window.size
        fs = self.frame_samples
        f0, f1 = self._vad.frame_range(hop_start, end)
        f1 = min(f1, end // fs)  # whole frames of the window only
        if f1 <= f0 or f0 * fs < start:
            return 0
        frame_levels = levels.frame_dbfs(window[f0 * fs - start : f1 * fs - start], fs)
        probs = self._vad.frame_probs(f0 * fs, f1 * fs)
        if probs.size != frame_levels.size:  # frames no longer kept
            return 0
        quiet = quiet_frames(frame_levels, probs, floor_dbfs, self._vad.threshold)
        if not quiet.any():
            return 0
        from diglett.engine import vad

        k0 = -(-start // fs)  # the window's first whole frame
        raised = vad.create(
            threshold=self._vad.threshold,
            history_s=window.size / vad.SAMPLE_RATE + 1.0,  # all of the window
        )
        gain = np.float32(10 ** (gain_db / 20))
        raised.push(np.clip(window[k0 * fs - start :] * gain, -1.0, 1.0))
        second = raised.frame_probs(0, end - k0 * fs)[f0 - k0 : f1 - k0]
        self._vad.raise_probs(f0, np.where(quiet, second, 0.0).astype(np.float32))
        return int(np.count_nonzero(quiet))


def window_lengths(window: int, sample_rate: int = 16000) -> list[int]:
    """The lengths (samples) of the windows a stream's hops send, after the
    first hops: the speech parts shorter than `window`, then `window`."""
    q = int(round(PART_QUANTUM_S * sample_rate))
    n = -(-int(round(PART_MIN_S * sample_rate)) // q) * q
    return list(range(n, window, q)) + [window]


def gap_frames(frame: int, sample_rate: int = 16000) -> int:
    """Most non-speech frames inside a run: shorter than `PART_GAP_S`."""
    return int(np.ceil(PART_GAP_S * sample_rate / frame)) - 1


def make_detector(
    kind: str, gate_dbfs: float, history_s: float | None = None
) -> SpeechDetector:
    """The detector that `DIGLETT_VAD` names: "silero" or "energy";
    `history_s` as `SileroDetector` takes it."""
    if kind == "silero":
        return SileroDetector(history_s=history_s)
    if kind == "energy":
        return EnergyDetector(gate_dbfs)
    raise ValueError(f"unknown speech detector {kind!r}")


# ------------------------------------------------------------ pure helpers
def frame_bounds(first: int, frame: int, k: int, start: int, end: int) -> np.ndarray:
    """(k, 2) sample ranges of `k` frames from `first`, clipped to [start, end)."""
    lo = first + frame * np.arange(k, dtype=np.int64)
    return np.stack([np.maximum(lo, start), np.minimum(lo + frame, end)], axis=1)


def speech_fraction(
    first: int, frame: int, flags: np.ndarray, start: int, end: int
) -> float:
    """Share of the flagged frames' samples inside [start, end) that are speech."""
    if flags.size == 0:
        return 0.0
    b = frame_bounds(first, frame, flags.size, start, end)
    covered = np.maximum(b[:, 1] - b[:, 0], 0)
    total = int(covered.sum())
    return float(covered[flags].sum()) / total if total else 0.0


def quiet_frames(
    frame_levels: np.ndarray,
    probs: np.ndarray,
    floor_dbfs: float,
    threshold: float,
    over_db: float = QUIET_OVER_DB,
) -> np.ndarray:
    """Which frames (k,) to score again at a gain: at least `over_db` over
    the stream's background `floor_dbfs`, yet under `threshold`; levels and
    probabilities (k,) are of the same frames."""
    return (frame_levels >= floor_dbfs + over_db) & (probs < threshold)


def mean_speech_prob(probs: np.ndarray, threshold: float) -> float:
    """Mean of the speech probabilities `probs` (k,) at or over `threshold`
    (the speech frames'); 0.0 when none is."""
    sp = probs[probs >= threshold]
    return float(sp.mean()) if sp.size else 0.0


def speech_seconds(frame: int, flags: np.ndarray, sample_rate: int = 16000) -> float:
    """Seconds of speech in whole frames of `frame` samples."""
    return float(np.count_nonzero(flags)) * frame / sample_rate


def last_run_start(
    first: int, frame: int, flags: np.ndarray, max_gap_frames: int
) -> int | None:
    """Start sample of the last run of speech frames (gaps of at most
    `max_gap_frames` non-speech frames do not end a run); None: no speech."""
    idx = np.flatnonzero(flags)
    if idx.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(idx) > max_gap_frames + 1)
    j = idx[breaks[-1] + 1] if breaks.size else idx[0]
    return first + int(j) * frame


def speech_part_start(
    window_start: int,
    end: int,
    run_start: int | None,
    frame: int,
    sample_rate: int = 16000,
) -> int:
    """Where the embedded part of the window [window_start, end) starts.

    The whole window unless the last speech run starts more than a frame
    into it; then from the run's start, at least `PART_MIN_S` long and
    rounded up to `PART_QUANTUM_S`, never longer than the window.
    """
    if run_start is None or run_start <= window_start + frame:
        return window_start
    q = int(round(PART_QUANTUM_S * sample_rate))
    n = max(end - run_start, int(round(PART_MIN_S * sample_rate)))
    n = -(-n // q) * q
    return max(window_start, end - n)
