"""A checkpoint directory's model card, DIR/README.md: what the hub shows for a repo holding it.

Its front matter is the hub's metadata (library, tags, the LM as base model when that is a hub
repo); the body says what the model is made of, how to run it by repo id, its config.yaml, and
evaluation results when given (a Markdown table, as the sweep's results.md is)."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import CheckpointError
from .artifacts import atomic_path
from .checkpoint import CONFIG_FILE, read_config
from .hub import is_hub_id

CARD_FILE = "README.md"


def model_card(directory: str | Path, *, repo: str | None = None, results: str | None = None) -> str:
    """The card's text for the checkpoint in `directory`; `repo` is the id it will be pushed to."""
    directory = Path(directory)
    config = read_config(directory)
    name = repo or directory.resolve().name
    lm = config.lm.path
    meta = {"library_name": "flamingo-cli", "pipeline_tag": "image-text-to-text",
            "tags": ["flamingo", "few-shot", "vision-language"]}
    if is_hub_id(lm) and "/" in lm:
        meta["base_model"] = lm
    r, x = config.resampler, config.xattn
    lm_name = "its bundled LM (lm/)" if lm == "lm" else f"`{lm}`"
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
        f"A Flamingo model (Alayrac et al., 2022) for [flamingo-cli](https://pypi.org/project/flamingo-cli/): "
        f"the frozen vision encoder `{config.encoder.name}`, a Perceiver Resampler ({r.depth} layers, "
        f"{r.num_latents} visual tokens per image or video, {r.max_frames} temporal embeddings), and gated "
        f"cross-attention blocks every {x.every} layer(s) of the frozen LM {lm_name}.", "",
        "## Use", "", "```sh",
        f"flamingo encode imgs/ | flamingo generate --ckpt {name} --shots shots.jsonl",
        f"flamingo score --ckpt {name} --candidates classes.txt prompts.jsonl",
        "```", "", "```python", "from flamingo_cli import load", "",
        f'flamingo = load("{name}")',
        'flamingo.caption("cat.png", shots=[("dog.png", "a dog")])', "```", "",
        "## Configuration", "", f"`{CONFIG_FILE}`:", "", "```yaml",
        (directory / CONFIG_FILE).read_text(encoding="utf-8").strip(), "```",
    ]
    if results is not None:
        lines += ["", "## Evaluation", "", results.strip()]
    return "\n".join(lines) + "\n"


def write_model_card(directory: str | Path, *, repo: str | None = None, results: str | Path | None = None) -> Path:
    """Write DIR/README.md (atomically); `results` is a Markdown file of evaluation results."""
    text = None
    if results is not None:
        try:
            text = Path(results).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{results}: cannot read the results ({getattr(e, 'strerror', None) or e})") from None
    card = model_card(directory, repo=repo, results=text)
    path = Path(directory) / CARD_FILE
    with atomic_path(path) as tmp:
        Path(tmp).write_text(card, encoding="utf-8")
    return path
