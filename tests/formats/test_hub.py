"""Checkpoints and LMs by hub repo id, from huggingface_hub's on-disk cache, never the network.

The cache is built here in the layout huggingface_hub reads offline: models--OWNER--NAME/ with
refs/REVISION holding a commit hash and snapshots/COMMIT/ holding the files."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import hub_repo
from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT

TOY = Path(__file__).resolve().parents[2] / "examples" / "toy"
FLAMINGO = str(Path(sys.executable).parent / "flamingo")
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # conftest.hub_repo's


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding the bundled model as toy/flamingo (its LM embedded), and as toy/split,
    whose config names its LM by the id toy/lm, a repo of its own."""
    cache = tmp_path_factory.mktemp("hub")
    hub_repo(cache, "toy/flamingo", BUNDLED_CHECKPOINT, revisions=("main", "v1"))
    hub_repo(cache, "toy/lm", BUNDLED_CHECKPOINT / "lm")
    split = hub_repo(cache, "toy/split", BUNDLED_CHECKPOINT)
    shutil.rmtree(split / "lm")
    config = yaml.safe_load((split / "config.yaml").read_text())
    config["lm"]["path"] = "toy/lm"
    (split / "config.yaml").write_text(yaml.safe_dump(config))
    work = tmp_path_factory.mktemp("work")
    shots = [f"{TOY}/shots/shot-0{i}.png" for i in range(2)]
    prompt = "<image>Output: a pink diamond<|endofchunk|><image>Output: a cyan triangle<|endofchunk|><image>Output:"
    (work / "prompts.jsonl").write_text("".join(
        json.dumps({"id": image.stem, "prompt": prompt, "media": [*shots, str(image)]}) + "\n"
        for image in sorted((TOY / "images").glob("*.png"))[:2]))
    (work / "shapes.txt").write_text("circle\nsquare\ntriangle\ndiamond\ncross\nstar\n")
    return cache, work


def score(hub, *ckpt):
    cache, work = hub
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("FLAMINGO_CKPT", None)
    return subprocess.run([FLAMINGO, "score", "-q", *ckpt, "--candidates", "shapes.txt", "prompts.jsonl"],
                          capture_output=True, text=True, env=env, cwd=work)


def test_a_checkpoint_and_its_lm_by_repo_id_score_as_the_directory_does(hub):
    local = score(hub, "--ckpt", str(BUNDLED_CHECKPOINT))
    assert local.returncode == 0, local.stderr
    for ckpt in (["--ckpt", "toy/flamingo"], ["--ckpt", "toy/flamingo", "--revision", "v1"], ["--ckpt", "toy/split"]):
        by_id = score(hub, *ckpt)
        assert by_id.returncode == 0, by_id.stderr
        assert by_id.stdout == local.stdout and local.stdout.count("\n") == 2, ckpt


@pytest.mark.parametrize("ckpt, missing, fetch", [
    (["--ckpt", "toy/absent"], "toy/absent: no such directory; as a hub repo, config.yaml is not in the hub cache",
     "`hf download toy/absent`"),
    (["--ckpt", "toy/flamingo", "--revision", "v2"], "toy/flamingo@v2: no such directory; as a hub repo, "
     "config.yaml is not in the hub cache", "`hf download toy/flamingo --revision v2`"),
])
def test_offline_without_the_files_one_line_says_what_is_missing_and_how_to_fetch_it(hub, ckpt, missing, fetch):
    r = score(hub, *ckpt)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert missing in r.stderr and "HF_HUB_OFFLINE is set" in r.stderr and fetch in r.stderr
    assert r.stdout == ""


def test_an_lm_repo_missing_from_the_cache_is_named(hub, tmp_path):
    cache, work = hub
    config = yaml.safe_load((cache / "models--toy--split" / "snapshots" / COMMIT / "config.yaml").read_text())
    config["lm"]["path"] = "toy/other-lm"
    shutil.copytree(cache / "models--toy--split" / "snapshots" / COMMIT, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(config))
    r = score(hub, "--ckpt", str(tmp_path / "ckpt"))
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "LM toy/other-lm: no such directory; as a hub repo, config.json is not in the hub cache" in r.stderr
    assert "`hf download toy/other-lm`" in r.stderr


def test_init_names_its_lm_by_repo_id_and_the_checkpoint_loads_it_from_the_cache(hub, tmp_path):
    cache, work = hub
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    for name, lm in (("by-id", "toy/lm"), ("by-dir", str(BUNDLED_CHECKPOINT / "lm"))):
        r = subprocess.run([FLAMINGO, "init", "-c", "tiny", "--lm", lm, "--random-encoder", "-o", str(tmp_path / name)],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
    assert yaml.safe_load((tmp_path / "by-id" / "config.yaml").read_text())["lm"]["path"] == "toy/lm"
    by_id, by_dir = (score(hub, "--ckpt", str(tmp_path / name)) for name in ("by-id", "by-dir"))
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_dir.stdout and by_id.stdout.count("\n") == 2


def test_encoder_weights_by_repo_id_are_the_repos_weights_file(hub, tmp_path):
    cache, _ = hub
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(BUNDLED_CHECKPOINT / "encoder.safetensors", weights / "model.safetensors")
    hub_repo(cache, "toy/encoder", weights)
    code = ("import sys, torch; from flamingo_cli.formats.checkpoint import load_encoder, read_config; "
            "c = read_config(sys.argv[1]).encoder; c.weights = sys.argv[2]; "
            "a = load_encoder(c).state_dict(); c.weights = sys.argv[3]; b = load_encoder(c).state_dict(); "
            "assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a); print(len(a))")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(BUNDLED_CHECKPOINT), "toy/encoder",
                        str(BUNDLED_CHECKPOINT / "encoder.safetensors")], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and int(r.stdout) > 10, r.stderr
