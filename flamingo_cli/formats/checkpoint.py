"""The checkpoint directory: what `--ckpt DIR` means everywhere.

    DIR/config.yaml          FlamingoConfig: encoder, LM, resampler, xattn, special tokens
    DIR/model.safetensors    the trainable weights only (resampler, xattn blocks, new token rows)
    DIR/lm/                  optional: the frozen LM and tokenizer, for a self-contained checkpoint
    DIR/encoder.safetensors  optional: the frozen vision encoder's weights
    DIR/lm_overrides.safetensors  optional: LM weights (by the LM's own names) replacing the loaded ones

Relative paths in config.yaml resolve against DIR. This module is the only one that
reads or writes these files; the model itself never touches the filesystem.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..model.config import EncoderConfig, FlamingoConfig, LMConfig
from ..model.flamingo import Flamingo
from ..model.vision_encoder import VisionEncoder
from .artifacts import cache_dir, default_umask, digest_file, signals_deferred, storage_failure
from .hub import is_hub_id, is_repo_name, pretrained_weights_hint, snapshot, weights_file

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
LM_DIR = "lm"
ENCODER_FILE = "encoder.safetensors"
LM_OVERRIDES_FILE = "lm_overrides.safetensors"
# Package data trained by examples/toy, by --ckpt name: the default (images), the video model.
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "default_model"
BUNDLED = {"toy": BUNDLED_CHECKPOINT, "toy-video": BUNDLED_CHECKPOINT.with_name("video_model")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve(path: str, base: Path | None) -> str:
    p = Path(path).expanduser()
    if base is not None and not p.is_absolute() and (base / p).exists():
        return str(base / p)
    return str(p)


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or a torch pickle loaded with weights_only=True (never arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e)) or re.search(r"WeightsUnpickler error: \s*(.+)", str(e))
        raise CheckpointError(f"{path}: refusing to unpickle: not a plain file of tensors (weights_only=True"
                              + (f": {found.group(1).strip()}" if found else "") + ")") from None
    except Exception as e:  # corrupt files raise many types; all mean the same to the user
        raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError naming the missing, unexpected or mis-shaped keys."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != tuple(found[k].shape))
    if missing:
        problems.append("missing " + listing(missing))
    if unexpected:
        problems.append("unexpected " + listing(unexpected))
    if shapes:
        problems.append("wrong shape " + listing(
            [f"{k} (file {list(found[k].shape)}, model {list(expected[k].shape)})" for k in shapes]))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def listing(items: list[str], limit: int = 6) -> str:
    """Names for a one-line error: the first few, and how many more."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"


def load_encoder(config: EncoderConfig, base: Path | None = None) -> VisionEncoder:
    import timm

    pretrained = config.pretrained and not config.weights
    try:
        model = timm.create_model(config.name, pretrained=pretrained, **config.kwargs)
    except Exception as e:
        hint = f" ({pretrained_weights_hint(config.name)})" if pretrained else ""
        raise ConfigError(f"encoder {config.name!r}: {str(e).splitlines()[0]}{hint}") from None
    if config.weights:
        path = _resolve(config.weights, base)
        path = weights_file(path) if is_repo_name(path) else path
        state = timm_layout(read_state_file(path), model)
        check_state_dict(model.state_dict(), state, path)
        model.load_state_dict(state)
    return VisionEncoder(config, model)


def timm_layout(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Encoder weights in timm's names. An open_clip CLIP state dict (OpenAI's ViT-L/14 as
    OpenFlamingo uses it, with or without its text tower, or its `visual` module alone) is
    converted by timm's own converter; other layouts pass through for the strict check."""
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if not isinstance(model, VisionTransformer):
        return state
    if "class_embedding" in state and "conv1.weight" in state:  # the visual module's own state dict
        state = {f"visual.{k}": v for k, v in state.items()}
    if "visual.class_embedding" not in state:
        return state
    return checkpoint_filter_fn(state, model)


def encoder_identity(config: EncoderConfig, base: Path | None = None) -> str:
    """Names the features an encoder makes: its timm name, options and weights, hashed.
    Tensor files carry it, so a checkpoint can refuse features from another encoder."""
    spec = {k: v for k, v in config.__dict__.items() if k not in ("weights", "random_init")}  # provenance only
    if not spec["preprocess"]:
        del spec["preprocess"]  # identities from before the field existed stay the same
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    if config.weights:
        h.update(digest_file(_resolve(config.weights, base)).encode())
    else:
        h.update(b"timm-pretrained" if config.pretrained else b"random-init")
    return f"{config.name}@{h.hexdigest()[:16]}"


def checkpoint_identity(directory: str | Path) -> str:
    """Names the visual tokens a checkpoint's resampler makes: its trainable weights, hashed."""
    return digest_file(Path(directory) / WEIGHTS_FILE)[:16]


