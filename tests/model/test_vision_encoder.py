"""VisionEncoder: timm models as frozen token extractors (built small, never downloaded)."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from safetensors.torch import save_file

from flamingo_cli.formats.checkpoint import load_encoder
from flamingo_cli.model.config import EncoderConfig
from flamingo_cli.errors import CheckpointError
from flamingo_cli.model.vision_encoder import VisionEncoder

VIT_SIZE = 64  # test_vit: patch 16 -> a 4x4 grid of 16 patches


def _encoder(name: str, seed: int = 0, **config) -> VisionEncoder:
    """A randomly initialised encoder through the real load path (timm.create_model, pretrained=False)."""
    torch.manual_seed(seed)
    return load_encoder(EncoderConfig(name=name, **config))


def _vit(seed: int = 0, **config) -> VisionEncoder:
    enc = _encoder("test_vit", seed, kwargs={"img_size": VIT_SIZE}, **config)
    # A non-trivial final norm, so that "before" and "after" it really differ.
    with torch.no_grad():
        enc.model.norm.weight.uniform_(0.5, 1.5)
        enc.model.norm.bias.normal_()
    return enc


def _pixels(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------- ViT tokens


def test_vit_geometry_is_what_the_tests_assume():
    enc = _vit()
    assert enc.model.patch_embed.patch_size == (16, 16)
    assert enc.model.patch_embed.num_patches == 16
    assert enc.model.num_prefix_tokens == 1
    assert enc.dim == enc.model.embed_dim == 64


def test_vit_drops_cls_by_default():
    enc = _vit()
    out = enc(_pixels(2, 3, VIT_SIZE, VIT_SIZE))
    assert out.shape == (2, 1, enc.model.patch_embed.num_patches, enc.dim)


def test_vit_keep_cls_prepends_prefix_tokens():
    config = dict(keep_cls=True, final_norm=True)
    enc = _vit(**config)
    x = _pixels(2, 3, VIT_SIZE, VIT_SIZE)
    out = enc(x)
    prefix = enc.model.num_prefix_tokens
    assert out.shape == (2, 1, enc.model.patch_embed.num_patches + prefix, enc.dim)
    with torch.no_grad():
        reference = enc.model.forward_features(x)  # (b, prefix + patches, d), final norm applied
    torch.testing.assert_close(out[:, 0, :prefix], reference[:, :prefix], atol=1e-6, rtol=0)
    # The patch tokens are the same whether or not the prefix is kept.
    dropped = _vit(final_norm=True)
    dropped.model.load_state_dict(enc.model.state_dict())
    torch.testing.assert_close(out[:, :, prefix:], dropped(x), atol=0, rtol=0)


def test_vit_without_prefix_tokens_returns_every_patch():
    """No class token (the toy world's encoder): all patches, the same as forward_features."""
    enc = _encoder("test_vit", kwargs={"img_size": VIT_SIZE, "class_token": False, "global_pool": "avg"},
                   final_norm=True, keep_cls=True)
    x = _pixels(2, 3, VIT_SIZE, VIT_SIZE)
    tokens = enc(x)
    assert tokens.shape == (2, 1, 16, enc.dim)
    assert torch.allclose(tokens[:, 0], enc.model.forward_features(x), atol=1e-6)


def test_vit_final_norm_true_matches_forward_features():
    enc = _vit(final_norm=True)
    x = _pixels(2, 3, VIT_SIZE, VIT_SIZE)
    with torch.no_grad():
        reference = enc.model.forward_features(x)[:, enc.model.num_prefix_tokens:]
    torch.testing.assert_close(enc(x)[:, 0], reference, atol=1e-6, rtol=0)


def test_vit_final_norm_false_gives_tokens_before_the_norm():
    after = _vit(final_norm=True)
    before = _vit(final_norm=False)
    before.model.load_state_dict(after.model.state_dict())
    x = _pixels(2, 3, VIT_SIZE, VIT_SIZE)
    pre, post = before(x), after(x)
    assert not torch.allclose(pre, post, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(before.model.norm(pre), post, atol=1e-6, rtol=0)
        # Independently of timm's forward_intermediates: run the blocks by hand.
        m = before.model
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        h = m.blocks(h)
    torch.testing.assert_close(pre[:, 0], h[:, m.num_prefix_tokens:], atol=1e-6, rtol=0)


# ---------------------------------------------------------------- CNN tokens


@pytest.mark.parametrize("name", ["test_resnet", "test_nfnet"])
def test_cnn_final_grid_flattened_to_tokens(name):
    enc = _encoder(name)
    x = _pixels(2, 3, 96, 128)  # non-square: a transposed flatten would be caught
    out = enc(x)
    with torch.no_grad():
        (grid,) = enc.model.forward_intermediates(x, indices=1, intermediates_only=True)
    b, d, h, w = grid.shape
    assert (h, w) == (3, 4)
    assert d == enc.dim == enc.model.feature_info[-1]["num_chs"]
    assert out.shape == (2, 1, h * w, enc.dim)
    torch.testing.assert_close(out[:, 0], grid.flatten(2).transpose(1, 2), atol=0, rtol=0)
    # Token t is grid cell (t // w, t % w).
    torch.testing.assert_close(out[:, 0, 1 * w + 2], grid[:, :, 1, 2], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["test_resnet", "test_nfnet"])
def test_cnn_keep_cls_raises(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with pytest.raises(ValueError, match=name):
        VisionEncoder(EncoderConfig(name=name, keep_cls=True), model)
    with pytest.raises(ValueError):
        load_encoder(EncoderConfig(name=name, keep_cls=True))


# ---------------------------------------------------------------- video


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_video_frames_are_encoded_independently(name):
    enc = _vit() if name == "test_vit" else _encoder(name)
    video = _pixels(2, 3, 3, VIT_SIZE, VIT_SIZE)
    out = enc(video)
    n = enc(video[:, 0]).shape[2]
    assert out.shape == (2, 3, n, enc.dim)
    for k in range(3):
        torch.testing.assert_close(out[:, k], enc(video[:, k])[:, 0], atol=1e-5, rtol=0)
    # Frames differ, so their tokens do: the frame axis is not a broadcast of one frame.
    assert not torch.allclose(out[:, 0], out[:, 1])
    # A batch element does not depend on the others.
    torch.testing.assert_close(out[1:], enc(video[1:]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- frozen


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_encoder_is_frozen(name):
    enc = _vit() if name == "test_vit" else _encoder(name)
    params = list(enc.parameters())
    assert params and not any(p.requires_grad for p in params)
    x = _pixels(1, 3, VIT_SIZE, VIT_SIZE).requires_grad_(True)
    out = enc(x)
    assert out.requires_grad is False and out.grad_fn is None
    assert enc.train() is enc
    assert enc.training is False
    assert enc.model.training is False
    assert not any(m.training for m in enc.modules())


def test_train_mode_does_not_change_outputs():
    """BatchNorm statistics must not update nor be used in batch mode after .train()."""
    enc = _encoder("test_resnet")
    x = _pixels(4, 3, 64, 64)
    before = enc(x)
    stats = {k: v.clone() for k, v in enc.model.state_dict().items()}
    enc.train()
    after = enc(x)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, stats[k]), k


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "name, config, size",
    [
        ("test_vit", {"kwargs": {"img_size": VIT_SIZE}}, VIT_SIZE),
        ("test_resnet", {"image_size": 96}, 96),
        ("test_nfnet", {"image_size": 72}, 72),
    ],
)
def test_data_config_from_timm(name, config, size):
    enc = _encoder(name, **config)
    reference = timm.data.resolve_data_config({}, model=enc.model)
    assert reference["input_size"] != (3, size, size)  # the override is really doing something
    dc = enc.data_config()
    assert dc["mean"] == reference["mean"]
    assert dc["std"] == reference["std"]
    assert dc["interpolation"] == reference["interpolation"]
    assert dc["input_size"] == (3, size, size)

    transform = enc.transform()
    for w, h in [(37, 211), (300, 150)]:
        rng = np.random.default_rng(w)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        t = transform(image)
        assert isinstance(t, torch.Tensor)
        assert t.shape == (3, size, size)
        assert t.dtype == torch.float32
    # Normalisation uses the model's mean/std: a uniform grey of value mean maps to 0.
    grey = Image.new("RGB", (50, 80), tuple(round(255 * m) for m in reference["mean"]))
    torch.testing.assert_close(transform(grey), torch.zeros(3, size, size), atol=0.01, rtol=0)
    # ... and white maps to (1 - mean) / std.
    white = transform(Image.new("RGB", (50, 80), (255, 255, 255)))
    expected = (1 - torch.tensor(reference["mean"])) / torch.tensor(reference["std"])
    torch.testing.assert_close(white[:, size // 2, size // 2], expected, atol=1e-5, rtol=0)


def test_transform_output_feeds_the_encoder():
    enc = _vit()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    pixels = enc.transform()(image).unsqueeze(0)
    out = enc(pixels)
    assert out.shape == (1, 1, 16, enc.dim)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- load_encoder with a weights file


def test_load_encoder_from_safetensors(tmp_path):
    torch.manual_seed(123)
    source = timm.create_model("test_vit", pretrained=False, img_size=VIT_SIZE).eval()
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    torch.manual_seed(0)  # a different init, so only the file can make them equal
    enc = load_encoder(EncoderConfig(name="test_vit", kwargs={"img_size": VIT_SIZE}, weights=str(path), final_norm=True))
    for k, v in source.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k], v), k
    x = _pixels(2, 3, VIT_SIZE, VIT_SIZE)
    with torch.no_grad():
        reference = source.forward_features(x)[:, source.num_prefix_tokens:]
    torch.testing.assert_close(enc(x)[:, 0], reference, atol=1e-6, rtol=0)

    torch.manual_seed(0)
    unloaded = load_encoder(EncoderConfig(name="test_vit", kwargs={"img_size": VIT_SIZE}, final_norm=True))
    assert not torch.allclose(unloaded(x), enc(x))


def test_load_encoder_relative_weights_resolve_against_base(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("test_resnet", pretrained=False).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    enc = load_encoder(EncoderConfig(name="test_resnet", weights="enc.safetensors"), base=tmp_path)
    x = _pixels(1, 3, 64, 64)
    with torch.no_grad():
        (grid,) = source.forward_intermediates(x, indices=1, intermediates_only=True)
    torch.testing.assert_close(enc(x)[:, 0], grid.flatten(2).transpose(1, 2), atol=0, rtol=0)


def _state(name="test_vit"):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=VIT_SIZE)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("edit, message", [
    (lambda state: state.pop("norm.weight"), r"missing.*norm\.weight"),
    (lambda state: state.update({"extra.head.bias": torch.zeros(3)}), r"unexpected.*extra\.head\.bias"),
    (lambda state: state.update({"pos_embed": torch.zeros(1, 5, 64)}), r"pos_embed"),
], ids=["missing", "unexpected", "wrong-shape"])
def test_load_encoder_rejects_mismatched_weights_by_key(tmp_path, edit, message):
    state = _state()
    edit(state)
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=message):
        load_encoder(EncoderConfig(name="test_vit", kwargs={"img_size": VIT_SIZE}, weights=str(path)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_encoder_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError) as info:
        load_encoder(EncoderConfig(name="test_vit", kwargs={"img_size": VIT_SIZE}, weights=str(path)))
    assert str(path) in str(info.value)


def test_load_encoder_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_encoder(EncoderConfig(name="test_resnet", weights=str(path)))
    assert str(path) in str(info.value)


def test_transparent_pixels_become_what_the_weights_saw():
    """Without a background alpha is dropped (open_clip's convert("RGB"), OpenFlamingo's towers); with
    one (IDEFICS: white) transparent pixels are composited on it. RGB and opaque images are untouched."""
    from flamingo_cli.formats.checkpoint import encoder_identity
    from flamingo_cli.model.vision_encoder import to_rgb

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.array([0, 128, 255, 255], np.uint8), (8, 2))))
    dropped, white = np.asarray(to_rgb(rgba), int), np.asarray(to_rgb(rgba, (255, 255, 255)), int)
    assert (dropped == np.asarray(rgb)).all()
    assert (white[:, 0::4] == 255).all()  # alpha 0: the background
    assert (abs(white[:, 1::4] - (np.asarray(rgb, int)[:, 1::4] * 128 + 255 * 127) / 255) <= 1).all()
    assert (white[:, 2::4] == np.asarray(rgb)[:, 2::4]).all()  # opaque: the pixel
    assert to_rgb(rgb, (255, 255, 255)) is rgb
    grey = rgb.convert("L")
    assert np.array_equal(np.asarray(to_rgb(grey, (255, 255, 255))), np.asarray(grey.convert("RGB")))

    plain = _vit()
    white_bg = _vit(preprocess={"background": [255, 255, 255]})
    assert torch.equal(plain.transform()(rgba), plain.transform()(rgb))
    assert not torch.equal(white_bg.transform()(rgba), white_bg.transform()(rgb))
    assert torch.equal(white_bg.transform()(rgb), plain.transform()(rgb))  # timm never sees the key
    assert encoder_identity(plain.config) != encoder_identity(white_bg.config)  # other pixels, other features
