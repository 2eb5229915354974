"""Int8 ECAPA for CPUs: its pointwise convolutions as dynamically quantized GEMMs.

Nine tenths of ECAPA-TDNN's multiply-adds are kernel-1 convolutions (each
SE-Res2Block's two 1024x1024, the 3072x3072 MFA, the attention's 9216->128):
per frame, a plain matrix product over channels. Written as `nn.Linear` over
(batch, time, channels), PyTorch's dynamic quantization runs them as int8
GEMMs (fbgemm; AVX-512 VNNI where the CPU has it) with per-channel weight
scales and per-batch activation scales. In SpeechBrain's layout the k=5 and
dilated k=3 convolutions, batch norms, SE gates and the pooling arithmetic
stay float32; the time-major network (diglett/model/ecapa_time_major.py) makes the
k>1 convolutions matrix products too, so they run int8 as well.

Measured on the 2-core machine, batch 8 of 1.5 s windows, side by side
(bench/cpu_model.py): 9.0 -> 17.8 windows/s with one torch thread; real
speech embeds at cosine 0.990 (mean) and >= 0.965 (min) of float32
(tests/model/test_int8.py); the live accuracy benchmark labels as well (docs/performance.md).
"""

from __future__ import annotations

import torch


class PointwiseLinear(torch.nn.Module):
    """A kernel-1 `nn.Conv1d` as an `nn.Linear` over channels.

    Input and output keep the convolution's layout, shape (batch, channels, time).
    Quantized, its int8 activations are scaled by the range of the whole
    batch, so a window's embedding moves a little with its batch neighbours
    (cosine >= 0.99 to the window alone, tests/model/test_int8.py). Running the
    linear once per window avoids that, but on the live 2-core server it held
    4 real-time sessions instead of 6 (side by side, also when scripted);
    `DIGLETT_CPU_PRECISION=fp32` is exact and batch-independent.
    """

    def __init__(self, conv: torch.nn.Conv1d) -> None:
        super().__init__()
        if conv.kernel_size != (1,) or conv.groups != 1 or conv.stride != (1,):
            raise ValueError("only kernel-1, stride-1, ungrouped convolutions")
        self.linear = torch.nn.Linear(
            conv.in_channels, conv.out_channels, bias=conv.bias is not None
        )
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight[:, :, 0])
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.transpose(1, 2)).transpose(1, 2)


def _pointwise(module: torch.nn.Module) -> torch.nn.Conv1d | None:
    """The kernel-1 convolution `module` computes, if that is all it does.

    Either a bare `nn.Conv1d`, or SpeechBrain's channels-first `Conv1d`
    wrapper around one: its "same" padding of a kernel-1 convolution is
    zero, yet it still copies the tensor through `reflection_pad1d` (12 % of
    the int8 model's time), so the wrapper is replaced as a whole.
    """
    conv = module
    if not isinstance(module, torch.nn.Conv1d):
        conv = getattr(module, "conv", None)
        if not (
            isinstance(conv, torch.nn.Conv1d)
            and getattr(module, "skip_transpose", False)
            and not getattr(module, "unsqueeze", False)
            and getattr(module, "padding", None) in ("same", "valid")
        ):
            return None
    if (
        conv.kernel_size == (1,)
        and conv.groups == 1
        and conv.stride == (1,)
        and conv.padding in ((0,), "valid", "same")
    ):
        return conv
    return None


def pointwise_as_linear(model: torch.nn.Module) -> int:
    """Replace, in place, every kernel-1 Conv1d of `model`; returns how many."""
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            conv = _pointwise(child)
            if conv is not None:
                setattr(module, name, PointwiseLinear(conv))
                n += 1
    return n


class OneWindowAtATime(torch.nn.Module):
    """`model` run on one window of the batch at a time.

    Dynamically quantized, its int8 activations are scaled by the range of
    the whole batch, so a window's embedding would move with the windows
    batched beside it: another session's audio (tests/model/test_int8.py).
    At one torch thread this costs no windows/s (bench/cpu_model.py,
    int8 against int8-batched). forward(x: (B, T, 80), lengths: (B,) or
    None) -> (B, 1, 192), as `model`'s.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if lengths is None:
            return torch.cat([self.model(x[i : i + 1]) for i in range(x.shape[0])])
        return torch.cat(
            [self.model(x[i : i + 1], lengths[i : i + 1]) for i in range(x.shape[0])]
        )


def quantize_int8(model: torch.nn.Module, time_major: bool = True) -> torch.nn.Module:
    """`model` (ECAPA's embedding_model) made int8 for CPU inference, in
    place (a replica never needs the float copy, so none is made); returned.

    An ECAPA then runs time-major (diglett/model/ecapa_time_major.py) and
    the network as a TorchScript trace; `time_major=False` keeps
    SpeechBrain's own eager model, for side-by-side benchmarks. Either runs
    one window at a time (OneWindowAtATime: `.model` is the network itself).
    """
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    from diglett.model.ecapa_time_major import TimeMajorEcapa, is_ecapa

    converted = model.cpu().eval()
    if pointwise_as_linear(converted) == 0:
        raise ValueError("the model has no pointwise convolutions to quantize")
    if time_major and is_ecapa(converted):
        converted = TimeMajorEcapa(converted).eval()
    # torch 2.11 still ships eager dynamic quantization but warns that it
    # moves to torchao; one warning per replica start says nothing useful.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(
            converted,
            {torch.nn.Linear: per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=True,
        )
    if isinstance(quantized, TimeMajorEcapa):
        quantized.trace()
    return OneWindowAtATime(quantized)
