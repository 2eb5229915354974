"""Fixed batch shapes for GPU replicas, and their settings (no model)."""

from __future__ import annotations

import pytest

from diglett.model.embedder import gpu_batch_shapes, padded_size
from diglett.settings import Settings


def test_default_gpu_shapes_cover_every_batch_with_little_filler():
    shapes = gpu_batch_shapes(512)
    assert shapes == (8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
    for b in range(1, 513):
        k = padded_size(b, shapes)
        assert b <= k <= 512
        if b > 448:
            assert (k - b) / k <= 1 / 8
    assert gpu_batch_shapes(64) == (8, 16, 32, 64)
    assert gpu_batch_shapes(100) == (8, 16, 32, 64, 100)
    assert gpu_batch_shapes(5) == (5,)
    assert gpu_batch_shapes(1) == (1,)
    with pytest.raises(ValueError):
        gpu_batch_shapes(0)


def test_padded_size_is_the_next_shape_or_the_batch_itself():
    assert padded_size(3, ()) == 3
    assert padded_size(3, (4, 8)) == 4
    assert padded_size(4, (4, 8)) == 4
    assert padded_size(5, (4, 8)) == 8
    assert padded_size(9, (4, 8)) == 9  # larger than every shape: as it is


def test_batch_shape_settings_parse_and_refuse_nonsense():
    s = Settings.from_env(env={"DIGLETT_BATCH_SHAPES": " 512, 64,128,64"})
    assert s.parsed_batch_shapes() == (64, 128, 512)
    assert Settings().parsed_batch_shapes() == ()
    for bad in ("0,8", "8,x", "-4", "1.5"):
        with pytest.raises(ValueError, match="DIGLETT_BATCH_SHAPES"):
            Settings.from_env(env={"DIGLETT_BATCH_SHAPES": bad})
    assert Settings.from_env(env={"DIGLETT_GPU_COMPILE": "1"}).gpu_compile == 1
    with pytest.raises(ValueError, match="DIGLETT_GPU_COMPILE"):
        Settings.from_env(env={"DIGLETT_GPU_COMPILE": "2"})
    assert Settings().gpu_streams == 2
    for bad in ("0", "5"):
        with pytest.raises(ValueError, match="DIGLETT_GPU_STREAMS"):
            Settings.from_env(env={"DIGLETT_GPU_STREAMS": bad})


def test_model_thread_ids_are_one_per_thread_of_the_pool():
    """A GPU replica keeps all its model threads at the model's priority:
    it must learn each thread's id, not one thread's id twice."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.embedding import _thread_ids

    for n in (1, 2, 3):
        with ThreadPoolExecutor(n) as pool:
            ids = _thread_ids(pool, n)
            assert len(set(ids)) == n
            assert threading.get_native_id() not in ids
