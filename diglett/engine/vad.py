"""Streaming voice-activity detection with Silero VAD (ONNX, no torch).

Replaces the energy gate of `diglett/engine/levels.py` where a model is wanted:
chosen by `bench/vad_compare.py` (see bench/results/vad_compare.json).

The model is the Silero VAD v6 network shipped inside the `silero-vad`
package (MIT), run with `onnxruntime` directly; `silero_vad` itself (which
imports torch) is never imported, its package data is only located on disk.
By default the package's "sequence" export `silero_vad_16k_sequence.onnx` is
used: the same network, bit-exact per-frame probabilities, but all the frames
of one push go through one `session.run` (LSTM state h, c carried between
calls), which halves the CPU cost of 0.1 s pushes against the stock
one-frame-per-call `silero_vad.onnx` (also supported: `MODEL_FILES`).
One `onnxruntime.InferenceSession` is created per process (`load_session`,
cached) with one intra-op and one inter-op thread, and shared by every stream;
each `StreamingVad` carries its own recurrent state and 64-sample context.

Cost (bench/vad_compare.py, one thread): ~0.9 ms of CPU per 0.5 s hop of
audio pushed in 0.1 s pieces (stock model: ~1.7 ms); importing onnxruntime
~25 ms and ~31 MiB RSS, the session ~10 ms and ~9 MiB, once per process;
each stream ~2 KiB plus its probability history (4 bytes per 32 ms frame).
onnxruntime (a dependency of this module only) is ~78 MiB installed.

Units: audio is float32 in [-1, 1] at 16 kHz, shape (n,); positions are
sample indices on the stream's 16 kHz timeline, counted from the first sample
pushed since creation or `reset()`. The model scores fixed frames of
`FRAME_SAMPLES` (512 samples = 32 ms): frame k covers samples
[k * 512, (k + 1) * 512) and gets a speech probability in [0, 1].
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512  # 32 ms: the only frame size the 16 kHz model accepts
CONTEXT_SAMPLES = 64  # tail of the previous frame prepended to each frame
STATE_SHAPE = (2, 1, 128)  # stock model state (2, batch, 128); sequence: h, c
MAX_FRAMES_PER_CALL = 512  # sequence model: most frames per session.run
MODEL_FILES = ("silero_vad_16k_sequence.onnx", "silero_vad.onnx")  # preference
DEFAULT_THRESHOLD = 0.5
DEFAULT_HISTORY_S = 6.0

_SESSION = None
_SESSION_LOCK = threading.Lock()


def model_path(names: tuple[str, ...] = MODEL_FILES) -> Path:
    """Path of the first of `names` shipped in the installed `silero-vad`
    package's data folder, found without importing the package (its
    `__init__` imports torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the silero-vad package is not installed")
    for name in names:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "data" / name
            if path.is_file():
                return path
    raise FileNotFoundError(f"none of {names} in the silero-vad package")


def load_session(path: str | Path | None = None):
    """The process's shared `onnxruntime.InferenceSession` of the model.

    Created on the first call (~35 ms with the onnxruntime import) with
    one intra-op and one inter-op thread;
    later calls return the same object. `path` defaults to `model_path()`;
    a different `path` replaces the cached session.
    """
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None or (path is not None and str(path) != _SESSION._path):
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            opts.log_severity_level = 3
            _SESSION = ort.InferenceSession(
                str(path or model_path()),
                sess_options=opts,
                providers=["CPUExecutionProvider"],
            )
            _SESSION._path = str(path or model_path())
            _SESSION._sequence = "h" in {i.name for i in _SESSION.get_inputs()}
        return _SESSION


