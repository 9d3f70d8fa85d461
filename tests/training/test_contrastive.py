"""flamingo contrastive: the two-term loss, and a tiny run whose encoder `flamingo init` takes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flamingo_cli.training.contrastive import ENCODER_CONFIG_FILE, ENCODER_WEIGHTS_FILE, contrastive_loss, read_encoder_dir

BIN = Path(sys.executable).parent


def _embeddings(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_loss_is_both_directions_of_infonce():
    images, texts = _embeddings(6), _embeddings(6, seed=1)
    scale = torch.tensor(10.0)
    logits = scale * images @ texts.T
    labels = torch.arange(6)
    expected = F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)
    got = contrastive_loss(images, texts, scale, [f"caption {i}" for i in range(6)])
    assert torch.allclose(got, expected, atol=1e-6)


def test_matching_pairs_score_lower_than_mismatched():
    images = _embeddings(8)
    captions = [f"caption {i}" for i in range(8)]
    scale = torch.tensor(20.0)
    aligned = contrastive_loss(images, images, scale, captions)
    shuffled = contrastive_loss(images, images.roll(1, 0), scale, captions)
    assert aligned < 0.1 < shuffled


def test_identical_captions_are_positives_of_each_other():
    """Swapping the texts of two pairs with the same caption changes nothing: neither is a negative."""
    images, texts = _embeddings(5), _embeddings(5, seed=1)
    captions = ["a red circle", "a blue star", "a red circle", "a green cross", "a blue star"]
    scale = torch.tensor(7.0)
    swapped = texts[[2, 4, 0, 3, 1]]
    assert torch.allclose(contrastive_loss(images, texts, scale, captions),
                          contrastive_loss(images, swapped, scale, captions), atol=1e-6)
    distinct = [f"{c} {i}" for i, c in enumerate(captions)]
    assert not torch.allclose(contrastive_loss(images, texts, scale, distinct),
                              contrastive_loss(images, swapped, scale, distinct))


@pytest.fixture
def pairs(tmp_path):
    colours = {"red": (220, 30, 30), "blue": (30, 60, 230), "green": (30, 180, 40), "yellow": (240, 220, 30)}
    lines = []
    for i in range(8):
        name = list(colours)[i % 4]
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), colours[name]).save(path)
        lines.append(json.dumps({"id": str(i), "image": str(path), "caption": f"a {name} square"}))
    records = tmp_path / "pairs.jsonl"
    records.write_text("\n".join(lines) + "\n")
    return records


def _flamingo(*args, cwd=None, stdin=None):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(["flamingo", *map(str, args)], env=env, cwd=cwd, input=stdin, capture_output=True, text=True)


def test_contrastive_run_gives_the_encoder_init_freezes(tmp_path, pairs, lm_dir):
    from safetensors.torch import load_file

    from flamingo_cli.formats.checkpoint import load_checkpoint

    out = tmp_path / "encoder"
    r = _flamingo("contrastive", pairs, "--tokenizer", lm_dir("llama"), "-o", out, "--encoder", "test_vit",
                  "--encoder-arg", "img_size=32", "--steps", 3, "--batch-size", 4, "--warmup", 1,
                  "--text-width", 32, "--embed-dim", 16, "--workers", 0, "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["loss"] > 0 for m in metrics)

    config = read_encoder_dir(out)
    assert config.name == "test_vit" and config.kwargs == {"img_size": 32} and config.final_norm
    assert Path(config.weights) == (out / ENCODER_WEIGHTS_FILE).absolute()

    r = _flamingo("init", "-c", "tiny", "--encoder", out, "--lm", lm_dir("llama"), "-o", tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr
    model = load_checkpoint(tmp_path / "ckpt")
    trained = load_file(str(out / ENCODER_WEIGHTS_FILE))
    fresh = {k: v for k, v in model.encoder.model.state_dict().items()}
    assert fresh.keys() == trained.keys()
    assert all(torch.equal(fresh[k], trained[k]) for k in trained)
    assert model.encoder.config.final_norm and model.config.resampler.dim == model.encoder.dim


def test_records_without_captions_are_one_line_errors(tmp_path, pairs, lm_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "image": "x.png"}) + "\n")
    r = _flamingo("contrastive", bad, "--tokenizer", lm_dir("llama"), "-o", tmp_path / "enc")
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "caption" in r.stderr
    assert not (tmp_path / "enc").exists()

    r = _flamingo("contrastive", pairs, "--tokenizer", lm_dir("llama"), "-o", tmp_path / "enc", "--batch-size", 64)
    assert r.returncode == 1 and "fewer than one batch" in r.stderr and "Traceback" not in r.stderr

    r = _flamingo("contrastive", pairs, "--tokenizer", tmp_path / "nowhere", "-o", tmp_path / "enc")
    assert r.returncode == 1 and "tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_init_names_a_directory_without_an_encoder(tmp_path, lm_dir):
    (tmp_path / "empty").mkdir()
    r = _flamingo("init", "-c", "tiny", "--encoder", tmp_path / "empty", "--lm", lm_dir("llama"), "-o", tmp_path / "c")
    assert r.returncode == 1 and ENCODER_CONFIG_FILE in r.stderr and "Traceback" not in r.stderr
