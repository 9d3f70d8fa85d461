"""Configuration dataclasses: what a checkpoint directory's config.yaml holds.

Every field has a default, so a YAML file only needs the fields that differ.
`to_dict` / `from_dict` round-trip exactly and reject unknown keys, so a typo in a
preset is an error rather than a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"


@dataclass
class EncoderConfig:
    name: str = "vit_large_patch14_clip_224.openai"  # any timm model name
    weights: str | None = None  # local weights file (.safetensors or torch; timm or open_clip layout)
    pretrained: bool = False  # with no weights file: timm's own pretrained weights (downloaded; needs a network)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (img_size, depth, ...)
    keep_cls: bool = False  # keep the prefix (CLS/register) tokens; OpenFlamingo drops them
    final_norm: bool = False  # tokens after the final norm; OpenFlamingo's weights saw them *before* it
    image_size: int | None = None  # input resolution; None = timm's data config (or a ViT's img_size)
    random_init: bool = False  # weights drawn at random on purpose (tests, toy runs): the checkpoint says so
    # Overrides of timm's preprocessing (crop_pct, interpolation, mean, std): pixels as the
    # weights were trained on them, where that was another codebase's transform (OpenFlamingo's).
    preprocess: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResamplerConfig:
    dim: int = 1024  # width of the vision features, and of the visual tokens
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64  # visual tokens per image or video
    ff_mult: int = 4
    max_frames: int = 8  # learned temporal embeddings; more frames at inference are interpolated; 0 = none
    activation: str = "gelu"  # "gelu" (OpenFlamingo), "sqrelu" (the paper's squared ReLU) or "relu" (IDEFICS)
    qk_norm: bool = False  # LayerNorm (with bias) on each head's queries and keys before attention (IDEFICS)


@dataclass
class XAttnConfig:
    every: int = 1  # a GATED XATTN-DENSE block before every N-th LM layer
    placement: str = "paper"  # "paper": layers 0, N, 2N, ...; "openflamingo": layers where (i+1) % N == 0
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    masking: str = "last_image"  # "last_image" (the paper) or "all_previous" (ablation)
    # The fields below default to OpenFlamingo's block. IDEFICS's: norm="rmsnorm", norm_eps=its rms_norm_eps,
    # qk_norm=its qk_layer_norms, ff="swiglu", ff_dim=its intermediate_size, gate="vector" or "scalar" (its
    # alpha_type "vector" or "float"), reset_after_eos=True.
    norm: str = "layernorm"  # "layernorm" (with bias) or "rmsnorm" (weight only, LLaMA's) before attention and ff
    norm_eps: float = 1e-5  # of every norm in the block (1e-5 is LayerNorm's default)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before attention
    ff: str = "gelu"  # "gelu": Linear -> GELU -> Linear; "swiglu": down(silu(gate(x)) * up(x)), LLaMA's MLP
    ff_dim: int | None = None  # the ff's hidden width; None = the LM's hidden size * ff_mult
    gate: str = "scalar"  # tanh gates of one value per block ("scalar") or one per hidden unit ("vector")
    # After the LM's end-of-sequence token, text attends to no image until the next <image>
    # (the end-of-sequence token itself keeps its own): IDEFICS's processor does this.
    reset_after_eos: bool = False


@dataclass
class LMConfig:
    path: str = ""  # local directory (relative paths resolve against the checkpoint dir) or hub id
    revision: str | None = None
    dtype: str = "float32"  # dtype the frozen LM is held in: float32, bfloat16 or float16


@dataclass
class FlamingoConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # Tokens added to the LM's tokenizer, in id order. "<PAD>" is added too when the
    # tokenizer has no pad token, as OpenFlamingo does.
    special_tokens: list[str] = field(default_factory=lambda: [END_OF_CHUNK_TOKEN, IMAGE_TOKEN])
    # The token that ends a chunk of text: generation stops at it, scoring's continuations end with it,
    # and prompts written with <|endofchunk|> get it in its place. A model trained without one of its own
    # (IDEFICS) names a token its tokenizer already has, so no row without trained weights is added.
    end_of_chunk_token: str = END_OF_CHUNK_TOKEN
    # What each <image> of a prompt is written as, holding <image> once; None: <image> alone. Where one
    # image directly follows another and the markup ends as it begins, that text is written once between
    # them. IDEFICS's processor writes "<fake_token_around_image><image><fake_token_around_image>".
    image_markup: str | None = None

    def validate(self) -> None:
        if self.xattn.every < 1:
            raise ConfigError(f"xattn.every must be >= 1, got {self.xattn.every}")
        if self.xattn.placement not in ("paper", "openflamingo"):
            raise ConfigError(f"xattn.placement must be 'paper' or 'openflamingo', got {self.xattn.placement!r}")
        if self.xattn.masking not in ("last_image", "all_previous"):
            raise ConfigError(f"xattn.masking must be 'last_image' or 'all_previous', got {self.xattn.masking!r}")
        if self.xattn.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"xattn.norm must be 'layernorm' or 'rmsnorm', got {self.xattn.norm!r}")
        eps = self.xattn.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            # YAML reads 1e-6 (no dot) as text, hence the hint.
            raise ConfigError(f"xattn.norm_eps must be a number > 0 (in YAML write 1.0e-6, not 1e-6), got {eps!r}")
        if self.xattn.ff not in ("gelu", "swiglu"):
            raise ConfigError(f"xattn.ff must be 'gelu' or 'swiglu', got {self.xattn.ff!r}")
        if self.xattn.ff_dim is not None and self.xattn.ff_dim < 1:
            raise ConfigError(f"xattn.ff_dim must be >= 1 or null (the LM's hidden size * ff_mult), "
                              f"got {self.xattn.ff_dim}")
        if self.xattn.gate not in ("scalar", "vector"):
            raise ConfigError(f"xattn.gate must be 'scalar' or 'vector', got {self.xattn.gate!r}")
        for name in ("qk_norm", "reset_after_eos"):
            if not isinstance(getattr(self.xattn, name), bool):
                raise ConfigError(f"xattn.{name} must be true or false, got {getattr(self.xattn, name)!r}")
        if self.resampler.activation not in ("gelu", "sqrelu", "relu"):
            raise ConfigError(f"resampler.activation must be 'gelu', 'sqrelu' or 'relu', "
                              f"got {self.resampler.activation!r}")
        if not isinstance(self.resampler.qk_norm, bool):
            raise ConfigError(f"resampler.qk_norm must be true or false, got {self.resampler.qk_norm!r}")
        if self.lm.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"lm.dtype must be float32, bfloat16 or float16, got {self.lm.dtype!r}")
        # Our own end-of-chunk token has to be added; another one is the LM's (checked when the model is built).
        for tok in (IMAGE_TOKEN, END_OF_CHUNK_TOKEN) if self.end_of_chunk_token == END_OF_CHUNK_TOKEN else (IMAGE_TOKEN,):
            if tok not in self.special_tokens:
                raise ConfigError(f"special_tokens must include {tok!r}")
        if not isinstance(self.end_of_chunk_token, str) or not self.end_of_chunk_token:
            raise ConfigError(f"end_of_chunk_token must be a token, got {self.end_of_chunk_token!r}")
        markup = self.image_markup
        if markup is not None and (not isinstance(markup, str) or markup.count(IMAGE_TOKEN) != 1):
            raise ConfigError(f"image_markup must be text holding {IMAGE_TOKEN} once, or null, got {markup!r}")

    def model_text(self, text: str) -> str:
        """Prompt text written with our markers (<image>, <|endofchunk|>) as this model was trained to
        read it: its end-of-chunk token, and each image in its markup. Unchanged by default. Training
        samples (training.sampling) write their images and chunk ends through it too."""
        if self.end_of_chunk_token != END_OF_CHUNK_TOKEN:
            text = text.replace(END_OF_CHUNK_TOKEN, self.end_of_chunk_token)
        if self.image_markup is None:
            return text
        before, after = self.image_markup.split(IMAGE_TOKEN)
        text = text.replace(IMAGE_TOKEN, self.image_markup)
        # Adjacent images share what lies between them, as IDEFICS's processor shares its fake token.
        return text.replace(after + before + IMAGE_TOKEN, after + IMAGE_TOKEN) if after == before else text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FlamingoConfig":
        config = _from_dict(cls, data, "config")
        config.validate()
        return config

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "FlamingoConfig":
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {e}".splitlines()[0]) from None
        return cls.from_dict(data)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = _from_dict(hint, value, f"{where}.{name}")
        values[name] = value
    return cls(**values)