class StreamingVad:
    """Speech probability of each 32 ms frame of one 16 kHz stream.

    `push` audio of any length; every complete 512-sample frame is scored at
    once (one model call per push with the sequence model, per frame with
    the stock one), the rest waits for the next push. The
    probabilities of the last `history_s` seconds of scored frames are kept
    for `frame_probs` / `frame_flags` / `speech_fraction`.

    A frame is speech when its probability is >= `threshold`.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        history_s: float = DEFAULT_HISTORY_S,
        session=None,
    ) -> None:
        self.threshold = float(threshold)
        self._session = session if session is not None else load_session()
        self._keep = max(1, int(np.ceil(history_s * SAMPLE_RATE / FRAME_SAMPLES)))
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    # ------------------------------------------------------------ streaming
    def reset(self) -> None:
        """Forget all audio, state and probabilities: a new stream at sample 0."""
        self._state = np.zeros(STATE_SHAPE, dtype=np.float32)  # stock model
        self._h = np.zeros((1, 1, 128), dtype=np.float32)  # sequence model
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._rest = np.zeros(0, dtype=np.float32)
        self._probs = np.zeros(0, dtype=np.float32)
        self._first = 0  # frame index of self._probs[0]
        self._frames = 0  # frames scored since reset

    def push(self, x: np.ndarray) -> None:
        """Add samples of shape (n,), float32 in [-1, 1] at 16 kHz, and score
        every frame they complete."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self._rest.size:
            x = np.concatenate([self._rest, x])
        n = x.size // FRAME_SAMPLES
        if n:
            frames = x[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
            # Model input per frame: the previous frame's last 64 samples,
            # then the frame: shape (n, 576).
            block = np.empty((n, CONTEXT_SAMPLES + FRAME_SAMPLES), np.float32)
            block[0, :CONTEXT_SAMPLES] = self._context
            block[1:, :CONTEXT_SAMPLES] = frames[:-1, -CONTEXT_SAMPLES:]
            block[:, CONTEXT_SAMPLES:] = frames
            self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
            probs = self._score(block)
            self._probs = np.concatenate([self._probs, probs])
            self._frames += n
            if self._probs.size > 2 * self._keep:
                drop = self._probs.size - self._keep
                self._probs = self._probs[drop:]
                self._first += drop
        self._rest = x[n * FRAME_SAMPLES :].copy()

    def _score(self, block: np.ndarray) -> np.ndarray:
        """Probabilities, shape (n,), of the (n, 576) frames with context."""
        if self._session._sequence:
            out = []
            for i in range(0, block.shape[0], MAX_FRAMES_PER_CALL):
                feed = {
                    "input": block[i : i + MAX_FRAMES_PER_CALL],
                    "h": self._h,
                    "c": self._c,
                }
                probs, self._h, self._c = self._session.run(
                    ["speech_probs", "hn", "cn"], feed
                )
                out.append(np.asarray(probs, dtype=np.float32).reshape(-1))
            return out[0] if len(out) == 1 else np.concatenate(out)
        probs = np.empty(block.shape[0], dtype=np.float32)
        feed = {"input": None, "state": self._state, "sr": self._sr}
        for i in range(block.shape[0]):
            feed["input"] = block[i : i + 1]
            out, feed["state"] = self._session.run(None, feed)
            probs[i] = out[0, 0]
        self._state = feed["state"]
        return probs

    # -------------------------------------------------------------- queries
    @property
    def frames(self) -> int:
        """Frames scored since `reset()`: samples [0, frames * 512) are scored."""
        return self._frames

    @property
    def scored_samples(self) -> int:
        """End of the scored part of the stream, in samples."""
        return self._frames * FRAME_SAMPLES

    def frame_range(self, start: int, end: int) -> tuple[int, int]:
        """Indices [f0, f1) of the kept, scored frames that overlap samples
        [start, end)."""
        f0 = max(self._first, start // FRAME_SAMPLES)
        f1 = min(self._frames, -(-end // FRAME_SAMPLES))
        return f0, max(f0, f1)

    def frame_probs(self, start: int, end: int) -> np.ndarray:
        """Speech probabilities, shape (f1 - f0,) float32, of the frames
        [f0, f1) = `frame_range(start, end)` overlapping samples [start, end)."""
        f0, f1 = self.frame_range(start, end)
        return self._probs[f0 - self._first : f1 - self._first].copy()

    def raise_probs(self, f0: int, probs: np.ndarray) -> None:
        """Raise the kept probabilities of frames [f0, f0 + k) to at least
        `probs` (k,): a second opinion on those frames
        (`speech.SileroDetector.recheck_quiet`). Frames not kept or not yet
        scored are left alone; the recurrent state is not touched."""
        a = max(f0, self._first)
        b = min(f0 + probs.size, self._frames)
        if b <= a:
            return
        kept = self._probs[a - self._first : b - self._first]
        np.maximum(kept, probs[a - f0 : b - f0], out=kept)

    def frame_flags(self, start: int, end: int) -> np.ndarray:
        """Speech flags (prob >= threshold), shape (f1 - f0,) bool, of the
        frames overlapping samples [start, end) (see `frame_probs`)."""
        return self.frame_probs(start, end) >= self.threshold

    def speech_fraction(self, start: int, end: int) -> float:
        """Fraction of the scored, kept samples of [start, end) that lie in
        speech frames, in [0, 1]; 0.0 when none of them is scored yet.

        Samples past `scored_samples` (at most 511 when the caller has pushed
        up to `end`) are left out of the fraction rather than counted as
        non-speech.
        """
        f0, f1 = self.frame_range(start, end)
        if f1 <= f0:
            return 0.0
        flags = self._probs[f0 - self._first : f1 - self._first] >= self.threshold
        edges = np.arange(f0, f1 + 1, dtype=np.int64) * FRAME_SAMPLES
        lo = np.maximum(edges[:-1], start)
        hi = np.minimum(edges[1:], end)
        covered = np.maximum(hi - lo, 0)
        total = int(covered.sum())
        if total == 0:
            return 0.0
        return float(covered[flags].sum()) / total

    def is_speech(self, start: int, end: int, min_frac: float = 0.5) -> bool:
        """Whether at least `min_frac` of the scored samples of [start, end)
        are speech (the per-hop decision)."""
        f0, f1 = self.frame_range(start, end)
        return f1 > f0 and self.speech_fraction(start, end) >= min_frac


def create(threshold: float = DEFAULT_THRESHOLD, **kw) -> StreamingVad:
    """A `StreamingVad` on the process's shared model session (cheap after
    the first call: no model load, ~2 KiB of state)."""
    return StreamingVad(threshold=threshold, **kw)
