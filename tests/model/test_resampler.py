"""PerceiverResampler: fixed-size visual tokens from any number of patches and frames."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from flamingo_cli.model.config import ResamplerConfig
from flamingo_cli.model.resampler import PerceiverAttention, PerceiverResampler, SquaredReLU

DIM = 32
LATENTS = 5
TOKENS = 6


def _config(**overrides) -> ResamplerConfig:
    values = dict(dim=DIM, depth=2, heads=2, dim_head=8, num_latents=LATENTS, ff_mult=2, max_frames=8)
    values.update(overrides)
    return ResamplerConfig(**values)


def _resampler(seed: int = 0, random_time: bool = False, **overrides) -> PerceiverResampler:
    torch.manual_seed(seed)
    r = PerceiverResampler(_config(**overrides)).eval()
    if random_time and r.time_embs is not None:
        with torch.no_grad():
            r.time_embs.normal_()
    return r


def _features(*shape: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------- shapes


def test_image_shape():
    r = _resampler()
    out = r(_features(3, 1, TOKENS, DIM))
    assert out.shape == (3, LATENTS, DIM)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("frames", range(1, 9))
def test_video_shape_is_fixed(frames):
    r = _resampler(random_time=True)
    out = r(_features(2, frames, TOKENS, DIM))
    assert out.shape == (2, LATENTS, DIM)
    assert torch.isfinite(out).all()


def test_token_count_does_not_change_output_shape():
    r = _resampler()
    for n in (1, 7, 50):
        assert r(_features(2, 1, n, DIM)).shape == (2, LATENTS, DIM)


def test_batch_elements_are_independent():
    r = _resampler(random_time=True)
    x = _features(3, 2, TOKENS, DIM)
    out = r(x)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], r(x[i : i + 1]), atol=1e-5, rtol=0)
    assert not torch.allclose(out[0], out[1])


def test_five_dim_input_equals_each_medium_separately():
    r = _resampler(random_time=True)
    x = _features(2, 3, 4, TOKENS, DIM)  # 2 sequences of 3 media of 4 frames
    out = r(x)
    assert out.shape == (2, 3, LATENTS, DIM)
    for b in range(2):
        for m in range(3):
            torch.testing.assert_close(out[b, m], r(x[b, m : m + 1])[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.flatten(0, 1), r(x.flatten(0, 1)), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- temporal embeddings


def test_more_frames_than_max_frames():
    r = _resampler(random_time=True, max_frames=8)
    x = _features(2, 12, TOKENS, DIM)
    out = r(x)
    assert out.shape == (2, LATENTS, DIM)
    assert torch.isfinite(out).all()
    # The interpolated embeddings are what gets added: adding them by hand to a resampler
    # without temporal embeddings gives the same result.
    plain = _resampler(max_frames=0)
    state = {k: v for k, v in r.state_dict().items() if k != "time_embs"}
    plain.load_state_dict(state)
    shifted = x + r.time_embeddings(12).detach()[None, :, None, :]
    torch.testing.assert_close(out, plain(shifted), atol=1e-5, rtol=0)


def test_time_embeddings_exact_and_truncated():
    r = _resampler(random_time=True, max_frames=8)
    assert r.time_embs.shape == (8, DIM)
    assert torch.equal(r.time_embeddings(8), r.time_embs)
    assert torch.equal(r.time_embeddings(3), r.time_embs[:3])


@pytest.mark.parametrize("frames", [9, 12, 15, 29])
def test_time_embeddings_interpolated(frames):
    r = _resampler(random_time=True, max_frames=8)
    embs = r.time_embs.detach()
    t = r.time_embeddings(frames).detach()
    assert t.shape == (frames, DIM)
    torch.testing.assert_close(t[0], embs[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(t[-1], embs[-1], atol=1e-6, rtol=0)
    # Linear interpolation with aligned corners: frame i sits at position i * 7 / (frames - 1).
    pos = torch.arange(frames, dtype=torch.float64) * 7 / (frames - 1)
    lo = pos.floor().long().clamp(max=6)
    frac = (pos - lo).unsqueeze(1)
    expected = embs.double()[lo] * (1 - frac) + embs.double()[lo + 1] * frac
    torch.testing.assert_close(t.double(), expected, atol=1e-5, rtol=0)


def test_time_embeddings_start_standard_normal_and_are_trainable():
    torch.manual_seed(0)
    r = PerceiverResampler(_config(max_frames=64, dim=256))
    assert r.time_embs.requires_grad
    embs = r.time_embs.detach()
    assert abs(embs.mean().item()) < 0.02 and abs(embs.std().item() - 1) < 0.02
    assert torch.cdist(embs, embs).fill_diagonal_(float("inf")).min() > 10  # no two frames alike
    assert PerceiverResampler(_config(max_frames=0)).time_embs is None


# ---------------------------------------------------------------- position (in)variance


def test_no_spatial_position_encoding():
    r = _resampler(random_time=True)
    x = _features(2, 3, TOKENS, DIM)
    perm = torch.randperm(TOKENS, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(perm, torch.arange(TOKENS))
    torch.testing.assert_close(r(x[:, :, perm]), r(x), atol=1e-5, rtol=0)
    # Each frame permuted differently as well.
    y = x.clone()
    y[:, 1] = x[:, 1].flip(1)
    torch.testing.assert_close(r(y), r(x), atol=1e-5, rtol=0)


def test_swapping_frames_changes_output_with_time_embeddings():
    r = _resampler(random_time=True)
    x = _features(2, 3, TOKENS, DIM)
    swapped = x[:, [1, 0, 2]]
    assert not torch.allclose(r(swapped), r(x), atol=1e-3)


def test_swapping_frames_without_time_embeddings_is_invariant():
    r = _resampler(max_frames=0)
    assert r.time_embs is None
    x = _features(2, 3, TOKENS, DIM)
    torch.testing.assert_close(r(x[:, [1, 0, 2]]), r(x), atol=1e-5, rtol=0)
    # Without time embeddings, frames are just more tokens: one frame of all of them is the same.
    torch.testing.assert_close(r(x.reshape(2, 1, 3 * TOKENS, DIM)), r(x), atol=1e-5, rtol=0)


def test_swapping_frames_with_zero_time_embeddings_is_invariant():
    r = _resampler()
    x = _features(2, 3, TOKENS, DIM)
    assert not torch.allclose(r(x[:, [2, 1, 0]]), r(x), atol=1e-3)  # fresh ones already tell the frames apart
    with torch.no_grad():
        r.time_embs.zero_()
    torch.testing.assert_close(r(x[:, [2, 1, 0]]), r(x), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- attention


def _manual_attention(attn: PerceiverAttention, x: torch.Tensor, latents: torch.Tensor, dim_head: int) -> torch.Tensor:
    h = attn.heads
    xn = F.layer_norm(x, (x.shape[-1],), attn.norm_media.weight, attn.norm_media.bias, attn.norm_media.eps)
    ln = F.layer_norm(latents, (latents.shape[-1],), attn.norm_latents.weight, attn.norm_latents.bias, attn.norm_latents.eps)
    q = ln @ attn.to_q.weight.T
    kv = torch.cat([xn, ln], dim=1) @ attn.to_kv.weight.T
    k, v = kv[..., : h * dim_head], kv[..., h * dim_head :]
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=h) for t in (q, k, v))
    weights = torch.softmax((q @ k.transpose(-1, -2)) * dim_head**-0.5, dim=-1)
    out = rearrange(weights @ v, "b h l d -> b l (h d)")
    return out @ attn.to_out.weight.T


def test_attention_keys_are_features_and_latents():
    torch.manual_seed(0)
    dim_head = 8
    attn = PerceiverAttention(dim=DIM, heads=4, dim_head=dim_head)
    with torch.no_grad():  # non-default norms, so that swapping norm_media/norm_latents is caught
        for norm in (attn.norm_media, attn.norm_latents):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    x = _features(2, 7, DIM, seed=4)
    latents = _features(2, 3, DIM, seed=5)
    with torch.no_grad():
        out = attn(x, latents)
        expected = _manual_attention(attn, x, latents, dim_head)
    assert out.shape == (2, 3, DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)

    # Features-only keys (the original Perceiver) give a different answer.
    with torch.no_grad():
        xn = attn.norm_media(x)
        ln = attn.norm_latents(latents)
        q = rearrange(attn.to_q(ln), "b n (h d) -> b h n d", h=4)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=4) for t in attn.to_kv(xn).chunk(2, dim=-1))
        features_only = attn.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))
    assert not torch.allclose(out, features_only, atol=1e-3)


def test_resampler_layer_structure_matches_manual_forward():
    r = _resampler(random_time=True, depth=2)
    x = _features(2, 3, TOKENS, DIM)
    with torch.no_grad():
        h = x + r.time_embs[:3][None, :, None, :]
        h = h.reshape(2, 3 * TOKENS, DIM)
        lat = r.latents.expand(2, -1, -1)
        for attn, ff in r.layers:
            lat = lat + _manual_attention(attn, h, lat, r.config.dim_head)
            lat = lat + ff(lat)
        expected = r.norm(lat)
    torch.testing.assert_close(r(x), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- errors, activation, final norm


@pytest.mark.parametrize("shape", [(2, 1, TOKENS, DIM + 8), (2, 1, TOKENS, DIM // 2)])
def test_wrong_feature_width_raises(shape):
    r = _resampler()
    with pytest.raises(ValueError, match=rf", {DIM}\)"):
        r(_features(*shape))


@pytest.mark.parametrize("shape", [(2, TOKENS, DIM), (DIM,), (1, 1, 1, 1, 1, DIM)])
def test_wrong_rank_raises(shape):
    r = _resampler()
    with pytest.raises(ValueError, match=str(DIM)):
        r(_features(*shape))


def test_sqrelu_activation():
    gelu = _resampler(activation="gelu")
    sq = _resampler(activation="sqrelu")
    assert isinstance(sq.layers[0][1][2], SquaredReLU)
    assert isinstance(gelu.layers[0][1][2], torch.nn.GELU)
    sq.load_state_dict(gelu.state_dict())  # same parameters, only the activation differs
    x = _features(2, 2, TOKENS, DIM)
    out = sq(x)
    assert out.shape == (2, LATENTS, DIM)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, gelu(x), atol=1e-3)
    t = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    assert torch.equal(SquaredReLU()(t), torch.tensor([0.0, 0.0, 0.0, 0.25, 9.0]))


def test_output_is_layer_normalised():
    r = _resampler(random_time=True)
    assert torch.equal(r.norm.weight, torch.ones(DIM))
    assert torch.equal(r.norm.bias, torch.zeros(DIM))
    out = r(_features(3, 2, TOKENS, DIM) * 10 + 3)
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, LATENTS), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(3, LATENTS), atol=1e-3, rtol=0)


def test_latents_are_learned_and_gradients_reach_them():
    r = _resampler(random_time=True)
    r.train()
    x = _features(2, 3, TOKENS, DIM)
    r(x).pow(2).sum().backward()
    assert r.latents.grad is not None and r.latents.grad.abs().sum() > 0
    assert r.time_embs.grad is not None and r.time_embs.grad.abs().sum() > 0
    assert r.latents.shape == (LATENTS, DIM)
