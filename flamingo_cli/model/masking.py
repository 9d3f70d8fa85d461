"""Per-image cross-attention masking (paper §2.3).

phi(l) is the 1-based index of the last <image> at or before text position l, or 0
when no image precedes it. Token l cross-attends only to image phi(l)'s visual
tokens; earlier images reach it only through the LM's own self-attention. Tokens
with phi = 0 get no cross-attention output at all.
"""
from __future__ import annotations

import torch


def image_index(input_ids: torch.Tensor, image_token_id: int, images_before: torch.Tensor | None = None,
                next_image: torch.Tensor | None = None) -> torch.Tensor:
    """phi for each token of input_ids (b, t) -> (b, t) long.

    images_before (b,) counts the images in an already-processed prefix (KV-cached decoding).
    next_image (b,) bool selects, per sequence, the paper's training-time alternative
    (p_next): text attends to the next image instead, an <image> still to its own, and
    text after the last image to none.
    """
    is_image = (input_ids == image_token_id).long()
    phi = is_image.cumsum(dim=1)
    if next_image is not None:
        upcoming = phi - is_image + 1  # the first image at or after each position
        upcoming = torch.where(upcoming <= phi[:, -1:], upcoming, 0)
        phi = torch.where(next_image.to(phi.device).unsqueeze(1), upcoming, phi)
    if images_before is not None:
        if next_image is not None:
            raise ValueError("next_image is for whole training sequences, not cached continuations")
        phi = phi + images_before.to(phi.device).unsqueeze(1)
    return phi


def cross_attention_mask(phi: torch.Tensor, num_images: int, tokens_per_image: int, mode: str = "last_image") -> torch.Tensor:
    """Which visual tokens each text token may attend to: (b, t) -> bool (b, 1, t, num_images * tokens_per_image).

    Rows with phi = 0 are all True so attention stays finite; the caller zeroes their output.
    """
    key_image = torch.arange(1, num_images + 1, device=phi.device).repeat_interleave(tokens_per_image)
    phi = phi.unsqueeze(-1)  # (b, t, 1)
    allowed = key_image == phi if mode == "last_image" else key_image <= phi
    allowed = allowed | (phi == 0)
    return allowed.unsqueeze(1)
