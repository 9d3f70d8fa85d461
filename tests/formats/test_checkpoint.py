"""The checkpoint directory: config round-trip, save/load equality, strict loading, atomic writes."""
import shutil

import pytest
import torch
from conftest import ids_for, tiny_config
from safetensors.torch import load_file, save_file

from flamingo_cli.formats.checkpoint import WEIGHTS_FILE, load_checkpoint, new_model, save_checkpoint
from flamingo_cli.model.config import EncoderConfig, FlamingoConfig
from flamingo_cli.errors import CheckpointError, ConfigError

PROMPT = "<image>a red circle<|endofchunk|><image>a"


def test_config_round_trips_through_yaml():
    config = tiny_config("/some/lm", masking="all_previous")
    config.encoder = EncoderConfig(name="test_vit", kwargs={"img_size": 64}, keep_cls=True, image_size=64)
    again = FlamingoConfig.from_yaml(config.to_yaml())
    assert again == config
    assert again.to_yaml() == config.to_yaml()


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="config.xattn: unknown key.*evrey"):
        FlamingoConfig.from_dict({"xattn": {"evrey": 2}})
    with pytest.raises(ConfigError, match="placement"):
        FlamingoConfig.from_dict({"xattn": {"placement": "sideways"}})
    with pytest.raises(ConfigError, match="YAML"):
        FlamingoConfig.from_yaml("xattn: [unclosed")


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, lm_dir):
    """A checkpoint with random (non-zero) trainable weights, a tiny ViT embedded, the LM by path."""
    config = tiny_config(lm_dir("llama"))
    config.encoder = EncoderConfig(name="test_vit", kwargs={"img_size": 32})
    model = new_model(config, seed=0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    directory = tmp_path_factory.mktemp("ckpt") / "ckpt"
    save_checkpoint(model, directory, embed_encoder=True)
    return model, directory


def _logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 32, 32, generator=g)
    visual = model.resample(model.encode(pixels)).unsqueeze(0)  # two images of one sequence
    with torch.no_grad():
        return model(ids_for(model, PROMPT), visual).logits


def test_save_then_load_gives_identical_logits(trained_ckpt):
    model, directory = trained_ckpt
    loaded = load_checkpoint(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.yaml", "encoder.safetensors", WEIGHTS_FILE]
    assert torch.equal(_logits(model), _logits(loaded))
    assert loaded.config.encoder.weights == "encoder.safetensors"
    loaded.config.encoder.weights = None
    assert loaded.config == model.config


def test_checkpoint_holds_only_trainable_weights(trained_ckpt):
    model, directory = trained_ckpt
    stored = load_file(str(directory / WEIGHTS_FILE))
    assert set(stored) == set(model.trainable_state_dict())
    assert sum(t.numel() for t in stored.values()) == sum(p.numel() for p in model.trainable_parameters())
    assert not any(k.startswith("lm.") for k in stored)


def test_self_contained_checkpoint_survives_losing_the_lm(tmp_path, trained_ckpt, lm_dir):
    model, directory = trained_ckpt
    lm_copy = tmp_path / "lm-elsewhere"
    shutil.copytree(lm_dir("llama"), lm_copy)
    moved = load_checkpoint(directory)
    moved.config.lm.path = str(lm_copy)
    save_checkpoint(moved, tmp_path / "self", embed_lm=True)
    shutil.rmtree(lm_copy)
    shutil.move(tmp_path / "self", tmp_path / "moved")
    again = load_checkpoint(tmp_path / "moved")
    assert again.config.lm.path == "lm" and again.config.encoder.weights == "encoder.safetensors"
    assert torch.equal(_logits(model), _logits(again))


def _broken_copy(tmp_path, directory, edit):
    target = tmp_path / "broken"
    shutil.copytree(directory, target)
    state = load_file(str(target / WEIGHTS_FILE))
    edit(state)
    save_file(state, str(target / WEIGHTS_FILE))
    return target


def test_missing_key_is_rejected_by_name(tmp_path, trained_ckpt):
    target = _broken_copy(tmp_path, trained_ckpt[1], lambda s: s.pop("xattn.2.attn_gate"))
    with pytest.raises(CheckpointError, match=r"missing xattn\.2\.attn_gate"):
        load_checkpoint(target)


def test_extra_key_is_rejected_by_name(tmp_path, trained_ckpt):
    target = _broken_copy(tmp_path, trained_ckpt[1], lambda s: s.update({"xattn.9.attn_gate": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected xattn\.9\.attn_gate"):
        load_checkpoint(target)


def test_wrong_shape_is_rejected_by_name(tmp_path, trained_ckpt):
    target = _broken_copy(tmp_path, trained_ckpt[1], lambda s: s.update({"resampler.latents": torch.zeros(5, 64)}))
    with pytest.raises(CheckpointError, match=r"wrong shape resampler\.latents \(file \[5, 64\], model \[4, 64\]\)"):
        load_checkpoint(target)


def test_all_problems_reported_in_one_error(tmp_path, trained_ckpt):
    def edit(s):
        s.pop("resampler.norm.weight")
        s["extra.thing"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_broken_copy(tmp_path, trained_ckpt[1], edit))
    assert "missing resampler.norm.weight" in str(err.value) and "unexpected extra.thing" in str(err.value)
    assert "\n" not in str(err.value)


def test_corrupt_or_absent_files_are_named(tmp_path, trained_ckpt):
    target = tmp_path / "corrupt"
    shutil.copytree(trained_ckpt[1], target)
    (target / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}: cannot read weights"):
        load_checkpoint(target)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")
    (target / "config.yaml").write_text("xattn: {every: 0}\n")
    with pytest.raises(CheckpointError, match="config.yaml: xattn.every must be >= 1"):
        load_checkpoint(target)


def test_failed_save_leaves_the_old_checkpoint_intact(tmp_path, trained_ckpt):
    model, directory = trained_ckpt
    target = tmp_path / "ckpt"
    shutil.copytree(directory, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    model.config.lm.path, real = "some-org/some-hub-model", model.config.lm.path
    try:
        with pytest.raises(CheckpointError, match="cannot embed the LM"):
            save_checkpoint(model, target, embed_lm=True)
    finally:
        model.config.lm.path = real
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temp dirs left behind"


def test_saving_over_a_checkpoint_replaces_it(tmp_path, trained_ckpt):
    model, directory = trained_ckpt
    target = tmp_path / "ckpt"
    save_checkpoint(model, target, embed_encoder=True)
    with torch.no_grad():
        gates = [b.attn_gate.clone() for b in model.xattn.values()]
        for b in model.xattn.values():
            b.attn_gate.add_(1.0)
    try:
        save_checkpoint(model, target)
        assert torch.equal(load_checkpoint(target).xattn["0"].attn_gate, model.xattn["0"].attn_gate)
    finally:
        with torch.no_grad():
            for b, g in zip(model.xattn.values(), gates):
                b.attn_gate.copy_(g)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_encoder_checkpoint_mismatch_is_an_error(tmp_path, trained_ckpt):
    target = tmp_path / "mismatch"
    shutil.copytree(trained_ckpt[1], target)
    config = FlamingoConfig.from_yaml((target / "config.yaml").read_text())
    config.encoder.name, config.encoder.weights, config.encoder.kwargs = "test_resnet", None, {}
    (target / "config.yaml").write_text(config.to_yaml())
    with pytest.raises(CheckpointError, match="96-wide features but resampler.dim is 64"):
        load_checkpoint(target)
