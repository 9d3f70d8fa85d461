"""OpenFlamingo checkpoints, mapped strictly onto ours.

OpenFlamingo's training (`filter_state_dict_to_trainable`) saves the trainable tensors of its
patched model, plus every tensor whose name contains "embed", under these names:

    perceiver.latents, perceiver.layers.{k}.{0,1}.*, perceiver.norm.*   -> resampler.*
    lang_encoder.<layers>.{i}.gated_cross_attn_layer.*                  -> xattn.{i}.*
      (older files: lang_encoder.gated_cross_attn_layers.{i}.*)
    lang_encoder.<input embeddings>.weight   the LM's rows, then <|endofchunk|>, <image>, [<PAD>]
    lang_encoder.<positions / output head>   frozen LM weights it carries along (OPT, MPT, GPT-NeoX)

Every tensor is either consumed, or recognised as a frozen LM (or vision encoder) weight and
checked equal to the one we load; anything else is an error, as is anything missing or
mis-shaped. OpenFlamingo's own loader uses strict=False, so its mistakes pass silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..errors import CheckpointError
from ..formats.checkpoint import listing, load_encoder, load_lm, read_state_file, timm_layout
from ..model.config import FlamingoConfig
from ..model.flamingo import Flamingo
from ..model.lm import decoder_layers, xattn_layer_indices
from .clip_towers import match_openflamingo_preprocessing

XATTN_KEY = re.compile(
    r"^lang_encoder\.(?:(?P<path>.+)\.(?P<layer>\d+)\.gated_cross_attn_layer"
    r"|gated_cross_attn_layers\.(?P<alias>\d+))\.(?P<param>.+)$"
)
PERCEIVER_LAYER_KEY = re.compile(r"^perceiver\.layers\.(\d+)\.")
# Heads of OpenFlamingo's perceiver and cross-attention: fixed in its code, not visible in shapes.
HEADS, DIM_HEAD = 8, 64
# The released checkpoints (each repo's checkpoint.pt) and the preset that describes each. The 3B
# ones name MosaicGPT, which no transformers class implements: their import fails at the LM, saying so.
RELEASED = {
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b": "openflamingo-3b",
    "openflamingo/OpenFlamingo-3B-vitl-mpt1b-langinstruct": "openflamingo-3b",
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b": "openflamingo-4b",
    "openflamingo/OpenFlamingo-4B-vitl-rpj3b-langinstruct": "openflamingo-4b",
    "openflamingo/OpenFlamingo-9B-vitl-mpt7b": "openflamingo-9b",
}
CHECKPOINT_FILE = "checkpoint.pt"


def unwrap(state: dict, source: str) -> dict[str, torch.Tensor]:
    """The tensors of an OpenFlamingo file: inside a `model_state_dict` wrapper (training
    checkpoints) or not, with DDP's `module.` prefix or not."""
    if isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        name = key.removeprefix("module.")
        if name in out:
            raise CheckpointError(f"{source}: {key} appears both with and without the module. prefix")
        out[name] = value
    return out


@dataclass
class Layout:
    """What an OpenFlamingo file says about the model that wrote it."""
    vis_dim: int
    depth: int
    num_latents: int
    ff_mult: int
    xattn_layers: list[int]

    @property
    def every(self) -> int:
        return self.xattn_layers[0] + 1


