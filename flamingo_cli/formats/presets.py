"""YAML presets shipped in stages/<stage>/<name>.yaml (installed as flamingo_cli.stages)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import FlamingoError


def _stages_root() -> Path:
    try:
        return Path(str(resources.files("flamingo_cli.stages")))
    except (ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[2] / "stages"


def preset_names(stage: str) -> list[str]:
    folder = _stages_root() / stage
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_path(stage: str, name_or_file: str) -> Path:
    """A preset by name (stages/<stage>/<name>.yaml) or an explicit YAML file path."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FlamingoError(f"{name_or_file}: no such file")
        return path
    found = _stages_root() / stage / f"{name_or_file}.yaml"
    if not found.is_file():
        names = ", ".join(preset_names(stage)) or "none"
        raise FlamingoError(f"{name_or_file}: unknown {stage} preset (available: {names})")
    return found
