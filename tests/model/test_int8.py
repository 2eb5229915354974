"""Int8 ECAPA (diglett/model/int8.py): the rewrite is exact, the quantization close."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import load16, model_dir, needs_model, needs_speakers, utterances
from diglett.engine.decision import normalize
from diglett.model.int8 import PointwiseLinear, pointwise_as_linear, quantize_int8


def test_pointwise_linear_equals_the_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(12, 7, kernel_size=1)
    x = torch.randn(3, 12, 50)
    assert torch.allclose(PointwiseLinear(conv)(x), conv(x), atol=1e-5)


def test_only_pointwise_convolutions_are_replaced():
    model = torch.nn.Sequential(
        torch.nn.Conv1d(4, 4, kernel_size=1),
        torch.nn.Conv1d(4, 4, kernel_size=3, padding=1),
        torch.nn.Conv1d(4, 4, kernel_size=1, groups=2),
    )
    assert pointwise_as_linear(model) == 1
    assert isinstance(model[0], PointwiseLinear)
    assert isinstance(model[1], torch.nn.Conv1d)
    assert isinstance(model[2], torch.nn.Conv1d)


@needs_model
@needs_speakers
@pytest.mark.model
def test_time_major_ecapa_equals_speechbrains_forward():
    """Float32, real model and speech: the time-major head (split attention
    weight, batch norms as affine maps) gives SpeechBrain's embeddings, eager
    and traced, for batch sizes and lengths other than the trace's."""
    from diglett.model.ecapa_time_major import TimeMajorEcapa
    from diglett.model.model_store import load_encoder

    encoder = load_encoder(model_dir(), "cpu")
    ecapa = encoder.mods.embedding_model.eval()
    x = load16(utterances()["VCTK-p226"][0])
    for n, size in ((3, 24000), (1, 8000), (5, 40000)):
        wavs = torch.from_numpy(
            np.stack([(0.1 + k / n) * x[k * 4000 : k * 4000 + size] for k in range(n)])
        )
        lens = torch.ones(n)
        with torch.inference_mode():
            feats = encoder.mods.mean_var_norm(
                encoder.mods.compute_features(wavs), lens
            )
            want = encoder.mods.embedding_model(feats, lens)
            rewritten = copy.deepcopy(ecapa)
            pointwise_as_linear(rewritten)
            fast = TimeMajorEcapa(rewritten)
            eager = fast(feats, lens)
            traced = fast.trace()(feats, lens)
        assert want.shape == (n, 1, 192)
        for got in (eager, traced):
            assert got.shape == want.shape
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (
                (got - want).abs().max()
            )
    with pytest.raises(ValueError, match="equal-length"):
        fast(feats, torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0]))


def test_a_model_without_pointwise_convolutions_is_refused():
    with pytest.raises(ValueError):
        quantize_int8(torch.nn.Sequential(torch.nn.Conv1d(2, 2, kernel_size=3)))


@needs_model
@needs_speakers
@pytest.mark.model
def test_int8_embeddings_stay_close_and_keep_speakers_apart():
    """Real speech, 1.5 s windows: int8 within cosine 0.95 of float32 (0.99
    on average), and same-speaker pairs still far above other-speaker ones."""
    from diglett.model.embedder import Embedder

    fp32 = Embedder.load(model_dir(), "cpu", "fp32")
    int8 = Embedder.load(model_dir(), "cpu", "int8")
    u = utterances()
    speakers = ["LS-19", "VCTK-p226", "ARCTIC-clb", "VCTK-p228"]
    windows, who = [], []
    for name in speakers:
        for path in u[name][:2]:
            x = load16(path)
            for k in range(0, min(x.size - 24000, 4 * 16000), 16000):
                windows.append(x[k : k + 24000])
                who.append(name)
    a = np.stack([normalize(e) for e in fp32.embed(windows)])
    b = np.stack([normalize(e) for e in int8.embed(windows)])
    cos = np.sum(a * b, axis=1)
    assert cos.min() >= 0.95 and cos.mean() >= 0.98, cos
    who = np.array(who)
    same = who[:, None] == who[None, :]
    off = ~np.eye(len(who), dtype=bool)
    for e in (a, b):
        sims = e @ e.T
        assert sims[same & off].mean() - sims[~same].mean() > 0.3
    # The two precisions agree on every pair's similarity to within 0.06.
    assert np.abs(a @ a.T - b @ b.T).max() < 0.06


def test_precision_setting_is_validated():
    from diglett.model.embedder import Embedder
    from diglett.settings import Settings

    assert Settings().cpu_precision == "int8"
    assert (
        Settings.from_env(env={"DIGLETT_CPU_PRECISION": "fp32"}).cpu_precision == "fp32"
    )
    with pytest.raises(ValueError, match="CPU_PRECISION"):
        Settings.from_env(env={"DIGLETT_CPU_PRECISION": "fp16"})
    with pytest.raises(ValueError, match="cpu_precision"):
        Embedder.load(model_dir(), "cpu", "int4")


@needs_model
@needs_speakers
@pytest.mark.model
def test_an_embedding_does_not_depend_on_its_batch_neighbours():
    """A quiet window embedded beside loud ones (other sessions' audio) gets
    the embedding it gets alone, within 1e-4, in int8 (each window runs
    alone: the traced model's activation scales are per batch) and fp32."""
    from diglett.model.embedder import Embedder

    x = load16(utterances()["LS-19"][1])
    quiet, loud = 0.05 * x[:24000], np.clip(8 * x[24000:48000], -1, 1)
    others = [loud, quiet[::-1].copy(), np.clip(4 * x[48000:72000], -1, 1)]
    for precision in ("int8", "fp32"):
        emb = Embedder.load(model_dir(), "cpu", precision)
        [alone] = emb.embed([quiet])
        together = emb.embed(others[:1] + [quiet] + others[1:])[1]
        assert np.abs(alone - together).max() < 1e-4 * np.abs(alone).max(), precision
    # What it guards against: the same model on the whole batch moves it.
    batched = Embedder.load(model_dir(), "cpu", "int8")
    mods = batched.encoder.mods
    mods.embedding_model = mods.embedding_model.model  # the whole batch at once
    [alone] = batched.embed([quiet])
    together = batched.embed(others[:1] + [quiet] + others[1:])[1]
    assert np.abs(alone - together).max() > 1e-3 * np.abs(alone).max()


@pytest.mark.parametrize("k,dilation", [(3, 2), (3, 4), (5, 1)])
def test_time_major_tdnn_block_equals_speechbrains(k, dilation):
    """One TDNN block (reflect-padded "same" convolution, ReLU, batch norm)
    as a product over its taps' frames, time-major, equals SpeechBrain's,
    edges included."""
    from speechbrain.lobes.models.ECAPA_TDNN import TDNNBlock

    from diglett.model.ecapa_time_major import _TimeConv

    torch.manual_seed(0)
    block = TDNNBlock(6, 5, kernel_size=k, dilation=dilation).eval()
    with torch.no_grad():
        for buf in (block.norm.norm.running_mean, block.norm.norm.weight):
            buf.copy_(torch.randn(5))
        block.norm.norm.running_var.copy_(torch.rand(5) + 0.5)
    x = torch.randn(2, 6, 17)
    with torch.no_grad():
        want = block(x).transpose(1, 2)
        got = _TimeConv(block)(x.transpose(1, 2).contiguous())
    assert got.shape == want.shape == (2, 17, 5)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
