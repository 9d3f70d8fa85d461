"""The frozen vision encoder: any timm model, returning token features.

Output is (batch, frames, tokens, dim): a ViT's patch tokens (optionally with its
prefix/CLS tokens), or a CNN's final-stage grid flattened to tokens, as the paper
does with NFNet-F6. Videos are encoded frame by frame.
"""
from __future__ import annotations

import inspect
from functools import partial

import torch
from einops import rearrange
from torch import nn

from .config import EncoderConfig


class VisionEncoder(nn.Module):
    def __init__(self, config: EncoderConfig, model: nn.Module):
        super().__init__()
        self.config = config
        self.model = model.eval().requires_grad_(False)
        self._is_token_model = "return_prefix_tokens" in inspect.signature(model.forward_intermediates).parameters
        if config.keep_cls and not self._is_token_model:
            raise ValueError(f"encoder {config.name} has no prefix/CLS tokens to keep")

    @property
    def dim(self) -> int:
        """Width of each returned token."""
        if self._is_token_model:
            return self.model.embed_dim
        return self.model.feature_info[-1]["num_chs"]

    def data_config(self) -> dict:
        """timm's own preprocessing for this model (input size, interpolation, crop, mean and std),
        with the config's overrides."""
        import timm.data

        ours = {k: v for k, v in self.config.preprocess.items() if k != "background"}  # to_rgb's, not timm's
        config = {**timm.data.resolve_data_config({}, model=self.model), **ours}
        # timm's pretrained config keeps the default resolution when a ViT is built with another img_size.
        size = self.config.image_size or getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if size is not None:
            h, w = (size, size) if isinstance(size, int) else size
            config["input_size"] = (3, h, w)
        return config

    def transform(self):
        """A callable turning a PIL image (any mode) into a normalised (3, H, W) tensor."""
        import timm.data

        background = self.config.preprocess.get("background")
        return partial(_rgb_then, timm.data.create_transform(**self.data_config(), is_training=False),
                       tuple(background) if background else None)

    def train(self, mode: bool = True) -> "VisionEncoder":
        # Frozen: normalisation statistics and dropout never switch to training behaviour.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (b, 3, h, w) or (b, f, 3, h, w) -> tokens (b, f, n, d)."""
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(1)
        b = pixels.shape[0]
        frames = rearrange(pixels, "b f c h w -> (b f) c h w")
        if self._is_token_model:
            (out,) = self.model.forward_intermediates(
                frames, indices=1, norm=self.config.final_norm, output_fmt="NLC",
                intermediates_only=True, return_prefix_tokens=True,
            )
            # timm returns (patches, prefix) only when the model has prefix tokens.
            patches, prefix = out if isinstance(out, tuple) else (out, out[:, :0])
            tokens = torch.cat([prefix, patches], dim=1) if self.config.keep_cls else patches
        else:
            (grid,) = self.model.forward_intermediates(
                frames, indices=1, norm=self.config.final_norm, intermediates_only=True,
            )
            tokens = rearrange(grid, "bf d h w -> bf (h w) d")
        return rearrange(tokens, "(b f) n d -> b f n d", b=b)


def to_rgb(image, background: tuple[int, int, int] | None = None):
    """An RGB PIL image. Transparent pixels are composited on `background` where the weights were
    trained so (IDEFICS: white); without one, alpha is dropped, as open_clip's convert("RGB") does."""
    if image.mode == "RGB":
        return image
    if background is None or not ("A" in image.getbands() or "transparency" in image.info):
        return image.convert("RGB")
    from PIL import Image

    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")


def _rgb_then(transform, background, image):
    return transform(to_rgb(image, background))
