"""ECAPA-TDNN computed time-major, for the CPU.

SpeechBrain keeps ECAPA's activations channel-major, (batch, channels,
time). Its pointwise layers, once they are matrix products over channels
(diglett/model/int8.py), want (batch, time, channels), so every one of them
copied its input into that layout and handed back a transposed view that
the batch norm after it walked slowly. The worst was the attentive pooling:
it concatenates the frames with their utterance mean and standard deviation
repeated over time, (batch, 9216, time), only to multiply that by a matrix.

Here the whole network runs time-major:

- every convolution is a matrix product over contiguous rows: the
  pointwise layers as they are, the first block's k=5 and the Res2Nets'
  dilated k=3 convolutions over their taps' frames side by side (so int8
  covers them too);
- the three blocks' outputs concatenate into (batch, time, 3072) as they are;
- batch norms are the affine maps they are at inference, over the last axis;
- the attention's 9216-channel input is never built: its weight splits into
  the part for the frames and the part for the (time-constant) statistics,
  which is computed once per utterance:
  W [x; m; s] = W_x x + (W_m m + W_s s).

The arithmetic is the same as SpeechBrain's up to float rounding
(tests/model/test_int8.py); in int8, the attention's activations are scaled by
the frames' range alone. Measured with one thread, batch 8 of 1.5 s windows
(bench/cpu_model.py): see docs/performance.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diglett.model.int8 import PointwiseLinear


def _affine(bn: torch.nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """An inference-time batch norm as (scale, shift), each shape (channels,)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach().clone(), (bn.bias - bn.running_mean * scale).detach().clone()


def _affine_buffers(
    module: torch.nn.Module, name: str, bn: torch.nn.BatchNorm1d
) -> None:
    """Register `bn` as buffers `{name}_scale` and `{name}_shift` of `module`."""
    scale, shift = _affine(bn)
    module.register_buffer(f"{name}_scale", scale)
    module.register_buffer(f"{name}_shift", shift)


def _linear(layer: torch.nn.Module) -> torch.nn.Linear:
    """The `nn.Linear` of a pointwise layer (see int8.PointwiseLinear)."""
    if not isinstance(layer, PointwiseLinear):
        raise ValueError(f"expected a PointwiseLinear, got {type(layer).__name__}")
    return layer.linear


