"""GATED XATTN-DENSE (paper §2.2): the only new layers inside the frozen LM.

    y = y + tanh(a_attn) * xattn(q=y, kv=visual)
    y = y + tanh(a_ffw)  * ffw(y)

Both gates start at 0 (one value each, or one per hidden unit), so before training the model
*is* the frozen LM. Norms, the ff and q/k norms are options: OpenFlamingo's block by default,
IDEFICS's (RMSNorm, SwiGLU, RMSNorm on q and k, vector gates) when configured so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import XAttnConfig
from .masking import cross_attention_mask
from .norms import RMSNorm, make_norm
from .resampler import feed_forward


class VisualKV:
    """One block's cross-attention keys and values for one call's media, computed per image on
    first use and kept for the call: a prompt's images are projected once, at prefill, and only
    those some token attends to (the query's image alone when the demonstrations come from a
    prefix cache)."""

    def __init__(self, attn: "MaskedCrossAttention", visual: torch.Tensor):
        self.attn, self.visual = attn, visual  # visual (bv, m, l, dv)
        self.k = self.v = None  # (bv, m, h, l, dh), allocated at the first projection, in its dtype
        self.done = torch.zeros(visual.shape[:2], dtype=torch.bool, device=visual.device)

    def get(self, rows: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows, images (n,) (0-based image index) -> k, v (n, h, l, dh)."""
        need = ~self.done[rows, images]
        if need.any():
            m = self.done.shape[1]
            pairs = torch.unique(rows[need] * m + images[need])
            r, i = pairs // m, pairs % m
            k, v = (rearrange(t, "n l (h d) -> n h l d", h=self.attn.heads)
                    for t in self.attn.to_kv(self.visual[r, i]).chunk(2, dim=-1))
            if self.attn.k_norm is not None:  # before caching: the kept keys are reused as they are
                k = self.attn.k_norm(k)
            if self.k is None:
                self.k, self.v = (t.new_empty(*self.done.shape, *t.shape[1:]) for t in (k, v))
            if torch.is_grad_enabled():  # out of place: autograd sees every write
                self.k, self.v = self.k.index_put((r, i), k), self.v.index_put((r, i), v)
            else:
                self.k[r, i], self.v[r, i] = k, v
            self.done[r, i] = True
        return self.k[rows, images], self.v[rows, images]


