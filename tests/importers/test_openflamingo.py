"""Parity with the real OpenFlamingo, and a strict importer.

The golden files under tests/golden/openflamingo/ were written by OpenFlamingo 2.0.1 itself
(tests/golden/make_openflamingo_golden.py, in its own virtual environment): tiny random models
for four LM families, their checkpoints as OpenFlamingo's training saves them, and the outputs
of OpenFlamingo's forward, greedy and 3-beam generate on a batch of two 3-image prompts.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import hub_repo
from flamingo_cli.model.config import FlamingoConfig

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "openflamingo"
FAMILIES = ["mpt", "opt", "llama", "gpt_neox"]
TOL = 1e-4
FLAMINGO = [sys.executable, "-c", "from flamingo_cli.cli import main; main()"]


def meta(family: str) -> dict:
    return json.loads((GOLDEN / family / "meta.json").read_text())


def preset(every: int) -> FlamingoConfig:
    config = FlamingoConfig.from_yaml((GOLDEN / "preset.yaml").read_text())
    config.xattn.every = every
    config.encoder.weights = str(GOLDEN / "clip.pt")
    return config


def preset_file(tmp_path: Path, every: int) -> Path:
    path = tmp_path / f"preset-{every}.yaml"
    path.write_text((GOLDEN / "preset.yaml").read_text().replace("every: 1", f"every: {every}"))
    return path


@pytest.fixture(scope="module")
def imported():
    from flamingo_cli.importers.openflamingo import import_openflamingo

    cache = {}

    def get(family: str):
        if family not in cache:
            config = preset(meta(family)["every"])
            config.lm.path = str(GOLDEN / family / "lm")
            model, report = import_openflamingo(str(GOLDEN / family / "checkpoint.pt"), config)
            cache[family] = (model.eval(), report)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def pixels(imported):
    model, _ = imported("mpt")
    transform = model.encoder.transform()
    return torch.stack([transform(Image.open(GOLDEN / "images" / f"{i}.png").convert("RGB")) for i in range(3)])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def test_vision_tokens_match_open_clip_before_ln_post(imported, pixels):
    model, _ = imported("mpt")
    ours = model.encode(pixels)[:, 0]  # (3, 256, 16): patch tokens, CLS dropped
    golden = load_file(str(GOLDEN / "vision_tokens.safetensors"))["tokens"]
    assert ours.shape == golden.shape
    assert max_diff(ours, golden) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_perceiver_and_logits_match_openflamingo(family, imported, pixels):
    model, _ = imported(family)
    m = meta(family)
    golden = load_file(str(GOLDEN / family / "expected.safetensors"))
    with torch.no_grad():
        visual = model.resample(model.encode(pixels))  # (3, latents, d)
        assert max_diff(visual, golden["perceiver"]) <= TOL
        ids, mask = torch.tensor(m["input_ids"]), torch.tensor(m["attention_mask"])
        visual = visual.unsqueeze(0).expand(2, -1, -1, -1)
        logits = model(ids, visual, attention_mask=mask).logits
    assert logits.shape == golden["logits"].shape  # one logit per tokenizer id: MPT's padded rows dropped
    real = mask.bool()  # left padding: compare the positions OpenFlamingo computed on real tokens
    assert max_diff(logits[real], golden["logits"][real]) <= TOL


def _until_end(ids: list[int], eoc: int, pad: int | None) -> list[int]:
    out = []
    for t in ids:
        if t == pad and pad != eoc:
            break
        out.append(t)
        if t == eoc:
            break
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("beams", [1, 3])
def test_greedy_and_beam_outputs_are_identical(family, beams, imported, pixels):
    model, _ = imported(family)
    m = meta(family)
    golden = load_file(str(GOLDEN / family / "expected.safetensors"))["greedy" if beams == 1 else "beams"]
    with torch.no_grad():
        visual = model.resample(model.encode(pixels)).unsqueeze(0).expand(2, -1, -1, -1)
        new = model.generate(torch.tensor(m["input_ids"]), visual, attention_mask=torch.tensor(m["attention_mask"]),
                             num_beams=beams, max_new_tokens=m["max_new_tokens"])
    pad = model.pad_token_id
    for row in range(2):
        assert _until_end(new[row].tolist(), model.eoc_token_id, pad) == \
            _until_end(golden[row].tolist(), m["eoc_token_id"], pad)


def test_special_tokens_get_openflamingos_ids(imported):
    for family in FAMILIES:
        model, _ = imported(family)
        m = meta(family)
        assert (model.eoc_token_id, model.image_token_id) == (m["eoc_token_id"], m["media_token_id"])
        model.tokenizer.padding_side = "left"
        assert model.tokenizer(m["prompts"], padding="longest").input_ids == m["input_ids"]


def test_report_names_what_openflamingo_never_saved(imported):
    _, report = imported("llama")  # untied head: OpenFlamingo draws its new rows at random on load
    assert any("lm_head.weight" in note and "mean" in note for note in report.notes)
    _, report = imported("gpt_neox")  # older transformers' names and per-layer rotary buffers
    assert "lang_encoder.embed_out.weight (rows 0-319)" in report.checked
    assert sum("inv_freq" in k for k in report.checked) == 4


# -- the command ----------------------------------------------------------------------------------

def run(*args, stdin=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([*FLAMINGO, *args], input=stdin, capture_output=True, text=True, env=env, timeout=300)


def import_cmd(tmp_path, family, checkpoint=None, *extra):
    out = tmp_path / f"ckpt-{family}"
    return out, run("import", "openflamingo", str(checkpoint or GOLDEN / family / "checkpoint.pt"),
                    "--lm", str(GOLDEN / family / "lm"), "--encoder-weights", str(GOLDEN / "clip.pt"),
                    "-c", str(preset_file(tmp_path, meta(family)["every"])), "-o", str(out), *extra)


def test_flamingo_generate_on_an_imported_checkpoint_answers_as_openflamingo(tmp_path):
    from transformers import AutoTokenizer

    out, r = import_cmd(tmp_path, "llama")
    assert r.returncode == 0, r.stderr
    assert "92 tensors imported" in r.stderr and "mean of the head's own rows" in r.stderr
    m = meta("llama")
    images = [str(GOLDEN / "images" / f"{i}.png") for i in range(3)]
    records = "".join(json.dumps({"id": i, "prompt": p, "media": images}) + "\n" for i, p in enumerate(m["prompts"]))
    g = run("generate", "--ckpt", str(out), "--num-beams", "3", "--max-new-tokens", str(m["max_new_tokens"]),
            stdin=records)
    assert g.returncode == 0, g.stderr
    outputs = [json.loads(line)["output"] for line in g.stdout.splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(GOLDEN / "llama" / "lm")
    beams = load_file(str(GOLDEN / "llama" / "expected.safetensors"))["beams"]
    assert outputs == [tokenizer.decode(row, skip_special_tokens=True).strip() for row in beams.tolist()]


def test_import_without_a_preset_reads_the_architecture_from_the_file(tmp_path, imported):
    from flamingo_cli.importers.openflamingo import import_openflamingo

    # Every architecture field comes from the file, whatever the base config says ...
    config = preset(1)  # the LLaMA checkpoint has xattn every 2
    config.resampler.depth, config.resampler.num_latents = 2, 8
    config.lm.path = str(GOLDEN / "llama" / "lm")
    model, _ = import_openflamingo(str(GOLDEN / "llama" / "checkpoint.pt"), config, check_preset=False)
    assert (model.config.xattn.every, model.config.resampler.depth, model.config.resampler.num_latents) == (2, 6, 64)
    reference, _ = imported("llama")
    for name, tensor in reference.trainable_state_dict().items():
        assert torch.equal(model.trainable_state_dict()[name], tensor), name
    # ... so the command then needs only --lm, and says so when it is missing.
    r = run("import", "openflamingo", str(GOLDEN / "mpt" / "checkpoint.pt"), "-o", str(tmp_path / "x"))
    assert r.returncode != 0 and "--lm" in r.stderr and "Traceback" not in r.stderr


def _edited(tmp_path, family, edit) -> Path:
    ckpt = torch.load(GOLDEN / family / "checkpoint.pt", weights_only=True)
    edit(ckpt["model_state_dict"])
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


def _fails(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_rejects_a_missing_key(tmp_path):
    key = "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.ff.3.weight"
    path = _edited(tmp_path, "mpt", lambda s: s.pop(key))
    out, r = import_cmd(tmp_path, "mpt", path)
    _fails(r, "missing", key)
    assert not out.exists()


def test_rejects_a_wrong_shape(tmp_path):
    path = _edited(tmp_path, "mpt", lambda s: s.update({"perceiver.latents": torch.zeros(32, 16)}))
    _fails(import_cmd(tmp_path, "mpt", path)[1], "resampler.num_latents 64 (file: 32)")
    path = _edited(tmp_path, "mpt", lambda s: s.update(
        {"lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn.to_q.weight": torch.zeros(512, 31)}))
    _fails(import_cmd(tmp_path, "mpt", path)[1], "wrong shape",
           "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn.to_q.weight (file [512, 31]")


def test_rejects_an_unknown_extra_key(tmp_path):
    path = _edited(tmp_path, "mpt", lambda s: s.update({"perceiver.extra_scale": torch.ones(1)}))
    _fails(import_cmd(tmp_path, "mpt", path)[1], "unknown perceiver.extra_scale")


def test_rejects_a_pickle_with_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"perceiver.latents": Payload()}}, path)
    _fails(import_cmd(tmp_path, "mpt", path)[1], "refusing to unpickle", "posix.system")
    with open(path, "wb") as f:  # a bare pickle, not torch's zip format
        pickle.dump({"model_state_dict": {"perceiver.latents": Payload()}}, f, protocol=2)
    _fails(import_cmd(tmp_path, "mpt", path)[1], "refusing to unpickle", "posix.system")
    assert not marker.exists()


def test_rejects_an_lm_the_checkpoint_was_not_trained_with(tmp_path):
    # The embedding rows it carries must be this LM's own.
    def edit(s):
        s["lang_encoder.transformer.wte.weight"][5] += 1
    _fails(import_cmd(tmp_path, "mpt", _edited(tmp_path, "mpt", edit))[1], "mismatch",
           "lang_encoder.transformer.wte.weight rows 0-319")


def test_take_lm_rows_keeps_the_files_rows_through_save_and_load(tmp_path):
    # A run that trained every embedding row (FSDP without use_orig_params): OpenFlamingo loads
    # the file's rows over the LM's, and so do we when asked, storing them with the checkpoint.
    from flamingo_cli.formats.checkpoint import LM_OVERRIDES_FILE, load_checkpoint, save_checkpoint

    key = "lang_encoder.transformer.wte.weight"
    edited = {}

    def edit(s):
        s[key][5] += 1
        edited["row"] = s[key][5].clone()
    out, r = import_cmd(tmp_path, "mpt", _edited(tmp_path, "mpt", edit), "--take-lm-rows")
    assert r.returncode == 0, r.stderr
    assert "taken from the file" in r.stderr and (out / LM_OVERRIDES_FILE).is_file()
    model = load_checkpoint(out)
    weight = model.lm.get_input_embeddings().weight
    assert torch.equal(weight[5], edited["row"])
    original = load_file(str(GOLDEN / "mpt" / "lm" / "model.safetensors"))["transformer.wte.weight"]
    assert torch.equal(weight[:5], original[:5]) and torch.equal(weight[6:], original[6:])
    save_checkpoint(model, tmp_path / "again")  # e.g. a pretrain run from it keeps the rows
    assert torch.equal(load_checkpoint(tmp_path / "again").lm.get_input_embeddings().weight[5], edited["row"])

    from safetensors.torch import save_file

    from flamingo_cli.errors import CheckpointError

    save_file({"transformer.not_a_weight": torch.zeros(2)}, str(tmp_path / "again" / LM_OVERRIDES_FILE))
    with pytest.raises(CheckpointError, match="not weights of this LM: transformer.not_a_weight"):
        load_checkpoint(tmp_path / "again")


def test_rejects_a_preset_of_another_size(tmp_path):
    out = tmp_path / "x"
    r = run("import", "openflamingo", str(GOLDEN / "llama" / "checkpoint.pt"), "--lm", str(GOLDEN / "llama" / "lm"),
            "--encoder-weights", str(GOLDEN / "clip.pt"), "-c", str(preset_file(tmp_path, 1)), "-o", str(out))
    _fails(r, "xattn.every 1 (file: 2)")


def test_accepts_module_prefix_and_the_older_alias(tmp_path, imported):
    from safetensors.torch import load_file as load

    def edit(s):
        for key in [k for k in s if ".gated_cross_attn_layer." in k]:
            layer = key.split(".")[3]
            s[f"lang_encoder.gated_cross_attn_layers.{layer}." + key.split(".gated_cross_attn_layer.")[1]] = s.pop(key)
        for key in list(s):
            s["module." + key] = s.pop(key)
    out, r = import_cmd(tmp_path, "mpt", _edited(tmp_path, "mpt", edit))
    assert r.returncode == 0, r.stderr
    reference, _ = imported("mpt")
    weights = load(str(out / "model.safetensors"))
    for name, tensor in reference.trainable_state_dict().items():
        assert torch.equal(weights[name], tensor.float()), name


def test_encoder_weights_in_any_of_open_clips_layouts(tmp_path, imported):
    # The whole CLIP state dict (as open_clip saves it, text tower included), or the visual
    # module's alone: both are converted by timm's converter into the same encoder.
    from flamingo_cli.formats.checkpoint import load_encoder

    full = torch.load(GOLDEN / "clip.pt", weights_only=True)
    visual = {k.removeprefix("visual."): v for k, v in full.items() if k.startswith("visual.")}
    torch.save(visual, tmp_path / "visual.pt")
    config = preset(1).encoder
    config.weights = str(tmp_path / "visual.pt")
    reference, _ = imported("mpt")
    assert all(torch.equal(a, b) for a, b in zip(load_encoder(config).model.state_dict().values(),
                                                 reference.encoder.model.state_dict().values()))


def test_an_encoder_by_name_sees_openflamingos_pixels_and_says_so():
    """timm's ViT-B/32 CLIP config resizes to 248 and crops 224; OpenFlamingo (open_clip's
    transform) resizes to 224 and crops. The importer's encoder gets OpenFlamingo's pixels, says
    what it changed, and the checkpoint config keeps it."""
    from torchvision import transforms

    from flamingo_cli.formats.checkpoint import encoder_identity, load_encoder
    from flamingo_cli.importers.clip_towers import (OPENFLAMINGO_PREPROCESS, match_openflamingo_preprocessing,
                                                    openflamingo_encoder)

    config = openflamingo_encoder("vit_base_patch32_clip_224.openai")
    assert (config.kwargs, config.pretrained, config.keep_cls, config.final_norm) == (
        {"act_layer": "quick_gelu"}, True, False, False)
    assert openflamingo_encoder("vit_huge_patch14_clip_224.laion2b").kwargs == {}  # GELU, as LAION trained it
    config.pretrained, config.random_init = False, True  # the pixels are under test, not the weights
    encoder = load_encoder(config)
    before = encoder_identity(config)
    open_clip = transforms.Compose([
        transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224),
        transforms.ToTensor(), transforms.Normalize(OPENFLAMINGO_PREPROCESS["mean"], OPENFLAMINGO_PREPROCESS["std"])])
    image = Image.open(GOLDEN / "images" / "0.png").convert("RGB").resize((300, 200))
    assert not torch.equal(encoder.transform()(image), open_clip(image))

    (line,) = match_openflamingo_preprocessing(encoder)
    assert line.startswith("warning: encoder vit_base_patch32_clip_224.openai's timm preprocessing differs")
    assert "timm resizes to 248 and crops 224, OpenFlamingo resizes to 224" in line
    assert torch.equal(encoder.transform()(image), open_clip(image))
    assert match_openflamingo_preprocessing(encoder) == []
    assert encoder_identity(encoder.config) != before  # features made with other pixels are other features
    saved = FlamingoConfig.from_yaml(FlamingoConfig(encoder=encoder.config).to_yaml()).encoder
    assert saved.preprocess == encoder.config.preprocess and encoder_identity(saved) == encoder_identity(encoder.config)

    # The ViT-L/14 of the released checkpoints already matches: nothing changes, nothing is said.
    large = load_encoder(FlamingoConfig.from_yaml((GOLDEN / "preset.yaml").read_text()).encoder)
    assert match_openflamingo_preprocessing(large) == [] and large.config.preprocess == {}


def test_import_encoder_option_replaces_the_presets_encoder():
    from click.testing import CliRunner

    from flamingo_cli.cli import cli

    r = CliRunner().invoke(cli, ["import", "openflamingo", str(GOLDEN / "llama" / "checkpoint.pt"), "--lm",
                                 str(GOLDEN / "llama" / "lm"), "--encoder", "vit_base_patch32_clip_224.openai",
                                 "-o", "never"])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: encoder 'vit_base_patch32_clip_224.openai': ") and "--encoder-weights" in r.output


# -- by hub repo id -------------------------------------------------------------------------------

def test_import_by_repo_id_fetches_the_checkpoint_and_its_lm_from_the_hub_cache(tmp_path):
    cache = tmp_path / "hub"
    hub_repo(cache, "someone/tiny-openflamingo", GOLDEN / "llama", revisions=("main",))
    hub_repo(cache, "someone/tiny-llama", GOLDEN / "llama" / "lm")
    by_file, r = import_cmd(tmp_path, "llama")
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "TQDM_DISABLE": "1"}
    by_id = subprocess.run([*FLAMINGO, "import", "openflamingo", "someone/tiny-openflamingo", "--lm", "someone/tiny-llama",
                            "--encoder-weights", str(GOLDEN / "clip.pt"), "-c", str(preset_file(tmp_path, 2)),
                            "-o", str(tmp_path / "by-id")], capture_output=True, text=True, env=env)
    assert by_id.returncode == 0, by_id.stderr
    assert "92 tensors imported" in by_id.stderr
    assert (tmp_path / "by-id" / "model.safetensors").read_bytes() == (by_file / "model.safetensors").read_bytes()


def test_a_released_repo_brings_its_preset_and_offline_names_what_to_fetch(tmp_path):
    repo = "openflamingo/OpenFlamingo-9B-vitl-mpt7b"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    run = lambda: subprocess.run([*FLAMINGO, "import", "openflamingo", repo, "-o", str(tmp_path / "x")],  # noqa: E731
                                 capture_output=True, text=True, env=env)
    r = run()
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert f"{repo}: no such directory; as a hub repo, checkpoint.pt is not in the hub cache" in r.stderr
    assert f"`hf download {repo}`" in r.stderr
    # With its checkpoint.pt cached, the repo's preset (openflamingo-9b: no --lm needed) names
    # OpenAI's CLIP ViT-L/14 from timm, whose weights are a hub repo too.
    hub_repo(tmp_path / "hub", repo, GOLDEN / "llama")
    r = run()
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "encoder 'vit_large_patch14_clip_224.openai'" in r.stderr
    assert "`hf download timm/vit_large_patch14_clip_224.openai`" in r.stderr and not (tmp_path / "x").exists()
