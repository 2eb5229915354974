"""`torch.compile` of ECAPA with fixed batch shapes (GPU replicas'
`DIGLETT_GPU_COMPILE`), checked on the CPU with the random-weight ECAPA:
the compiled graph must give the eager embeddings. Slow (~45 s here: one
compile), but the only check of this path before a GPU runs it."""

from __future__ import annotations

import numpy as np
import pytest

from diglett.model.embedder import Embedder, RandomEcapa


def test_compiled_ecapa_gives_the_eager_embeddings():
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    windows = [(rng.standard_normal(24000) * 3000).astype(np.int16) for _ in range(3)]
    emb = Embedder(RandomEcapa("cpu"), "cpu")
    eager = emb.embed(windows)
    emb.set_batch_shapes((4,))
    emb.compile()
    assert emb.compiled
    assert emb.warm_up(24000) > 0  # compiles the one shape
    compiled = emb.embed(windows)
    for a, b in zip(eager, compiled):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        emb.embed([np.zeros(0, dtype=np.int16)])
