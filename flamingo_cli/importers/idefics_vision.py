"""IDEFICS's vision tower (a copy of transformers' CLIPVisionTransformer) as a timm ViT: the timm
options that rebuild it, its weights in timm's names, and its image processor's pixels.

IDEFICS feeds its perceiver the last block's output with CLS and before the final norm, so the
encoder keeps CLS and skips timm's final norm; its processor squashes each image to the input size.
"""
from __future__ import annotations

import re

from ..errors import CheckpointError
from ..model.config import EncoderConfig

PREFIX = "model.vision_model."
# The released models' tower (ViT-H/14 at 224); smaller configs override its sizes through kwargs.
TIMM_NAME = "vit_huge_patch14_clip_224"
TIMM_DEFAULTS = {"img_size": 224, "patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 4.0}
# IdeficsImageProcessor's defaults: OpenAI's mean and std, a bicubic resize straight to the input size,
# transparent pixels composited on white (its convert_to_rgb).
IDEFICS_PREPROCESS = {"crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bicubic",
                      "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                      "background": [255, 255, 255]}
ACTIVATIONS = {"gelu": None, "quick_gelu": "quick_gelu"}  # None: timm's default, exact GELU as HF's "gelu"


def idefics_encoder(vision, processor: dict | None, source: str) -> EncoderConfig:
    """The timm ViT that computes what IdeficsVisionTransformer computes, from its config
    (an IdeficsVisionConfig) and, where the checkpoint has one, its preprocessor_config.json."""
    if vision.hidden_act not in ACTIVATIONS:
        raise CheckpointError(f"{source}: vision_config.hidden_act {vision.hidden_act!r} has no timm counterpart "
                              f"(supported: {', '.join(ACTIVATIONS)})")
    if abs(vision.layer_norm_eps - 1e-5) > 1e-12 or vision.num_channels != 3:
        raise CheckpointError(f"{source}: vision_config layer_norm_eps {vision.layer_norm_eps} and num_channels "
                              f"{vision.num_channels} must be 1e-5 and 3 (the timm tower's)")
    sizes = {"img_size": vision.image_size, "patch_size": vision.patch_size, "embed_dim": vision.embed_dim,
             "depth": vision.num_hidden_layers, "num_heads": vision.num_attention_heads,
             "mlp_ratio": vision.intermediate_size / vision.embed_dim}
    kwargs = {k: v for k, v in sizes.items() if v != TIMM_DEFAULTS[k]}
    if ACTIVATIONS[vision.hidden_act]:
        kwargs["act_layer"] = ACTIVATIONS[vision.hidden_act]
    kwargs["num_classes"] = 0  # no classifier head: strict loading would miss its weights
    preprocess = dict(IDEFICS_PREPROCESS)
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
        if processor and processor.get(theirs):
            preprocess[ours] = list(processor[theirs])
    return EncoderConfig(name=TIMM_NAME, kwargs=kwargs, keep_cls=True, final_norm=False, preprocess=preprocess)


def vision_sources(timm_key: str) -> list[str] | None:
    """The file's tensors a timm key is made of (several: concatenated), None for a key IDEFICS has no
    counterpart of."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding.weight",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight"}
    if timm_key in fixed:
        return [PREFIX + fixed[timm_key]]
    if m := re.fullmatch(r"(norm_pre|norm)\.(weight|bias)", timm_key):
        return [PREFIX + f"{'pre_layrnorm' if m[1] == 'norm_pre' else 'post_layernorm'}.{m[2]}"]
    if not (m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", timm_key)):
        return None
    layer, part, kind = PREFIX + f"encoder.layers.{m[1]}.", m[2], m[3]
    if part == "attn.qkv":
        return [layer + f"self_attn.{x}_proj.{kind}" for x in "qkv"]
    theirs = {"attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}.get(part)
    return None if theirs is None else [layer + f"{theirs}.{kind}"]


def leading_axes(timm_key: str) -> int:
    """How many size-1 axes timm's tensor has in front of IDEFICS's (CLS and positions are batched)."""
    return {"cls_token": 2, "pos_embed": 1}.get(timm_key, 0)
