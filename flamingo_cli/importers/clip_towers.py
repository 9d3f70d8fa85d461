"""CLIP towers through timm as OpenFlamingo runs them: which timm options reproduce its
encoder, its preprocessing where timm's configuration differs, and the image embedding its
RICES ranks demonstrations by (open_clip's encode_image)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..model.config import EncoderConfig
from ..model.vision_encoder import VisionEncoder

# open_clip's evaluation transform, which OpenFlamingo runs for its CLIP towers: the short side
# resized to the input size (bicubic), a centre crop of it, OpenAI's mean and std. timm's configs
# for some of the same towers crop less (crop_pct 0.9: ViT-B/32 resizes to 248, then crops 224).
OPENFLAMINGO_PREPROCESS = {"crop_pct": 1.0, "crop_mode": "center", "interpolation": "bicubic",
                           "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


def openflamingo_encoder(name: str) -> EncoderConfig:
    """A timm CLIP tower as OpenFlamingo runs it: patch tokens before the final norm, CLS
    dropped, QuickGELU where the weights are OpenAI's, and pretrained weights for a tagged name."""
    quick_gelu = name.endswith(".openai") and "quickgelu" not in name
    return EncoderConfig(name=name, kwargs={"act_layer": "quick_gelu"} if quick_gelu else {},
                         pretrained="." in name, keep_cls=False, final_norm=False)


def match_openflamingo_preprocessing(encoder) -> list[str]:
    """Give the encoder OpenFlamingo's preprocessing where timm's differs, so it sees the pixels
    the checkpoint was trained on; what changed, as report lines."""
    timm_config = encoder.data_config()
    changed = {k: v for k, v in OPENFLAMINGO_PREPROCESS.items() if _differs(timm_config.get(k), v)}
    if not changed:
        return []
    encoder.config.preprocess = {**encoder.config.preprocess, **changed}
    size = timm_config["input_size"][-1]
    what = ", ".join(f"{k} {_short_value(timm_config.get(k))} -> {_short_value(v)}" for k, v in changed.items())
    line = f"warning: encoder {encoder.config.name}'s timm preprocessing differs from OpenFlamingo's ({what})"
    if "crop_pct" in changed:
        line += (f": timm resizes to {int(size / timm_config['crop_pct'])} and crops {size}, OpenFlamingo resizes "
                 f"to {size}")
    return [line + "; the checkpoint uses OpenFlamingo's"]


def _differs(a, b) -> bool:
    if isinstance(b, list):
        return a is None or len(a) != len(b) or any(abs(x - y) > 1e-6 for x, y in zip(a, b))
    return a != b


def _short_value(v) -> str:
    return "(" + ", ".join(f"{x:.3f}" for x in v) + ")" if isinstance(v, (list, tuple)) else str(v)


# OpenFlamingo's RICES names its tower as open_clip does (--rices_vision_encoder_path ViT-L-14,
# --rices_vision_encoder_pretrained openai); timm names OpenAI's towers so.
OPEN_CLIP_OPENAI = {"ViT-B-32": "vit_base_patch32_clip_224.openai", "ViT-B-16": "vit_base_patch16_clip_224.openai",
                    "ViT-L-14": "vit_large_patch14_clip_224.openai",
                    "ViT-L-14-336": "vit_large_patch14_clip_336.openai"}
RICES_TOWER = OPEN_CLIP_OPENAI["ViT-L-14"]


class ClipEmbedding(torch.nn.Module):
    """A CLIP image tower's embedding, as open_clip's encode_image computes it: the CLS token
    after ln_post, times the projection. timm's CLIP ViTs hold ln_post as the final norm and the
    projection as the head (open_clip's `proj`, transposed, with a zero bias), pooling the CLS
    token between them, so the tower's own forward is that embedding. Frozen, in float32."""

    def __init__(self, encoder: VisionEncoder, identity: str):
        super().__init__()
        self.encoder, self.identity = encoder, identity

    def transform(self):
        """open_clip's evaluation transform (see OPENFLAMINGO_PREPROCESS), as a timm transform."""
        return self.encoder.transform()

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (n, 3, H, W) -> embeddings (n, dim)."""
        return self.encoder.model(pixels.float())


def embedding_config(name: str, weights: str | None = None) -> EncoderConfig:
    """The tower `encode --embedding NAME` runs: a timm CLIP tower as OpenFlamingo runs one
    (QuickGELU for OpenAI's weights), with timm's pretrained weights for a tagged name or those of
    `weights` (a file in open_clip's or timm's layout, or a hub repo of one)."""
    import timm

    if not timm.is_model(name):
        hint = f"; open_clip's {name} (openai) is timm's {OPEN_CLIP_OPENAI[name]}" if name in OPEN_CLIP_OPENAI else ""
        raise ConfigError(f"--embedding {name}: not a timm model (e.g. {RICES_TOWER}, OpenFlamingo's RICES "
                          f"tower{hint})")
    config = openflamingo_encoder(name)
    if "." in name:
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError as e:
            raise ConfigError(f"--embedding {name}: {e}") from None
    config.weights = weights
    return config


def load_clip_embedding(config: EncoderConfig, base: Path | None = None) -> ClipEmbedding:
    """The embedding tower of `config` (relative weights found from `base`), with open_clip's
    preprocessing and its identity: the encoder identity of the config as run (name, options,
    preprocessing, weights). A tower without weights is refused: it would rank at random, and
    random towers share one identity, so their embeddings would share cache entries."""
    from ..formats.checkpoint import encoder_identity, load_encoder
    from ..formats.hub import is_repo_name, weights_file

    if not (config.pretrained or config.weights):
        raise ConfigError(f"--embedding {config.name}: no weights (random ones would rank at random): name a "
                          f"pretrained tag (e.g. {RICES_TOWER}) or give --embedding-weights FILE")
    if config.weights and is_repo_name(config.weights):
        config.weights = weights_file(config.weights)
    try:
        encoder = load_encoder(config, base)
    except ConfigError as e:  # its hint names init's and import's option for a local file
        raise ConfigError(str(e).replace("--encoder-weights", "--embedding-weights")) from None
    match_openflamingo_preprocessing(encoder)
    return ClipEmbedding(encoder, encoder_identity(encoder.config, base)).eval()