class TimeMajorEcapa(torch.nn.Module):
    """SpeechBrain's `ECAPA_TDNN` (pointwise layers already `PointwiseLinear`)
    run time-major after its first block; same inputs and outputs.

    forward(x: (batch, time, 80) features, lengths: (batch,) relative, all 1)
    -> (batch, 1, 192) embeddings. Only whole, equal-length signals are
    supported (what `Embedder` sends); other lengths are refused, not
    silently mis-pooled.
    """

    def __init__(self, ecapa: torch.nn.Module) -> None:
        super().__init__()
        self.net: torch.nn.Module = _Network(ecapa)

    def forward(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if lengths is not None and not bool((lengths == 1).all()):
            raise ValueError("TimeMajorEcapa embeds whole, equal-length signals only")
        return self.net(x)

    def trace(self) -> "TimeMajorEcapa":
        """Run the network as a TorchScript trace from now on; returns self.

        Why: the replica embeds in a worker thread while its event loop
        serves requests, and an eager forward takes the GIL back after each
        of its ~400 operator calls, waiting behind that loop each time. A
        trace runs in C++ without the GIL, and its dispatch costs less
        (1.14x windows/s alone, 1.22x beside a busy Python thread, one
        torch thread). No operation depends on the input's shape, so one
        trace serves every batch size and length (tested).
        """
        import warnings

        example = torch.zeros(2, 151, 80)
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.11 warns that jit.trace is deprecated for torch.compile
            # (a C++ toolchain at run time) or torch.export (the way on; see
            # docs/performance.md); one warning per replica start helps nobody.
            warnings.simplefilter("ignore")
            self.net = torch.jit.trace(self.net.eval(), example, check_trace=False)
        return self


class _Network(torch.nn.Module):
    """The computation of TimeMajorEcapa: (B, T, 80) -> (B, 1, 192)."""

    def __init__(self, ecapa: torch.nn.Module) -> None:
        super().__init__()
        if not ecapa.asp.global_context:
            raise ValueError("only ECAPA with global-context attention")
        self.first = _TimeConv(ecapa.blocks[0])  # k=5, 80 -> 1024 channels
        self.blocks = torch.nn.ModuleList(_SERes2Block(b) for b in ecapa.blocks[1:])
        mfa = ecapa.mfa
        self.mfa = _linear(mfa.conv)
        _affine_buffers(self, "mfa", mfa.norm.norm)
        asp = ecapa.asp
        self.eps = asp.eps
        attn = _linear(asp.tdnn.conv)
        c = self.mfa.out_features
        # W [x; m; s] + b: the frames' part stays a layer of its own (int8
        # when quantized); the statistics' part is one float32 product.
        self.attn_frames = torch.nn.Linear(c, attn.out_features, bias=False)
        with torch.no_grad():
            self.attn_frames.weight.copy_(attn.weight[:, :c])
        self.register_buffer("attn_stats_w", attn.weight[:, c:].detach().clone())
        self.register_buffer("attn_bias", attn.bias.detach().clone())
        _affine_buffers(self, "attn", asp.tdnn.norm.norm)
        self.attn_out = _linear(asp.conv)
        _affine_buffers(self, "pool", ecapa.asp_bn.norm)
        self.fc = _linear(ecapa.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)  # (B, T, 80) -> (B, T, 1024)
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        h = torch.cat(outs, dim=2)  # (B, T, 3072)
        h = F.relu_(self.mfa(h)).mul_(self.mfa_scale).add_(self.mfa_shift)
        pooled = self._pool(h)
        pooled = pooled * self.pool_scale + self.pool_shift
        return self.fc(pooled).unsqueeze(1)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """Attentive statistics pooling: (B, T, C) frames -> (B, 2C)."""
        mean, std = _stats(h, None, self.eps)
        stats = torch.cat([mean, std], dim=1)
        glob = F.linear(stats, self.attn_stats_w, self.attn_bias)  # (B, 128)
        a = F.relu_(self.attn_frames(h) + glob.unsqueeze(1))
        a = torch.tanh_(a.mul_(self.attn_scale).add_(self.attn_shift))
        w = torch.softmax(self.attn_out(a), dim=1)  # (B, T, C), over time
        mean, std = _stats(h, w, self.eps)
        return torch.cat([mean, std], dim=1)


class _TimeConv(torch.nn.Module):
    """SpeechBrain's TDNNBlock (a "same", reflect-padded, dilated convolution,
    ReLU, batch norm) on time-major (B, T, C_in) -> (B, T, C_out).

    The convolution is one matrix product: the k taps' frames, shifted by
    the dilation, sit side by side in a (B, T, k * C_in) row, and the kernel
    (C_out, C_in, k) is laid out to match as an `nn.Linear` of k * C_in
    inputs, which int8 quantization then covers like the pointwise layers.
    """

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        conv = block.conv.conv
        if (
            conv.stride != (1,)
            or conv.groups != 1
            or block.conv.padding != "same"
            or block.conv.padding_mode != "reflect"
            or not isinstance(block.activation, torch.nn.ReLU)
        ):
            raise ValueError("only stride-1, 'same' reflect-padded ReLU TDNN blocks")
        c_out, c_in, k = conv.weight.shape
        self.k, self.dilation = k, conv.dilation[0]
        self.pad = self.dilation * (k - 1) // 2
        self.linear = torch.nn.Linear(k * c_in, c_out, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight.permute(0, 2, 1).reshape(c_out, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)
        _affine_buffers(self, "bn", block.norm.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, p, d = x.shape[1], self.pad, self.dilation
        # Reflect padding over time (the edge frame is not repeated).
        padded = torch.cat(
            [x[:, 1 : p + 1].flip(1), x, x[:, t - 1 - p : t - 1].flip(1)], dim=1
        )
        taps = torch.cat([padded[:, i * d : i * d + t] for i in range(self.k)], dim=2)
        return F.relu_(self.linear(taps)).mul_(self.bn_scale).add_(self.bn_shift)


class _Res2Net(torch.nn.Module):
    """SpeechBrain's Res2NetBlock on time-major (B, T, C): the channels split
    into `scale` groups; group i > 0 goes through its TDNN block, after the
    previous group's output is added to it (from i = 2 on)."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.scale = block.scale
        self.convs = torch.nn.ModuleList(_TimeConv(b) for b in block.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.chunk(self.scale, dim=2)
        out = [groups[0]]
        y = groups[1]
        for i, conv in enumerate(self.convs):
            y = conv(y if i == 0 else groups[i + 1] + y)
            out.append(y)
        return torch.cat(out, dim=2)


class _SERes2Block(torch.nn.Module):
    """SpeechBrain's SERes2NetBlock on time-major (B, T, C) input and output.

    Every layer reads contiguous rows, the Res2Net's convolutions too
    (`_Res2Net`). The SE gate averages over all frames (whole signals, as
    TimeMajorEcapa requires).
    """

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        if block.shortcut is not None:
            raise ValueError("only SE-Res2Blocks without a shortcut convolution")
        self.lin1 = _linear(block.tdnn1.conv)
        _affine_buffers(self, "bn1", block.tdnn1.norm.norm)
        self.res2net = _Res2Net(block.res2net_block)
        self.lin2 = _linear(block.tdnn2.conv)
        _affine_buffers(self, "bn2", block.tdnn2.norm.norm)
        self.se1 = _linear(block.se_block.conv1)
        self.se2 = _linear(block.se_block.conv2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu_(self.lin1(x)).mul_(self.bn1_scale).add_(self.bn1_shift)
        h = self.res2net(h)
        h = F.relu_(self.lin2(h)).mul_(self.bn2_scale).add_(self.bn2_shift)
        gate = torch.sigmoid(self.se2(F.relu(self.se1(h.mean(dim=1)))))  # (B, C)
        return torch.addcmul(x, h, gate.unsqueeze(1))


def _stats(
    h: torch.Tensor, w: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and std over time of h (B, T, C); w (B, T, C) sums to
    1 over time, or None for the plain mean. Returns two (B, C)."""
    if w is None:
        mean = h.mean(dim=1)
        var = (h - mean.unsqueeze(1)).pow_(2).mean(dim=1)
    else:
        mean = (w * h).sum(dim=1)
        var = (h - mean.unsqueeze(1)).pow_(2).mul_(w).sum(dim=1)
    return mean, torch.sqrt(var.clamp(eps))


def is_ecapa(model: torch.nn.Module) -> bool:
    """Whether `model` is SpeechBrain's ECAPA_TDNN (what TimeMajorEcapa wraps)."""
    from speechbrain.lobes.models.ECAPA_TDNN import ECAPA_TDNN

    return isinstance(model, ECAPA_TDNN)
