"""flamingo card: a checkpoint's README.md as the hub reads it."""
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT
from flamingo_cli.formats.model_card import model_card

FLAMINGO = str(Path(sys.executable).parent / "flamingo")


def checkpoint(tmp_path, lm=None) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = yaml.safe_load((BUNDLED_CHECKPOINT / "config.yaml").read_text())
    if lm is not None:
        config["lm"]["path"] = lm
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    return ckpt


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_carries_hub_metadata_use_by_repo_id_and_the_config(tmp_path):
    ckpt = checkpoint(tmp_path, lm="mosaicml/mpt-7b")
    card = model_card(ckpt, repo="you/flamingo-toy")
    meta = front_matter(card)
    assert meta["library_name"] == "flamingo-cli" and meta["base_model"] == "mosaicml/mpt-7b"
    assert "flamingo" in meta["tags"]
    assert "flamingo generate --ckpt you/flamingo-toy" in card and 'load("you/flamingo-toy")' in card
    config = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(config) == yaml.safe_load((ckpt / "config.yaml").read_text())
    assert "## Evaluation" not in card


def test_an_embedded_lm_is_no_base_model_and_results_are_included(tmp_path):
    ckpt = checkpoint(tmp_path)
    (tmp_path / "results.md").write_text("| benchmark | metric | 4-shot |\n|---|---|---|\n| VQAv2 | VQA acc. | 50.0 |\n")
    r = subprocess.run([FLAMINGO, "card", str(ckpt), "--results", str(tmp_path / "results.md")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    card = (ckpt / "README.md").read_text()
    assert "base_model" not in front_matter(card)
    assert card.split("## Evaluation\n\n")[1] == (tmp_path / "results.md").read_text()
    assert "--ckpt ckpt " in card, "without --repo, the directory's name"


def test_a_directory_that_is_no_checkpoint_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([FLAMINGO, "card", str(tmp_path / "empty")], capture_output=True, text=True)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1 and "not a checkpoint directory" in r.stderr
    assert not (tmp_path / "empty" / "README.md").exists()
    shutil.rmtree(tmp_path / "empty")
