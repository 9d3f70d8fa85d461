"""The Perceiver Resampler (paper §2.1, App. A.1.1).

A fixed set of learned latents cross-attends to the vision features of one image or
video, so every medium becomes the same number of visual tokens however many
patches or frames it has.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .config import ResamplerConfig


class SquaredReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) ** 2


ACTIVATIONS = {"gelu": nn.GELU, "sqrelu": SquaredReLU, "relu": nn.ReLU}


def feed_forward(dim: int, hidden: int, activation: str = "gelu", norm: nn.Module | None = None) -> nn.Sequential:
    """norm -> Linear -> activation -> Linear, no biases (the layout OpenFlamingo's weights use);
    the norm is LayerNorm(dim) unless another is given."""
    return nn.Sequential(
        nn.LayerNorm(dim) if norm is None else norm,
        nn.Linear(dim, hidden, bias=False),
        ACTIVATIONS[activation](),
        nn.Linear(hidden, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to concat(features, latents): unlike the original Perceiver, the
    latents also see themselves, which the paper found slightly better."""

    def __init__(self, *, dim: int, heads: int, dim_head: int, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # Absent, not identities, when off: a checkpoint without them keeps its key names.
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(dim_head), nn.LayerNorm(dim_head)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (b, n, d) features, latents (b, l, d) -> (b, l, d)."""
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, h, l, d)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class PerceiverResampler(nn.Module):
    def __init__(self, config: ResamplerConfig):
        super().__init__()
        c = config
        self.config = config
        self.latents = nn.Parameter(torch.randn(c.num_latents, c.dim))
        # Temporal embeddings only: the paper adds no spatial position encodings, the
        # vision encoder's features already carry position. A standard normal start, as
        # OpenFlamingo's and flamingo-pytorch's: from zeros, frames begin alike and telling their
        # order apart is learned about half as fast (examples/toy/time_embeddings.py).
        self.time_embs = nn.Parameter(torch.randn(c.max_frames, c.dim)) if c.max_frames > 0 else None
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim=c.dim, heads=c.heads, dim_head=c.dim_head, qk_norm=c.qk_norm),
                feed_forward(c.dim, c.dim * c.ff_mult, c.activation),
            ])
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)

    def time_embeddings(self, frames: int) -> torch.Tensor:
        """(frames, d). Longer videos than trained for get linearly interpolated embeddings (paper App. B.1.2)."""
        embs = self.time_embs
        if frames == embs.shape[0]:
            return embs
        if frames < embs.shape[0]:
            return embs[:frames]
        stretched = F.interpolate(rearrange(embs, "f d -> 1 d f"), size=frames, mode="linear", align_corners=True)
        return rearrange(stretched, "1 d f -> f d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (b, f, n, d) features of b media with f frames -> (b, num_latents, d) visual tokens.

        Also accepts (b, m, f, n, d), b sequences of m media each -> (b, m, num_latents, d).
        """
        if x.ndim == 5:
            b = x.shape[0]
            return rearrange(self(rearrange(x, "b m f n d -> (b m) f n d")), "(b m) l d -> b m l d", b=b)
        if x.ndim != 4 or x.shape[-1] != self.config.dim:
            raise ValueError(
                f"resampler expects features (batch, frames, tokens, {self.config.dim}), got {tuple(x.shape)}"
            )
        if self.time_embs is not None:
            x = x + rearrange(self.time_embeddings(x.shape[1]), "f d -> f 1 d")
        x = rearrange(x, "b f n d -> b (f n) d")
        latents = repeat(self.latents, "l d -> b l d", b=x.shape[0])
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm(latents)
