"""IDEFICS checkpoints (transformers' IdeficsForVisionText2Text), mapped strictly onto ours.

An IDEFICS model is a LLaMA whose embedding and head carry `additional_vocab_size` extra rows
(its image tokens), a gated cross-attention block before every `cross_layer_interval`-th layer,
a perceiver and a CLIP ViT. Ours keeps the LM untouched, so the file becomes:

    model.layers.*, model.norm, model.embed_tokens.weight, lm_head.weight   -> a plain LlamaForCausalLM (lm/)
    model.embed_tokens.additional_embedding, lm_head.additional_fc         -> new_tokens.input / .output
    model.gated_cross_attn_layers.{j}.*                                    -> xattn.{j * interval}.*
    model.perceiver_resampler.*                                            -> resampler.*
    model.vision_model.*                                                   -> the encoder, in timm's layout

Every tensor of the file is used or checked; anything missing, unknown or mis-shaped is one error
naming it. The LM is written from the file itself, so a head trained away from LLaMA's is kept.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..formats.checkpoint import DTYPES, build_model, listing, read_state_file
from ..formats.hub import is_repo_name, snapshot
from ..model.config import END_OF_CHUNK_TOKEN, IMAGE_TOKEN, FlamingoConfig, ResamplerConfig, XAttnConfig
from ..model.flamingo import Flamingo
from .idefics_vision import idefics_encoder, leading_axes, vision_sources

FAKE_TOKEN = "<fake_token_around_image>"
# IDEFICS's instruct models end a turn with it; the others end a text with the LM's EOS.
END_OF_UTTERANCE = "<end_of_utterance>"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]  # config, weights, tokenizer
PERCEIVER = "model.perceiver_resampler."
BLOCKS = "model.gated_cross_attn_layers."
NEW_ROWS = {"new_tokens.input": "model.embed_tokens.additional_embedding.weight",
            "new_tokens.output": "lm_head.additional_fc.weight"}
# Ours within a block -> IDEFICS's within a gated cross-attention layer (several: concatenated).
BLOCK_NAMES = {"attn.norm.weight": ["input_layernorm.weight"], "attn.to_q.weight": ["cross_attn.q_proj.weight"],
               "attn.to_kv.weight": ["cross_attn.k_proj.weight", "cross_attn.v_proj.weight"],
               "attn.to_out.weight": ["cross_attn.o_proj.weight"],
               "attn.q_norm.weight": ["cross_attn.q_layer_norm.weight"],
               "attn.k_norm.weight": ["cross_attn.k_layer_norm.weight"],
               "attn_gate": ["alpha_cross_attn"], "ff_gate": ["alpha_dense"],
               "ff.norm.weight": ["post_attention_layernorm.weight"], "ff.gate.weight": ["mlp.gate_proj.weight"],
               "ff.up.weight": ["mlp.up_proj.weight"], "ff.down.weight": ["mlp.down_proj.weight"]}
# Ours within a perceiver layer -> IDEFICS's within its block.
PERCEIVER_NAMES = {"0.norm_media": ["0.context_layer_norm"], "0.norm_latents": ["0.latents_layer_norm"],
                   "0.to_q": ["0.q_proj"], "0.to_kv": ["0.k_proj", "0.v_proj"], "0.to_out": ["0.output_proj"],
                   "0.q_norm": ["0.q_layer_norm"], "0.k_norm": ["0.k_layer_norm"], "1.0": ["1.ln"],
                   "1.1": ["1.fc"], "1.3": ["1.c_proj"]}


def idefics_dir(name: str, revision: str | None = None) -> Path:
    """A local IDEFICS directory, or a hub repo id's snapshot (the cache only, offline)."""
    if is_repo_name(name):
        return snapshot(name, revision, required=("config.json",), patterns=WEIGHT_PATTERNS)
    folder = Path(name)
    if not folder.is_dir():
        raise CheckpointError(f"{name}: {'not a directory' if folder.exists() else 'no such directory'}")
    return folder


def read_config(folder: Path):
    """config.json as transformers reads it (its defaults for what older files leave out)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json: not a transformers checkpoint")
    raw = _json(path)
    if not isinstance(raw, dict) or raw.get("model_type") != "idefics":
        kind = raw.get("model_type") if isinstance(raw, dict) else None
        raise CheckpointError(f"{path}: model_type is {kind!r}, not 'idefics'")
    from transformers import IdeficsConfig

    return IdeficsConfig.from_dict(raw)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors or pytorch_model.bin, or of the shards their index lists."""
    for name in WEIGHTS:
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(_json(index)["weight_map"].values()))
            except (KeyError, AttributeError, TypeError):
                raise CheckpointError(f"{index}: not a weight index (no weight_map)") from None
            return {k: v for shard in shards for k, v in read_state_file(folder / shard).items()}
        if (folder / name).is_file():
            return read_state_file(folder / name)
    raise CheckpointError(f"{folder}: no weights ({', '.join(WEIGHTS)}, or their .index.json)")


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