def read_layout(state: dict[str, torch.Tensor], source: str) -> Layout:
    latents = state.get("perceiver.latents")
    if latents is None or latents.ndim != 2:
        raise CheckpointError(f"{source}: no perceiver.latents: not an OpenFlamingo checkpoint")
    depth = 1 + max((int(m.group(1)) for k in state if (m := PERCEIVER_LAYER_KEY.match(k))), default=-1)
    ff = state.get("perceiver.layers.0.1.1.weight")
    layers = sorted({int(m["layer"] or m["alias"]) for k in state if (m := XATTN_KEY.match(k))})
    if depth == 0 or ff is None:
        raise CheckpointError(f"{source}: no perceiver layers: not an OpenFlamingo checkpoint")
    if not layers:
        raise CheckpointError(f"{source}: no gated cross-attention layers: not an OpenFlamingo checkpoint")
    n, dim = latents.shape
    return Layout(vis_dim=dim, depth=depth, num_latents=n, ff_mult=ff.shape[0] // dim, xattn_layers=layers)


def openflamingo_config(layout: Layout, preset: FlamingoConfig, source: str) -> FlamingoConfig:
    """The preset's encoder and LM with the architecture the file holds. A preset that
    disagrees with the file (another model size's, say) is an error, not a silent override."""
    config = FlamingoConfig.from_dict(preset.to_dict())
    r, x = config.resampler, config.xattn
    found = {"resampler.dim": layout.vis_dim, "resampler.depth": layout.depth,
             "resampler.num_latents": layout.num_latents, "resampler.ff_mult": layout.ff_mult,
             "xattn.every": layout.every}
    wanted = {"resampler.dim": r.dim, "resampler.depth": r.depth, "resampler.num_latents": r.num_latents,
              "resampler.ff_mult": r.ff_mult, "xattn.every": x.every}
    clashes = [f"{k} {wanted[k]} (file: {v})" for k, v in found.items() if wanted[k] != v]
    if clashes:
        raise CheckpointError(f"{source}: the preset does not describe this checkpoint: " + ", ".join(clashes))
    r.heads, r.dim_head, r.max_frames, r.activation = HEADS, DIM_HEAD, 0, "gelu"
    x.heads, x.dim_head, x.placement, x.masking = HEADS, DIM_HEAD, "openflamingo", "last_image"
    x.ff_mult = 4
    return config


@dataclass
class Report:
    """What an import did with each tensor of the file."""
    consumed: dict[str, str] = field(default_factory=dict)  # file key -> our key
    checked: list[str] = field(default_factory=list)  # frozen weights the file carries, found equal
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        summary = (f"{len(self.consumed)} tensors imported, {len(self.checked)} frozen LM/encoder tensors "
                   "checked equal to the ones loaded")
        return [summary, *self.notes]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal at the lower of the two precisions: an fp32 file matches an LM held in bf16."""
    low = a.dtype if torch.finfo(a.dtype).bits <= torch.finfo(b.dtype).bits else b.dtype
    return torch.equal(a.detach().to(low).cpu(), b.detach().to(low).cpu())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def load_openflamingo_state(model, lm_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                            source: str, *, take_lm_rows: bool = False) -> Report:
    """Copy an OpenFlamingo file's tensors into `model` (a Flamingo built from openflamingo_config).

    lm_state is the LM's own state dict, taken before the model wrapped the LM. Raises one
    CheckpointError naming every missing, unknown, mis-shaped or mismatching tensor.

    An embedding the file carries must hold the LM's own rows, unless take_lm_rows: then rows
    that differ (OpenFlamingo trains every row when FSDP runs without use_orig_params) replace
    the LM's, as OpenFlamingo's own loading does, and go to `model.lm_overrides`.
    """
    report = Report()
    targets = model.trainable_state_dict()
    layers = decoder_layers(model.lm)
    layers_path = next(name for name, m in model.lm.named_modules() if m is layers)
    emb_name = _param_name(lm_state, model.lm.get_input_embeddings().base.weight)
    head_name = _param_name(lm_state, model.lm.get_output_embeddings().base.weight, avoid=emb_name)
    tied = model.new_tokens.output is None
    rows = model.new_tokens
    n_tokens = model.lm.get_output_embeddings().vocab_size
    renames = _renamings(model.lm)
    rotary = {tuple(b.shape): b for name, b in model.lm.named_buffers() if name.endswith("rotary_emb.inv_freq")}

    unknown, wrong, differ = [], [], []
    filled: dict[str, torch.Tensor] = {}
    overrides: dict[str, torch.Tensor] = {}

    def fill(ours: str, key: str, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(targets[ours].shape):
            wrong.append(f"{key} (file {list(value.shape)}, model {list(targets[ours].shape)})")
        elif ours in filled and not torch.equal(filled[ours], value):
            differ.append(f"{key} (differs from its alias)")
        else:
            filled[ours] = value
            report.consumed[key] = ours

    def carried(key: str, value: torch.Tensor, ours: torch.Tensor, what: str) -> None:
        if tuple(value.shape) != tuple(ours.shape):
            wrong.append(f"{key} (file {list(value.shape)}, {what} {list(ours.shape)})")
        elif not _equal(value, ours):
            differ.append(f"{key} (max |diff| {_max_diff(value, ours):.3g} from the {what})")
        else:
            report.checked.append(key)

    def embedding_rows(key: str, value: torch.Tensor, name: str, new: str | None) -> None:
        """A resized embedding or head: the LM's rows, then the new tokens' rows."""
        base = lm_state[name]
        if value.ndim != 2 or value.shape[0] != n_tokens or value.shape[1] != base.shape[1]:
            wrong.append(f"{key} (file {list(value.shape)}, expected [{n_tokens}, {base.shape[1]}]: the LM's "
                         f"tokenizer plus OpenFlamingo's tokens; is --lm the LM this checkpoint was trained with?)")
            return
        first, end = rows.first_id, rows.first_id + rows.count
        kept = min(first, base.shape[0])
        own = [(0, kept), (end, min(n_tokens, base.shape[0]))]  # the LM's rows, around the new ones
        diffs = [(a, b) for a, b in own if a < b and not _equal(value[a:b], base[a:b])]
        if not diffs:
            report.checked.append(f"{key} (rows 0-{kept - 1})")
        elif take_lm_rows:
            override = base.detach().clone()
            for a, b in own:
                override[a:b] = value[a:b].to(override.dtype)
            overrides[name] = override
            gap = max(_max_diff(value[a:b], base[a:b]) for a, b in diffs)
            report.notes.append(f"{key}: the LM's own rows differ from {name} (max |diff| {gap:.3g}); "
                                "taken from the file, as OpenFlamingo's loading does")
        else:
            a, b = diffs[0]
            differ.append(f"{key} rows {a}-{b - 1} (max |diff| {_max_diff(value[a:b], base[a:b]):.3g} from the "
                          "LM's own: is --lm the LM this checkpoint was trained with? If it was trained with all "
                          "its rows, --take-lm-rows uses the file's)")
        if new is not None:
            fill(new, key, value[first:end])

    for key, value in state.items():
        if key.startswith("perceiver."):
            ours = "resampler." + key[len("perceiver."):]
            if ours in targets:
                fill(ours, key, value)
            else:
                unknown.append(key)
        elif m := XATTN_KEY.match(key):
            layer = m["layer"] or m["alias"]
            ours = f"xattn.{layer}.{m['param']}"
            if m["path"] is not None and m["path"] != layers_path:
                unknown.append(f"{key} (this LM's decoder layers are {layers_path})")
            elif ours in targets:
                fill(ours, key, value)
            elif f"xattn.{layer}.attn_gate" not in targets:
                unknown.append(f"{key} (no cross-attention before layer {layer} with xattn every "
                               f"{model.config.xattn.every}, placed where (i+1) % N == 0)")
            else:
                unknown.append(key)
        elif key.startswith("lang_encoder."):
            name = _lm_name(key[len("lang_encoder."):], layers_path, renames, lm_state)
            if name == emb_name:
                embedding_rows(key, value, name, "new_tokens.input")
            elif name == head_name and tied:
                carried(key, value, state.get(f"lang_encoder.{emb_name}", lm_state[name]), "input embeddings it is tied to")
            elif name == head_name:
                embedding_rows(key, value, name, "new_tokens.output")
            elif name in lm_state:
                carried(key, value, lm_state[name], "LM's own")
            elif name.endswith(".inv_freq") and (found := rotary.get(tuple(value.shape))) is not None:
                # Rotary frequencies: a constant older transformers saved in every layer, newer ones
                # compute once per model without saving. Same formula, so they must agree.
                if torch.allclose(value.float(), found.float(), rtol=1e-6, atol=0):
                    report.checked.append(key)
                else:
                    differ.append(f"{key} (rotary frequencies differ from the LM's own)")
            else:
                unknown.append(key)
        elif key.startswith("vision_encoder."):
            continue  # checked together below
        else:
            unknown.append(key)

    _check_vision(model, state, report, unknown, differ)
    missing = sorted(set(targets) - set(filled))
    if not tied and "new_tokens.output" in missing:
        # OpenFlamingo trains no output rows and saves none for an untied head: at load time
        # it draws them at random. Ours keep their init, the mean of the head's own rows.
        missing.remove("new_tokens.output")
        report.notes.append(f"{head_name}: the file has no rows for the new tokens (OpenFlamingo never saves "
                            "them for an untied head and draws them at random when it loads); "
                            "set to the mean of the head's own rows")
    problems = []
    if missing:
        problems.append("missing " + listing(_file_names(missing, layers_path)))
    if unknown:
        problems.append("unknown " + listing(sorted(unknown)))
    if wrong:
        problems.append("wrong shape " + listing(sorted(wrong)))
    if differ:
        problems.append("mismatch " + listing(sorted(differ)))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    with torch.no_grad():
        for ours, value in filled.items():
            targets[ours].copy_(value)
        for name, value in overrides.items():
            lm_state[name].copy_(value)
    model.lm_overrides = overrides
    return report


def _param_name(state: dict[str, torch.Tensor], tensor: torch.Tensor, avoid: str | None = None) -> str:
    for name, t in state.items():
        if t is tensor and name != avoid:
            return name
    raise CheckpointError("cannot find the LM's embeddings in its state dict")


def _lm_name(name: str, layers_path: str, renames: list[tuple[str, str]], lm_state: dict) -> str:
    """An LM weight's name in OpenFlamingo's patched model -> its name in the plain LM: decoder
    layers are wrapped (`.{i}.decoder_layer.`) and also kept as `old_decoder_blocks`; and the
    names of the transformers version OpenFlamingo pins become today's."""
    name = re.sub(r"\.(\d+)\.decoder_layer\.", r".\1.", name)
    name = re.sub(r"^old_decoder_blocks\.", f"{layers_path}.", name)
    if name not in lm_state:
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
    return name


def _renamings(lm) -> list[tuple[str, str]]:
    """transformers' own renames from a model class's older weight names to its current ones
    (GPT-NeoX's embed_out is lm_head since transformers 5), without its generic legacy ones."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers from before these renames: the names are still the old ones
        return []
    return [(src, dst) for t in get_model_conversion_mapping(lm, add_legacy=False) if isinstance(t, WeightRenaming)
            for src, dst in zip(t.source_patterns, t.target_patterns)]


def _file_names(ours: list[str], layers_path: str) -> list[str]:
    """Our missing keys, named as the file should have had them."""
    out = []
    for key in ours:
        if key.startswith("resampler."):
            out.append("perceiver." + key[len("resampler."):])
        elif m := re.match(r"xattn\.(\d+)\.(.+)", key):
            out.append(f"lang_encoder.{layers_path}.{m[1]}.gated_cross_attn_layer.{m[2]}")
        else:
            out.append(f"{key} (the new tokens' input embedding rows)")
    return out


def _check_vision(model, state: dict[str, torch.Tensor], report: Report, unknown: list, differ: list) -> None:
    """A full (unfiltered) state dict also carries the open_clip vision tower: it must be the
    encoder we load, compared in timm's layout."""
    keys = sorted(k for k in state if k.startswith("vision_encoder."))
    if not keys:
        return
    if model.encoder is None:
        unknown.extend(keys)
        return
    converted = timm_layout({"visual." + k[len("vision_encoder."):]: state[k] for k in keys}, model.encoder.model)
    ours = model.encoder.model.state_dict()
    bad = sorted(k for k in converted if k not in ours or converted[k].shape != ours[k].shape
                 or not _equal(converted[k], ours[k]))
    if bad:
        differ.append(f"vision_encoder.* ({listing(bad)} differ from the encoder loaded)")
    else:
        report.checked.extend(keys)


def import_openflamingo(path: str, preset: FlamingoConfig, *, check_preset: bool = True,
                        take_lm_rows: bool = False):
    """Read an OpenFlamingo checkpoint (torch.load with weights_only=True: tensors, never code)
    and return (our Flamingo model holding its weights, Report).

    The architecture comes from the file; the preset supplies the encoder and the LM, and when
    check_preset is set, any architecture field of the preset the file contradicts is an error.
    The perceiver's width is the encoder's, and the encoder gets OpenFlamingo's preprocessing
    (said in the report where timm's differs).
    """
    source = str(path)
    state = unwrap(read_state_file(path), source)
    layout = read_layout(state, source)
    preset = FlamingoConfig.from_dict(preset.to_dict())
    encoder = load_encoder(preset.encoder)
    if encoder.dim != layout.vis_dim:
        raise CheckpointError(f"{source}: the perceiver takes {layout.vis_dim}-wide features but encoder "
                              f"{preset.encoder.name} gives {encoder.dim}-wide ones")
    preprocessing = match_openflamingo_preprocessing(encoder)
    preset.resampler.dim = encoder.dim
    if not check_preset:
        preset.resampler.depth = layout.depth
        preset.resampler.num_latents, preset.resampler.ff_mult = layout.num_latents, layout.ff_mult
        preset.xattn.every = layout.every
    config = openflamingo_config(layout, preset, source)
    config.encoder = encoder.config
    lm, tokenizer = load_lm(config.lm)
    lm_state = lm.state_dict(keep_vars=True)
    n_layers = len(decoder_layers(lm))
    placed = xattn_layer_indices(n_layers, layout.every, "openflamingo")
    if layout.xattn_layers != placed:
        raise CheckpointError(
            f"{source}: cross-attention before LM layers {_ranges(layout.xattn_layers)}, but a {n_layers}-layer LM "
            f"with xattn every {layout.every} has it before layers {_ranges(placed)}: is --lm the right LM?")
    model = Flamingo(config, lm, tokenizer, encoder)
    report = load_openflamingo_state(model, lm_state, state, source, take_lm_rows=take_lm_rows)
    architecture = (f"xattn every {layout.every} (before LM layers {_ranges(layout.xattn_layers)}), "
                    f"perceiver depth {layout.depth} with {layout.num_latents} latents of width {layout.vis_dim}")
    report.notes[:0] = [architecture, *preprocessing]
    return model, report


def _ranges(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) if len(indices) <= 6 else f"{', '.join(map(str, indices[:3]))}, ..., {indices[-1]}"
