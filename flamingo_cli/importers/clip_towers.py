"""CLIP towers through timm as OpenFlamingo runs them: which timm options reproduce its
encoder, and its preprocessing where timm's configuration differs."""
from __future__ import annotations

from ..model.config import EncoderConfig

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