class MaskedCrossAttention(nn.Module):
    """Text tokens (width dim) attend to visual tokens (width dim_visual) under the per-image mask."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, dim_head: int, masking: str,
                 norm: str = "layernorm", eps: float = 1e-5, qk_norm: bool = False):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.masking = masking
        inner = heads * dim_head
        self.norm = make_norm(norm, dim, eps)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        # Absent, not identities, when off: a checkpoint without them keeps its key names.
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(dim_head, eps), RMSNorm(dim_head, eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, y: torch.Tensor, kv: VisualKV, phi: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """y (b, t, d), phi (b, t), rows (b,) each sequence's row of the media -> (b, t, d); zero where phi = 0."""
        q = rearrange(self.to_q(self.norm(y)), "b t (h d) -> b t h d", h=self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        attend = self._own_image if self.masking == "last_image" else self._masked
        return self.to_out(rearrange(attend(q, kv, phi, rows), "b t h d -> b t (h d)"))

    def _own_image(self, q, kv: VisualKV, phi, rows):
        """Each token against its own image's l keys only, not all m * l keys masked: tokens are
        grouped by (sequence, image), the groups padded to one length and attended in one call."""
        b, t, h, dh = q.shape
        m = kv.done.shape[1]
        if bool((phi[:, :1] > 0).all() and (phi == phi[:, :1]).all()):
            # Each sequence's tokens share one image (a decoding step, a query after its <image>):
            # the sequences are the groups, with no sorting or padding.
            k, v = kv.get(rows, phi[:, 0] - 1)  # (b, h, l, dh)
            return F.scaled_dot_product_attention(q.transpose(1, 2), k, v).transpose(1, 2)
        flat = phi.flatten()
        tokens = (flat > 0).nonzero().squeeze(1)
        out = q.new_zeros(b * t, h, dh)  # phi = 0: no cross-attention output
        if tokens.numel() == 0:
            return out.view(b, t, h, dh)
        key = (tokens // t) * (m + 1) + flat[tokens]  # (sequence, image) of each token
        key, order = torch.sort(key, stable=True)
        tokens = tokens[order]
        groups, counts = torch.unique_consecutive(key, return_counts=True)
        group = torch.repeat_interleave(torch.arange(len(groups), device=q.device), counts)
        offset = torch.arange(len(tokens), device=q.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        grouped = q.new_zeros(len(groups), int(counts.max()), h, dh)  # padding queries are computed, then dropped
        grouped[group, offset] = q.reshape(b * t, h, dh)[tokens]
        k, v = kv.get(rows[groups // (m + 1)], groups % (m + 1) - 1)  # (g, h, l, dh)
        attended = F.scaled_dot_product_attention(grouped.transpose(1, 2), k, v).transpose(1, 2)
        out = out.index_put((tokens,), attended[group, offset])
        return out.view(b, t, h, dh)

    def _masked(self, q, kv: VisualKV, phi, rows):
        """Tokens attend to every image up to their own: all m * l keys under a mask."""
        b = q.shape[0]
        m = kv.done.shape[1]
        images = torch.arange(m, device=q.device)
        k, v = (rearrange(x, "(b m) h l d -> b h (m l) d", b=b)
                for x in kv.get(rows.repeat_interleave(m), images.repeat(b)))
        mask = cross_attention_mask(phi, m, k.shape[2] // m, self.masking)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask).transpose(1, 2)
        return out * (phi > 0)[..., None, None].to(out.dtype)


class SwiGLU(nn.Module):
    """norm -> down(silu(gate(x)) * up(x)), no biases: LLaMA's MLP, the dense layer of IDEFICS's blocks."""

    def __init__(self, dim: int, hidden: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class GatedXAttnDense(nn.Module):
    def __init__(self, *, dim: int, dim_visual: int, config: XAttnConfig):
        super().__init__()
        c = config
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, heads=c.heads, dim_head=c.dim_head,
                                         masking=c.masking, norm=c.norm, eps=c.norm_eps, qk_norm=c.qk_norm)
        gate = (1,) if c.gate == "scalar" else (dim,)  # (dim,) broadcasts over (b, t, dim): tanh per unit
        self.attn_gate = nn.Parameter(torch.zeros(gate))
        hidden = dim * c.ff_mult if c.ff_dim is None else c.ff_dim
        norm = make_norm(c.norm, dim, c.norm_eps)
        self.ff = feed_forward(dim, hidden, "gelu", norm) if c.ff == "gelu" else SwiGLU(dim, hidden, norm)
        self.ff_gate = nn.Parameter(torch.zeros(gate))

    def forward(self, y: torch.Tensor, visual: torch.Tensor | None, phi: torch.Tensor | None,
                rows: torch.Tensor | None = None, kv_cache: dict | None = None) -> torch.Tensor:
        """y (b, t, d) LM hidden states, visual (bv, m, l, dv) or None, phi (b, t) -> (b, t, d).

        rows (b,) picks each sequence's row of visual (default: its own, or row 0 when bv is 1).
        kv_cache, a dict that lives as long as one call's media, keeps this block's visual K/V
        so that decoding steps after the first reuse them.
        """
        if visual is not None:
            kv = None if kv_cache is None else kv_cache.get(self)
            if kv is None:
                kv = VisualKV(self.attn, visual)
                if kv_cache is not None:
                    kv_cache[self] = kv
            if rows is None:
                rows = torch.arange(y.shape[0], device=y.device) if visual.shape[0] > 1 else y.new_zeros(
                    y.shape[0], dtype=torch.long)
            y = y + self.attn_gate.tanh() * self.attn(y, kv, phi, rows)
        return y + self.ff_gate.tanh() * self.ff(y)
