"""Per-image cross-attention masking (paper §2.3).

phi(l) is the 1-based index of the last <image> at or before text position l, or 0
when no image precedes it. Token l cross-attends only to image phi(l)'s visual
tokens; earlier images reach it only through the LM's own self-attention. Tokens
with phi = 0 get no cross-attention output at all.

Optionally (IDEFICS) a reset token, the LM's end-of-sequence, ends a document: the
tokens after it attend to no image until the next <image>.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def image_index(input_ids: torch.Tensor, image_token_id: int, images_before: torch.Tensor | None = None,
                next_image: torch.Tensor | None = None, reset_token_id: int | None = None) -> torch.Tensor:
    """phi for each token of input_ids (b, t) -> (b, t) long.

    images_before (b,) counts the images in an already-processed prefix (KV-cached decoding).
    next_image (b,) bool selects, per sequence, the paper's training-time alternative
    (p_next): text attends to the next image instead, an <image> still to its own, and
    text after the last image to none.
    reset_token_id: after this token, text attends to no image until the next <image>; the
    token itself keeps its image. With next_image the rule is mirrored (as IDEFICS's processor
    does): text before the token, and the token, attend to no image after it.
    With images_before, only resets within input_ids are seen: a prefix that ends in one (after
    the reset token, no <image> since) is a state images_before cannot express; images_before 0
    gives it while input_ids hold no <image>.
    """
    is_image = (input_ids == image_token_id).long()
    count = is_image.cumsum(dim=1)  # images at or before each position
    phi = count
    if next_image is not None:
        next_image = next_image.to(phi.device).unsqueeze(1)
        upcoming = count - is_image + 1  # the first image at or after each position
        upcoming = torch.where(upcoming <= count[:, -1:], upcoming, 0)
        phi = torch.where(next_image, upcoming, phi)
    if images_before is not None:
        if next_image is not None:
            raise ValueError("next_image is for whole training sequences, not cached continuations")
        phi = phi + images_before.to(phi.device).unsqueeze(1)
    if reset_token_id is not None:
        resets = input_ids == reset_token_id
        cut = _reset_since(resets, count)
        if next_image is not None:
            cut = torch.where(next_image, _reset_until(resets, is_image), cut)
        phi = phi.masked_fill(cut, 0)
    return phi


def _reset_since(resets: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(b, t) bool: a reset token comes earlier, with no image since."""
    at = torch.where(resets, count, -1).cummax(dim=1).values  # count at the latest reset at or before
    at = F.pad(at[:, :-1], (1, 0), value=-1)  # strictly before: the reset token keeps its own image
    return count == at


def _reset_until(resets: torch.Tensor, is_image: torch.Tensor) -> torch.Tensor:
    """(b, t) bool: a reset token comes here or later, with no image before it."""
    ahead = is_image.flip(1).cumsum(dim=1).flip(1)  # images at or after each position
    at = torch.where(resets, ahead, -1).flip(1).cummax(dim=1).values.flip(1)  # ahead at the nearest reset
    return ahead == at


def cross_attention_mask(phi: torch.Tensor, num_images: int, tokens_per_image: int, mode: str = "last_image") -> torch.Tensor:
    """Which visual tokens each text token may attend to: (b, t) -> bool (b, 1, t, num_images * tokens_per_image).

    Rows with phi = 0 are all True so attention stays finite; the caller zeroes their output.
    """
    key_image = torch.arange(1, num_images + 1, device=phi.device).repeat_interleave(tokens_per_image)
    phi = phi.unsqueeze(-1)  # (b, t, 1)
    allowed = key_image == phi if mode == "last_image" else key_image <= phi
    allowed = allowed | (phi == 0)
    return allowed.unsqueeze(1)
