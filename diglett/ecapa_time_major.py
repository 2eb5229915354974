"""ECAPA-TDNN's aggregation and pooling, computed time-major, for the CPU.

SpeechBrain keeps ECAPA's activations channel-major, (batch, channels,
time). Its pointwise layers, once they are matrix products over channels
(diglett/int8.py), want (batch, time, channels), so every one of them
copied its input into that layout and handed back a transposed view that
the batch norm after it walked slowly. The worst was the attentive pooling:
it concatenates the frames with their utterance mean and standard deviation
repeated over time, (batch, 9216, time), only to multiply that by a matrix.

Here the head of the model (multi-layer aggregation, attentive statistics
pooling, its batch norm and the final linear layer) runs time-major:

- the three blocks' outputs are gathered into (batch, time, 3072) with one
  copy, and every later layer reads contiguous rows;
- batch norms are the affine maps they are at inference, over the last axis;
- the attention's 9216-channel input is never built: its weight splits into
  the part for the frames and the part for the (time-constant) statistics,
  which is computed once per utterance:
  W [x; m; s] = W_x x + (W_m m + W_s s).

The arithmetic is the same as SpeechBrain's up to float rounding
(tests/test_int8.py); in int8, the attention's activations are scaled by
the frames' range alone. Measured with one thread, batch 8 of 1.5 s windows
(bench/cpu_model.py): see README.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diglett.int8 import PointwiseLinear


def _affine(bn: torch.nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """An inference-time batch norm as (scale, shift), each shape (channels,)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach().clone(), (bn.bias - bn.running_mean * scale).detach().clone()


def _linear(layer: torch.nn.Module) -> torch.nn.Linear:
    """The `nn.Linear` of a pointwise layer (see int8.PointwiseLinear)."""
    if not isinstance(layer, PointwiseLinear):
        raise ValueError(f"expected a PointwiseLinear, got {type(layer).__name__}")
    return layer.linear


class TimeMajorEcapa(torch.nn.Module):
    """SpeechBrain's `ECAPA_TDNN` (pointwise layers already `PointwiseLinear`)
    with its head run time-major; same inputs and outputs.

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
            warnings.simplefilter("ignore")  # tracer notes on constants
            self.net = torch.jit.trace(self.net.eval(), example, check_trace=False)
        return self


class _Network(torch.nn.Module):
    """The computation of TimeMajorEcapa: (B, T, 80) -> (B, 1, 192)."""

    def __init__(self, ecapa: torch.nn.Module) -> None:
        super().__init__()
        if not ecapa.asp.global_context:
            raise ValueError("only ECAPA with global-context attention")
        self.blocks = ecapa.blocks
        mfa = ecapa.mfa
        self.mfa = _linear(mfa.conv)
        self._affine_buffers("mfa", mfa.norm.norm)
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
        self._affine_buffers("attn", asp.tdnn.norm.norm)
        self.attn_out = _linear(asp.conv)
        self._affine_buffers("pool", ecapa.asp_bn.norm)
        self.fc = _linear(ecapa.fc)

    def _affine_buffers(self, name: str, bn: torch.nn.BatchNorm1d) -> None:
        scale, shift = _affine(bn)
        self.register_buffer(f"{name}_scale", scale)
        self.register_buffer(f"{name}_shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, 80, T): the blocks stay channel-major
        outs = []
        for layer in self.blocks:
            # Whole signals: SE gates average over all frames (lengths=None).
            x = layer(x)
            outs.append(x)
        # (B, T, 3072), one copy; the blocks' outputs are (B, 1024, T).
        h = torch.cat([o.transpose(1, 2) for o in outs[1:]], dim=2)
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
