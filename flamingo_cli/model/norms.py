"""The normalisations a GATED XATTN-DENSE block may use: OpenFlamingo's LayerNorm, or the
RMSNorm of LLaMA-family models, which IDEFICS's blocks use."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight: no bias, no mean subtracted. The mean square is taken in float32
    (squares overflow float16), and x / rms(x) is cast to the weight's dtype before the weight
    multiplies it, as IDEFICS does, so imported weights see the roundings they were trained with."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps)).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """kind: "layernorm" (with bias) or "rmsnorm" (weight only)."""
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else RMSNorm(dim, eps)
