"""--device-map: the LM placed by transformers (accelerate), the blocks following its layers.

One CPU has one device, so the map here offloads two of the four decoder layers to disk:
accelerate's hooks then load their weights at each call and run them on the CPU, which
exercises what a map across GPUs does (the LM's modules dispatched by hooks, the blocks placed
by their layers' execution devices, media and states moved to each block as it runs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import toy_shot_records
from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT
from flamingo_cli.inference.generation import generate_records
from flamingo_cli.inference.media import load_for_inference
from flamingo_cli.inference.scoring import score_records

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]
MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "cpu",
       "model.layers.3": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}




@pytest.fixture(scope="module")
def models():
    return load_for_inference(BUNDLED_CHECKPOINT), load_for_inference(BUNDLED_CHECKPOINT, device_map=MAP)


def test_the_map_is_applied_and_the_blocks_follow_their_layers(models):
    _, (placed, media) = models
    layers = placed.lm.model.layers
    assert {p.device.type for p in layers[1].parameters()} == {"meta"}, "offloaded: weights load at each call"
    assert {p.device.type for p in layers[0].parameters()} == {"cpu"}
    assert {p.device.type for p in placed.xattn.parameters()} == {"cpu"}
    assert placed.input_device == torch.device("cpu") and media.device == "cpu"


def test_outputs_are_those_of_the_model_on_one_device(models):
    (whole, whole_media), (placed, placed_media) = models
    a = list(score_records(whole, toy_shot_records(), whole_media, candidates=SHAPES))
    b = list(score_records(placed, toy_shot_records(), placed_media, candidates=SHAPES))
    assert [r["scores"] for r in b] == [r["scores"] for r in a]
    a = generate_records(whole, toy_shot_records(), whole_media, num_beams=3, max_new_tokens=6)
    b = generate_records(placed, toy_shot_records(), placed_media, num_beams=3, max_new_tokens=6)
    assert [r["output"] for r in b] == [r["output"] for r in a] and all(r["output"] for r in a)


def _flamingo(*args, cwd):
    return subprocess.run([str(Path(sys.executable).parent / "flamingo"), *args], capture_output=True, text=True,
                          cwd=cwd)


def test_generate_with_a_device_map_file_writes_the_same_bytes(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_shot_records()))
    (tmp_path / "map.json").write_text(json.dumps(MAP))
    plain = _flamingo("generate", "-q", "--max-new-tokens", "4", "prompts.jsonl", cwd=tmp_path)
    mapped = _flamingo("generate", "-q", "--max-new-tokens", "4", "--device-map", "map.json", "prompts.jsonl",
                       cwd=tmp_path)
    assert plain.returncode == 0 and mapped.returncode == 0, mapped.stderr
    assert mapped.stdout == plain.stdout and plain.stdout.count("\n") == 3


@pytest.mark.parametrize("content, problem", [(None, "cannot read it"), ("{oops", "not a JSON file"),
                                              ('["cpu"]', "a device map is a JSON object")])
def test_a_bad_device_map_is_one_line_naming_it(tmp_path, content, problem):
    if content is not None:
        (tmp_path / "map.json").write_text(content)
    r = _flamingo("score", "-q", "--device-map", "map.json", "-", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "map.json" in r.stderr and problem in r.stderr


def test_without_accelerate_a_device_map_is_one_clear_error(monkeypatch):
    from flamingo_cli.errors import ConfigError

    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate now fails, as when not installed
    with pytest.raises(ConfigError, match="needs accelerate.*pip install accelerate"):
        load_for_inference(BUNDLED_CHECKPOINT, device_map="auto")