def load_lm(config: LMConfig, base: Path | None = None, device_map: str | dict | None = None):
    """The frozen LM and its tokenizer, from a local directory or a hub repo id (at lm.revision), placed
    across devices by a transformers device_map ("auto", ..., or {module name: device, "cpu", "disk"})."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not config.path:
        raise ConfigError("lm.path is empty: give a local LM directory or a hub id")
    path = _resolve(config.path, base)
    if is_hub_id(path):  # its snapshot in the hub cache, fetched when online
        path = str(snapshot(path, config.revision, required=("config.json",), what="LM "))
    elif not Path(path).is_dir():
        raise CheckpointError(f"LM {path}: {'not a directory' if Path(path).exists() else 'no such directory'}")
    # transformers raises whatever its parts raise (OSError, ValueError, hub validation errors): a bad LM dir.
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"LM {path}: cannot load its tokenizer ({_first_line(e)})") from None
    placement = _placement(device_map)
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[config.dtype], **placement)
    except Exception as e:
        raise CheckpointError(f"LM {path}: cannot load the model ({_first_line(e)})") from None
    return lm, tokenizer


def _placement(device_map: str | dict | None) -> dict:
    """from_pretrained's arguments for a device map, with a folder of this process's own for
    what it offloads to disk (removed at exit)."""
    if device_map is None:
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("a device map needs accelerate, which transformers places the LM with: "
                          "pip install accelerate") from None
    import atexit

    (cache_dir() / "offload").mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(dir=cache_dir() / "offload")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return {"device_map": device_map, "offload_folder": folder}


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else type(e).__name__)
    return text[:200]


def build_model(config: FlamingoConfig, base: Path | None = None, *, with_encoder: bool = True,
                initialise: bool = True, device_map: str | dict | None = None) -> Flamingo:
    """A Flamingo with freshly initialised trainable parts around the LM and encoder config names.
    initialise=False leaves the trainable parts' memory as allocated, for a checkpoint to fill:
    drawing a large model's new weights only to overwrite them costs seconds at every start.
    With a device_map (see load_lm) the blocks follow the LM's layers onto their devices."""
    encoder = load_encoder(config.encoder, base) if with_encoder else None
    if encoder is not None and encoder.dim != config.resampler.dim:
        raise CheckpointError(
            f"encoder {config.encoder.name} gives {encoder.dim}-wide features but resampler.dim is {config.resampler.dim}"
        )
    lm, tokenizer = load_lm(config.lm, base, device_map)
    overrides = read_lm_overrides(base) if base is not None else {}
    apply_lm_overrides(lm, overrides, str(Path(base or ".") / LM_OVERRIDES_FILE))
    from transformers.initialization import no_init_weights

    with contextlib.nullcontext() if initialise else no_init_weights():
        model = Flamingo(config, lm, tokenizer, encoder)
    if device_map is not None:
        model.follow_lm_devices()
    model.lm_overrides = overrides
    return model


def read_lm_overrides(directory: Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / LM_OVERRIDES_FILE
    return read_state_file(path) if path.is_file() else {}


def apply_lm_overrides(lm: torch.nn.Module, overrides: dict[str, torch.Tensor], source: str) -> None:
    """Replace LM weights by name, strictly: every name must be one of the LM's, with its shape."""
    if not overrides:
        return
    own = lm.state_dict(keep_vars=True)
    unknown = sorted(k for k in overrides if k not in own)
    shapes = sorted(k for k in overrides if k in own and own[k].shape != overrides[k].shape)
    problems = []
    if unknown:
        problems.append("not weights of this LM: " + listing(unknown))
    if shapes:
        problems.append("wrong shape " + listing(shapes))
    offloaded = sorted(k for k in overrides if k in own and own[k].device.type == "meta")
    if offloaded:
        problems.append("offloaded to disk by the device map, so they cannot be replaced " + listing(offloaded))
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in overrides.items():
            own[name].copy_(tensor)


def new_model(config: FlamingoConfig, *, seed: int = 0) -> Flamingo:
    """An untrained model for `flamingo init`: the resampler's width follows the encoder."""
    encoder = load_encoder(config.encoder)
    config = FlamingoConfig.from_dict(config.to_dict())
    config.resampler.dim = encoder.dim
    lm, tokenizer = load_lm(config.lm)
    torch.manual_seed(seed)
    return Flamingo(config, lm, tokenizer, encoder)


def read_config(directory: str | Path) -> FlamingoConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a checkpoint directory (no {CONFIG_FILE})")
    try:
        return FlamingoConfig.from_yaml(path.read_text())
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def checkpoint_path(name: str | Path, revision: str | None = None) -> Path:
    """A directory, a bundled model's name (where no directory has it), or a hub repo's snapshot at revision."""
    if str(name) in BUNDLED and not Path(name).exists():
        return BUNDLED[str(name)]
    return snapshot(str(name), revision, required=(CONFIG_FILE,)) if is_hub_id(str(name)) else Path(name)


def load_checkpoint(directory: str | Path, *, with_encoder: bool = True, lm_dtype: str | None = None,
                    device_map: str | dict | None = None, revision: str | None = None) -> Flamingo:
    """Load a checkpoint directory (or hub repo id, at revision). Names and shapes are checked
    strictly: anything missing, unexpected or mis-shaped is one CheckpointError. lm_dtype
    replaces the config's lm.dtype: the LM's weights are loaded in it. device_map: see load_lm."""
    directory = checkpoint_path(directory, revision)
    config = read_config(directory)
    if lm_dtype is not None:
        config = dataclasses.replace(config, lm=dataclasses.replace(config.lm, dtype=lm_dtype))
    model = build_model(config, directory, with_encoder=with_encoder, initialise=False,  # every tensor is loaded
                        device_map=device_map)
    model.source_dir = directory
    model.encoder_id = encoder_identity(config.encoder, directory)
    weights = directory / WEIGHTS_FILE
    state = read_state_file(weights)
    expected = model.trainable_state_dict()
    check_state_dict(expected, state, str(weights))
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])
    model.checkpoint_id = checkpoint_identity(directory)
    return model


