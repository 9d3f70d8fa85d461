"""`flamingo encode --embedding` and `flamingo prompt --select rices --rices-vectors`, as a user runs
them: the golden tiny CLIP tower of tests/golden/openflamingo/ (through its preset's `encoder:`
and its open_clip weights) ranks the golden pictures as OpenFlamingo's RICES did."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from flamingo_cli.cli import cli
from flamingo_cli.formats.artifacts import load_ref
from flamingo_cli.model.config import FlamingoConfig

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RICES = json.loads((GOLDEN / "rices" / "rices.json").read_text())
TOWER = ["--embedding", str(GOLDEN / "openflamingo" / "preset.yaml"),
         "--embedding-weights", str(GOLDEN / "openflamingo" / "clip.pt")]


@pytest.fixture(scope="module")
def place(tmp_path_factory, lm_dir):
    """A directory with a tiny checkpoint, the golden pictures and their support and query records."""
    from flamingo_cli.formats.checkpoint import new_model, save_checkpoint

    root = tmp_path_factory.mktemp("rices")
    config = FlamingoConfig.from_yaml((Path(__file__).resolve().parents[2] / "stages/init/tiny.yaml").read_text())
    config.lm.path = str(lm_dir("llama"))
    save_checkpoint(new_model(config, seed=0), root / "ckpt", embed_encoder=True)
    shutil.copytree(GOLDEN / "rices" / "images", root / "images")
    for part in ("support", "queries"):
        (root / f"{part}.jsonl").write_text("".join(
            json.dumps({"id": n, "image": f"images/{n}.png", "question": "What is it?", "answer": "a box"}) + "\n"
            for n in RICES[part]))
    return root


def flamingo(place, *args):
    return CliRunner().invoke(cli, [args[0], *(["--ckpt", str(place / "ckpt")] if args[0] == "encode" else []),
                                    *args[1:]], catch_exceptions=False)


def one_line_error(r, text):
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and text in r.output and "Traceback" not in r.output, r.output


def shots(path: Path) -> list[list[str]]:
    return [json.loads(line)["shots"] for line in path.read_text().splitlines()]


def test_encode_embeds_once_and_prompt_ranks_as_openflamingo(place, monkeypatch):
    monkeypatch.chdir(place)
    for part in ("support", "queries"):
        r = flamingo(place, "encode", *TOWER, "--out", "cache", "-o", f"{part}.enc.jsonl", f"{part}.jsonl")
        assert r.exit_code == 0 and r.output == "", r.output
    support = [json.loads(line) for line in Path("support.enc.jsonl").read_text().splitlines()]
    golden = load_file(str(GOLDEN / "rices" / "embedding.safetensors"))["embedding"]
    ours = torch.cat([load_ref(str(place / r["embedding"]))[0] for r in support])
    assert float((ours - golden[: len(support)]).abs().max()) < 1e-5
    before = {p: p.stat().st_mtime_ns for p in Path("cache").rglob("*.safetensors")}
    r = flamingo(place, "encode", *TOWER, "--out", "cache", "-o", "again.jsonl", "support.jsonl")
    assert r.exit_code == 0 and Path("again.jsonl").read_text() == Path("support.enc.jsonl").read_text()
    assert {p: p.stat().st_mtime_ns for p in Path("cache").rglob("*.safetensors")} == before  # nothing rewritten

    rices = ["prompt", "--protocol", "openflamingo", "--select", "rices", "--shots", "support.enc.jsonl",
             "--template", "openflamingo-vqa", "queries.enc.jsonl"]
    for k in ("2", "4"):
        r = flamingo(place, *rices, "-k", k, "-o", "p.jsonl")
        assert r.exit_code == 0 and r.output == "", r.output
        assert shots(Path("p.jsonl")) == RICES["find"][k]
    r = flamingo(place, *rices, "-k", "4", "--rices-vectors", "embedding", "-o", "explicit.jsonl")
    assert r.exit_code == 0 and Path("explicit.jsonl").read_text() == Path("p.jsonl").read_text()
    # The paper's protocol ranks by the same embedding when asked: the same shots, most similar last.
    r = flamingo(place, *[a for a in rices if a not in ("--protocol", "openflamingo")], "-k", "4",
                 "--rices-vectors", "embedding", "-o", "paper.jsonl")
    assert r.exit_code == 0 and shots(Path("paper.jsonl")) == RICES["find"]["4"]

    r = flamingo(place, *rices, "-k", "4", "--rices-vectors", "pooled", "-o", "pooled.jsonl")
    assert r.exit_code == 0 and r.output == ""
    r = flamingo(place, "encode", "--out", "cache", "-o", "plain.jsonl", "support.jsonl")  # no embeddings
    assert r.exit_code == 0
    r = flamingo(place, *[a if a != "support.enc.jsonl" else "plain.jsonl" for a in rices], "-k", "4", "-o", "f.jsonl")
    assert r.exit_code == 0 and r.output.count("\n") == 1
    assert "plain.jsonl has no 'embedding', so RICES ranks by pooled features" in r.output
    assert "flamingo encode --embedding vit_large_patch14_clip_224.openai" in r.output
    assert shots(Path("f.jsonl")) == shots(Path("pooled.jsonl"))


@pytest.mark.parametrize("args, error", [
    (["--embedding", "not_a_model"], "--embedding not_a_model: not a timm model (e.g. vit_large_patch14_clip_224"),
    (["--embedding", "ViT-L-14"], "open_clip's ViT-L-14 (openai) is timm's vit_large_patch14_clip_224.openai"),
    (["--embedding", "vit_large_patch14_clip_224.bogus"], "Invalid pretrained tag (bogus)"),
    (["--embedding", "vit_large_patch14_clip_224"], "no weights (random ones would rank at random)"),
    (["--embedding", "vit_large_patch14_clip_224.openai", "--embedding-weights", "missing.pt"],
     "missing.pt: no such file"),
    (["--embedding", "support.jsonl.yaml"], "support.jsonl.yaml: no `encoder:` mapping"),
    (["--embedding", "bad.yaml"], "bad.yaml: not UTF-8 text"),
])
def test_a_bad_embedding_tower_is_one_line(place, monkeypatch, args, error):
    monkeypatch.chdir(place)
    Path("support.jsonl.yaml").write_text("resampler: {depth: 2}\n")
    Path("bad.yaml").write_bytes(b"encoder: {name: \xff}\n")
    one_line_error(flamingo(place, "encode", *args, "--out", "cache", "queries.jsonl"), error)


def test_rices_vectors_that_records_lack_or_options_that_do_not_apply(place, monkeypatch):
    monkeypatch.chdir(place)
    assert flamingo(place, "encode", "--out", "cache", "-o", "plain.jsonl", "support.jsonl").exit_code == 0
    r = flamingo(place, "prompt", "--protocol", "openflamingo", "--select", "rices", "--rices-vectors", "embedding",
                 "--shots", "plain.jsonl", "-k", "2", "plain.jsonl")
    one_line_error(r, "s0: no 'embedding' (the CLIP image embedding RICES ranks by): add it with "
                      "`flamingo encode --embedding vit_large_patch14_clip_224.openai`")
    r = flamingo(place, "prompt", "--select", "rices", "--rices-vectors", "embedding", "--shots", "plain.jsonl",
                 "-k", "2", "plain.jsonl")
    one_line_error(r, "no 'embedding' (the CLIP image embedding RICES ranks by)")
    r = flamingo(place, "prompt", "--rices-vectors", "pooled", "--shots", "plain.jsonl", "-k", "2", "plain.jsonl")
    assert r.exit_code == 2 and "--rices-vectors is for --select rices" in r.output
    r = flamingo(place, "encode", "--embedding-weights", "x.pt", "support.jsonl")
    assert r.exit_code == 2 and "--embedding-weights needs --embedding NAME" in r.output
    r = flamingo(place, "encode", *TOWER, "--wds", "shards/%06d.tar", "support.jsonl")
    assert r.exit_code == 2 and "--embedding is for prompt --select rices" in r.output