@dataclass
class Tokens:
    """What the tokenizer says about the model's own tokens."""
    special: list[str]  # its extra rows' tokens, in id order
    end_of_chunk: str
    notes: list[str] = field(default_factory=list)


def read_tokens(tokenizer, vocab_size: int, extra: int, source: str) -> Tokens:
    """The tokens of the extra rows (ids vocab_size.. in order, <image> among them); a tokenizer id
    with no row in the file is an error, as IDEFICS itself could not embed it."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    beyond = sorted(t for i, t in by_id.items() if i >= vocab_size + extra)
    if beyond:
        raise CheckpointError(f"{source}: tokenizer tokens with no embedding row in the file "
                              f"(vocab_size {vocab_size} + additional_vocab_size {extra}): {listing(beyond)}")
    special = [by_id.get(i) for i in range(vocab_size, vocab_size + extra)]
    if None in special or IMAGE_TOKEN not in special:
        raise CheckpointError(f"{source}: the tokenizer's ids {vocab_size}-{vocab_size + extra - 1} (the extra "
                              f"rows) are {special}; IDEFICS's tokenizer holds {IMAGE_TOKEN} among them")
    notes = []
    if tokenizer.pad_token is None:  # a pad only fills masked positions: reuse a token rather than add a row
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        notes.append(f"the tokenizer has no pad token: {tokenizer.pad_token} pads")
    eoc = END_OF_UTTERANCE if END_OF_UTTERANCE in tokenizer.get_vocab() else tokenizer.eos_token
    if eoc is None:
        raise CheckpointError(f"{source}: the tokenizer has neither {END_OF_UTTERANCE} nor an end-of-sequence token")
    notes.append(f"{eoc} ends a chunk (IDEFICS has no {END_OF_CHUNK_TOKEN}): prompts' {END_OF_CHUNK_TOKEN} "
                 f"becomes it, generation stops at it")
    return Tokens(special=special, end_of_chunk=eoc, notes=notes)


def flamingo_config(hf, tokens: Tokens, processor: dict | None, source: str) -> FlamingoConfig:
    """Our config for the architecture an IdeficsConfig describes (the LM's path is set later)."""
    if not hf.use_resampler:
        raise CheckpointError(f"{source}: use_resampler is false (cross-attention over the raw vision tokens), "
                              "which our model has no counterpart of")
    every, layers = hf.cross_layer_interval, hf.num_hidden_layers
    if layers % every:
        raise CheckpointError(f"{source}: {layers} layers are not a multiple of cross_layer_interval {every}")
    if hf.hidden_act != "silu" or hf.alpha_type not in ("float", "vector"):
        raise CheckpointError(f"{source}: hidden_act {hf.hidden_act!r} and alpha_type {hf.alpha_type!r} must be "
                              "'silu' and 'float' or 'vector'")
    vision, perceiver = hf.vision_config, hf.perceiver_config
    resampler = ResamplerConfig(dim=vision.embed_dim, depth=perceiver.resampler_depth,
                                heads=perceiver.resampler_n_heads, dim_head=perceiver.resampler_head_dim,
                                num_latents=perceiver.resampler_n_latents, ff_mult=4, max_frames=0,
                                activation="relu", qk_norm=bool(perceiver.qk_layer_norms_perceiver))
    heads = hf.num_attention_heads
    xattn = XAttnConfig(every=every, placement="paper", heads=heads, dim_head=hf.hidden_size // heads,
                        masking="last_image", norm="rmsnorm", norm_eps=float(hf.rms_norm_eps),
                        qk_norm=bool(hf.qk_layer_norms), ff="swiglu", ff_dim=hf.intermediate_size,
                        gate="vector" if hf.alpha_type == "vector" else "scalar", reset_after_eos=True)
    markup = f"{FAKE_TOKEN}{IMAGE_TOKEN}{FAKE_TOKEN}" if FAKE_TOKEN in tokens.special else None
    return FlamingoConfig(encoder=idefics_encoder(vision, processor, source), resampler=resampler, xattn=xattn,
                          special_tokens=tokens.special, end_of_chunk_token=tokens.end_of_chunk, image_markup=markup)


def llama_config(hf, source: str):
    """The LM inside IDEFICS as a LlamaConfig: same names, no GQA, no biases, the default rope."""
    from transformers import LlamaConfig

    rope = dict(getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    if rope.get("rope_type", "default") != "default":
        raise CheckpointError(f"{source}: rope_type {rope['rope_type']!r}; IDEFICS's LM has the default rope")
    return LlamaConfig(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                       num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
                       num_key_value_heads=hf.num_attention_heads, hidden_act=hf.hidden_act,
                       rms_norm_eps=hf.rms_norm_eps, max_position_embeddings=hf.max_position_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": float(rope.get("rope_theta", 10000.0))},
                       tie_word_embeddings=hf.tie_word_embeddings, bos_token_id=hf.bos_token_id,
                       eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id)


def our_sources(key: str, every: int) -> list[str] | None:
    """The file's tensors one of our trainable tensors is made of; None: no IDEFICS counterpart."""
    if key in NEW_ROWS:
        return [NEW_ROWS[key]]
    if key == "resampler.latents":
        return [PERCEIVER + "latents"]
    if m := re.fullmatch(r"resampler\.norm\.(weight|bias)", key):
        return [PERCEIVER + f"layer_norm.{m[1]}"]
    if m := re.fullmatch(r"resampler\.layers\.(\d+)\.(\d\.\w+)\.(weight|bias)", key):
        names = PERCEIVER_NAMES.get(m[2])
        return names and [PERCEIVER + f"blocks.{m[1]}.{name}.{m[3]}" for name in names]
    if m := re.fullmatch(r"xattn\.(\d+)\.(.+)", key):
        names = BLOCK_NAMES.get(m[2])
        return names and [BLOCKS + f"{int(m[1]) // every}.{name}" for name in names]
    return None


@dataclass
class Plan:
    """Every target tensor and the file's tensors it is made of, checked before anything is written."""
    state: dict[str, torch.Tensor]
    source: str
    used: set = field(default_factory=set)
    missing: list = field(default_factory=list)
    wrong: list = field(default_factory=list)
    differ: list = field(default_factory=list)
    unmapped: list = field(default_factory=list)

    def take(self, targets: dict[str, torch.Tensor], sources, leading=lambda key: 0) -> dict[str, torch.Tensor]:
        """targets (name -> a tensor of the wanted shape, meta is fine) filled from the file:
        sources(name) lists the file keys, concatenated along dim 0; leading(name) size-1 axes are
        put in front of the file's tensor (where negative, that many of its own are dropped)."""
        out = {}
        for name, target in targets.items():
            keys = sources(name)
            if keys is None:
                self.unmapped.append(name)
                continue
            absent = [k for k in keys if k not in self.state]
            self.missing.extend(absent)
            self.used.update(keys)
            if absent:
                continue
            parts = [self.state[k] for k in keys]
            axes = leading(name)
            wanted = [1] * -axes + list(target.shape)[max(axes, 0):]  # each file tensor's shape
            if len(parts) > 1:
                wanted[0] //= len(parts)
            if any(list(p.shape) != wanted for p in parts):
                shapes = " + ".join(str(list(p.shape)) for p in parts)
                each = " each" if len(parts) > 1 else ""
                self.wrong.append(f"{'+'.join(keys)} (file {shapes}, expected {wanted}{each})")
                continue
            value = torch.cat(parts) if len(parts) > 1 else parts[0]
            out[name] = value.reshape(target.shape)
        return out

    def constants(self, expected: dict[str, torch.Tensor]) -> None:
        """Buffers older transformers saved (rotary frequencies, position ids): recomputed here, by
        the pattern their names end with, and checked equal."""
        for key, value in self.state.items():
            for pattern, constant in expected.items():
                if re.search(pattern, key):
                    self.used.add(key)
                    if value.shape != constant.shape or not torch.allclose(value.float(), constant, rtol=1e-6):
                        self.differ.append(f"{key} (a constant of the model, but not the one it computes)")

    def check(self) -> None:
        problems = []
        unknown = sorted(set(self.state) - self.used)
        if self.missing:
            problems.append("missing " + listing(sorted(set(self.missing))))
        if unknown:
            problems.append("unknown " + listing(unknown))
        if self.wrong:
            problems.append("wrong shape " + listing(sorted(self.wrong)))
        if self.differ:
            problems.append("mismatch " + listing(sorted(self.differ)))
        if self.unmapped:
            problems.append("no IDEFICS tensor for " + listing(sorted(self.unmapped)))
        if problems:
            raise CheckpointError(f"{self.source}: " + "; ".join(problems))


def _gate_axes(vector: bool):
    """IDEFICS stores a vector gate as (1, 1, H), ours is (H,); a float gate is (1,) in both."""
    return lambda key: -2 if vector and key.endswith("_gate") else 0


def _saved_constants(hf) -> dict[str, torch.Tensor]:
    dim = hf.hidden_size // hf.num_attention_heads
    theta = float((getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    v = hf.vision_config
    return {r"\.rotary_emb\.inv_freq$": 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim),
            r"^model\.vision_model\.embeddings\.position_ids$":
                torch.arange((v.image_size // v.patch_size) ** 2 + 1).float()[None]}


def _lm_targets(llama_cfg, tied: bool) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(llama_cfg)
    state = lm.state_dict()
    return {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}


def _vision_targets(encoder_config) -> dict[str, torch.Tensor]:
    import timm

    with torch.device("meta"):
        return timm.create_model(encoder_config.name, pretrained=False, **encoder_config.kwargs).state_dict()


def _trainable_targets(config: FlamingoConfig, llama_cfg, tokenizer) -> dict[str, torch.Tensor]:
    """The shapes our model's trainable tensors get, from a model built on the meta device."""
    import copy

    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = Flamingo(copy.deepcopy(config), LlamaForCausalLM(llama_cfg), copy.deepcopy(tokenizer))
    return model.trainable_state_dict()


@dataclass
class Report:
    """What an import did, as lines for stderr."""
    counts: dict[str, int]
    notes: list[str]

    def lines(self) -> list[str]:
        summary = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        return [f"{sum(self.counts.values())} tensors imported ({summary})", *self.notes]


def import_idefics(name: str, workdir: str | Path, *, revision: str | None = None, lm_dtype: str = "float32"):
    """Read an IDEFICS checkpoint (a directory, or a hub repo id's snapshot) and return
    (our Flamingo model holding its weights, Report).

    The LM (a LlamaForCausalLM with the IDEFICS tokenizer) and the encoder's weights in timm's
    layout are written under `workdir`, where the model loads them from; save_checkpoint with
    embed_lm and embed_encoder copies them into the checkpoint.
    """
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    if lm_dtype not in DTYPES:
        raise CheckpointError(f"lm dtype {lm_dtype!r}: choose {', '.join(DTYPES)}")
    folder = idefics_dir(name, revision)
    source = str(name)
    hf = read_config(folder)
    state = read_weights(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises what its parts raise; all of it is a bad tokenizer
        raise CheckpointError(f"{source}: cannot load its tokenizer ({str(e).splitlines()[0][:200]})") from None
    tokens = read_tokens(tokenizer, hf.vocab_size, hf.additional_vocab_size, source)
    processor_file = folder / "preprocessor_config.json"
    processor = _json(processor_file) if processor_file.is_file() else None
    if processor is not None and not isinstance(processor, dict):
        raise CheckpointError(f"{processor_file}: expected a JSON object")
    config = flamingo_config(hf, tokens, processor, source)
    llama_cfg = llama_config(hf, source)
    tied = bool(hf.tie_word_embeddings)

    plan = Plan(state, source)
    every = config.xattn.every
    lm_state = plan.take(_lm_targets(llama_cfg, tied), lambda k: [k])
    vision_state = plan.take(_vision_targets(config.encoder), vision_sources, leading_axes)
    ours = plan.take(_trainable_targets(config, llama_cfg, tokenizer), lambda k: our_sources(k, every),
                     _gate_axes(config.xattn.gate == "vector"))
    plan.constants(_saved_constants(hf))
    if tied:  # tied heads are not saved; where a file has them, they must be the embeddings
        for head, emb in (("lm_head.weight", "model.embed_tokens.weight"), (NEW_ROWS["new_tokens.output"],
                                                                            NEW_ROWS["new_tokens.input"])):
            if head in state:
                plan.used.add(head)
                if emb in state and not torch.equal(state[head], state[emb]):
                    plan.differ.append(f"{head} (tie_word_embeddings, but it differs from {emb})")
    plan.check()

    workdir = Path(workdir)
    with torch.device("meta"):
        lm = LlamaForCausalLM(llama_cfg)
    lm.load_state_dict(lm_state, strict=not tied, assign=True)
    if tied:
        lm.tie_weights()
    lm.save_pretrained(workdir / "lm")
    tokenizer.save_pretrained(workdir / "lm")
    save_file({k: v.contiguous() for k, v in vision_state.items()}, str(workdir / "encoder.safetensors"))
    config.lm.path, config.lm.dtype = str(workdir / "lm"), lm_dtype
    config.encoder.weights = str(workdir / "encoder.safetensors")

    model = build_model(config, initialise=False)  # every trainable tensor is filled below
    targets = model.trainable_state_dict()
    with torch.no_grad():
        for key, value in ours.items():
            targets[key].copy_(value)
    counts = {"LM": len(lm_state), "vision": len(vision_state), "perceiver, blocks and token rows": len(ours)}
    notes = [f"xattn every {every} (before LM layers 0, {every}, ...), perceiver depth {config.resampler.depth} "
             f"with {config.resampler.num_latents} latents of width {config.resampler.dim}; "
             f"the LM is written from the file into the checkpoint", *tokens.notes]
    return model, Report(counts=counts, notes=notes)