def load_checkpoint_encoder(directory: str | Path, revision: str | None = None) -> tuple[VisionEncoder, str]:
    """Only the frozen encoder of a checkpoint, with its identity: all `flamingo encode` needs."""
    directory = checkpoint_path(directory, revision)
    config = read_config(directory)
    return load_encoder(config.encoder, directory), encoder_identity(config.encoder, directory)


def save_checkpoint(model: Flamingo, directory: str | Path, *, embed_lm: bool = False,
                    embed_encoder: bool = False, extra: dict[str, bytes] | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint directory atomically: a temp dir beside it, then a rename.

    embed_lm copies the LM directory in (lm/) and embed_encoder stores the encoder's
    weights, so the checkpoint runs on a machine that has neither. Parts embedded in the
    checkpoint the model was loaded from stay embedded. `extra` files (e.g. a trainer's
    state) are written into the same directory, inside the same atomic rename. `weights`
    replaces the model's trainable state dict (e.g. gathered from FSDP shards).
    """
    from safetensors.torch import save_file

    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = FlamingoConfig.from_dict(model.config.to_dict())
    base = getattr(model, "source_dir", None)
    embedded = [p for p in (directory, base) if p is not None]
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot write the checkpoint ({e.strerror})") from None
    try:
        weights = model.trainable_state_dict() if weights is None else weights
        state = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
        save_file(state, str(tmp / WEIGHTS_FILE))

        lm_source = Path(_resolve(config.lm.path, base)).absolute()
        if embed_lm or _inside(lm_source, embedded):
            if not lm_source.is_dir():
                raise CheckpointError(f"cannot embed the LM: {config.lm.path} is not a local directory")
            shutil.copytree(lm_source, tmp / LM_DIR)
            config.lm.path, config.lm.revision = LM_DIR, None
        elif lm_source.exists():
            config.lm.path = str(lm_source)

        weights = Path(_resolve(config.encoder.weights, base)).absolute() if config.encoder.weights else None
        if embed_encoder or (weights is not None and _inside(weights, embedded)):
            if weights is not None:
                shutil.copyfile(weights, tmp / ENCODER_FILE)
            elif model.encoder is not None:
                save_file({k: v.contiguous() for k, v in model.encoder.model.state_dict().items()},
                          str(tmp / ENCODER_FILE))
            else:
                raise CheckpointError("cannot embed a randomly initialised encoder that was not loaded")
            config.encoder.weights = ENCODER_FILE
        elif weights is not None:
            config.encoder.weights = str(weights)

        overrides = getattr(model, "lm_overrides", None)
        if overrides:
            save_file({k: v.detach().contiguous().cpu() for k, v in overrides.items()}, str(tmp / LM_OVERRIDES_FILE))
        (tmp / CONFIG_FILE).write_text(config.to_yaml())
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
        _default_permissions(tmp)
        _replace_dir(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = storage_failure(e)
        if reason is not None:
            raise CheckpointError(f"{directory}: cannot write the checkpoint ({reason})") from None
        raise
    return directory


def _default_permissions(root: Path) -> None:
    """mkdtemp makes a private 0700 directory; the checkpoint should get the usual umask modes."""
    umask = default_umask()
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _inside(path: Path, directories: list[Path]) -> bool:
    return any(path == d or d in path.parents for d in (Path(d).absolute() for d in directories))


def _replace_dir(new: Path, target: Path) -> None:
    # Signals wait until it is done: between the renames there is no checkpoint at `target`,
    # and an interrupted clean-up would leave the old one behind.
    with signals_deferred():
        if not target.exists():
            os.rename(new, target)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rename(target, old / "x")
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
