"""The GPU replica's batch path (`Embedder._run_cuda`: rows stacked into a
reusable pinned buffer, copied and run in the thread's own CUDA stream),
run on the CPU with CUDA's stream and pinning stubbed out. No GPU was at
hand; this checks the buffer's shapes, dtypes, growth and reuse."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest

from diglett.model.embedder import Embedder, RandomEcapa


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    import torch

    streams: list[object] = []

    class FakeStream:
        def __init__(self, device) -> None:
            streams.append(self)

    real_empty = torch.empty

    def empty(*args, pin_memory: bool = False, **kwargs):
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch, "empty", empty)
    return streams


def test_the_cuda_batch_path_gives_the_plain_path_embeddings(cpu_as_cuda):
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    ints = [(rng.standard_normal(24000) * 3000).astype(np.int16) for _ in range(4)]
    floats = [w.astype(np.float32) / 32768 for w in ints]
    emb = Embedder(RandomEcapa("cpu"), "cpu")
    want = np.stack(emb.embed(ints))

    # Growing, shrinking and switching dtype reuse one thread's buffer.
    for rows in (ints[:2], ints, ints[:1], floats, ints[:3]):
        got = emb._run_cuda(rows)
        assert got.shape == (len(rows), 192) and got.dtype == np.float32
        assert np.allclose(got, want[: len(rows)], rtol=1e-4, atol=1e-4)
    assert len(cpu_as_cuda) == 1  # one lane (stream) for this thread
    emb.set_batch_shapes((4, 8))  # 3 rows run as 4, the filler dropped
    assert np.allclose(emb._run_cuda(ints[:3]), want[:3], rtol=1e-4, atol=1e-4)

    # Another model thread gets a lane of its own.
    out: list[np.ndarray] = []
    t = threading.Thread(target=lambda: out.append(emb._run_cuda(ints[:2])))
    t.start()
    t.join()
    assert len(cpu_as_cuda) == 2
    assert np.allclose(out[0], want[:2], rtol=1e-4, atol=1e-4)
