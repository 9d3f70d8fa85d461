"""GATED XATTN-DENSE (paper §2.2): the only new layers inside the frozen LM.

    y = y + tanh(a_attn) * xattn(q=y, kv=visual)
    y = y + tanh(a_ffw)  * ffw(y)

Both gates are scalars initialised at 0, so before training the model *is* the frozen LM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import XAttnConfig
from .masking import cross_attention_mask
from .resampler import feed_forward


class MaskedCrossAttention(nn.Module):
    """Text tokens (width dim) attend to visual tokens (width dim_visual) under the per-image mask."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, dim_head: int, masking: str):
        super().__init__()
        self.heads = heads
        self.masking = masking
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def keys_values(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual (b, m, l, dv) -> k, v (b, h, m*l, dh). Depends only on the media, so a
        prompt's K/V are computed once and reused at every decoding step."""
        k, v = self.to_kv(rearrange(visual, "b m l d -> b (m l) d")).chunk(2, dim=-1)
        return tuple(rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (k, v))

    def forward(self, y: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], phi: torch.Tensor,
                num_images: int) -> torch.Tensor:
        """y (b, t, d), phi (b, t) -> (b, t, d); zero where phi = 0."""
        k, v = kv
        q = rearrange(self.to_q(self.norm(y)), "b t (h d) -> b h t d", h=self.heads)
        mask = cross_attention_mask(phi, num_images, k.shape[2] // num_images, self.masking)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (b, h, t, dh)
        out = self.to_out(rearrange(out, "b h t d -> b t (h d)"))
        return out * (phi > 0).unsqueeze(-1).to(out.dtype)


class GatedXAttnDense(nn.Module):
    def __init__(self, *, dim: int, dim_visual: int, config: XAttnConfig):
        super().__init__()
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, heads=config.heads,
                                         dim_head=config.dim_head, masking=config.masking)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, config.ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, y: torch.Tensor, visual: torch.Tensor | None, phi: torch.Tensor | None,
                kv_cache: dict | None = None) -> torch.Tensor:
        """y (b, t, d) LM hidden states, visual (b, m, l, dv) or None, phi (b, t) -> (b, t, d).

        kv_cache, a dict that lives as long as one call's media, keeps this block's visual K/V
        so that decoding steps after the first reuse them.
        """
        if visual is not None:
            kv = None if kv_cache is None else kv_cache.get(self)
            if kv is None:
                kv = self.attn.keys_values(visual)
                if kv_cache is not None:
                    kv_cache[self] = kv
            y = y + self.attn_gate.tanh() * self.attn(y, kv, phi, visual.shape[1])
        return y + self.ff_gate.tanh() * self.ff(y)
