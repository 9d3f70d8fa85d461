"""The options that make our blocks IDEFICS's (transformers' IdeficsForVisionText2Text), checked
against transformers' own modules with the weights copied across, and the defaults unchanged."""
from types import SimpleNamespace

import pytest
import torch
from conftest import ids_for, set_gates, tiny_config, visual_tokens
from transformers import AutoModelForCausalLM, IdeficsConfig
from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids_pt,
                                                            incremental_to_binary_attention_mask)

from flamingo_cli.errors import ConfigError
from flamingo_cli.inference.scoring import _images_before, score_candidates
from flamingo_cli.model.config import FlamingoConfig, ResamplerConfig, XAttnConfig
from flamingo_cli.model.masking import image_index
from flamingo_cli.model.resampler import PerceiverResampler
from flamingo_cli.model.xattn import GatedXAttnDense
from flamingo_cli.training.trainer import gate_values

torch.set_num_threads(1)

HIDDEN, HEADS, FF_DIM, VISION, EPS = 32, 4, 48, 16, 1e-6
IMAGE, EOS = 5, 1  # token ids of the sequences the masking tests make up


def _idefics_config(*, qk_norm=False, gate="float", qk_norm_perceiver=False) -> IdeficsConfig:
    config = IdeficsConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=FF_DIM, rms_norm_eps=EPS,
                           qk_layer_norms=qk_norm, alpha_type=gate, alpha_initializer="zeros",
                           vision_config=dict(embed_dim=VISION, num_attention_heads=2),
                           perceiver_config=dict(qk_layer_norms_perceiver=qk_norm_perceiver))
    config._attn_implementation = "eager"
    return config


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter drawn afresh, norm weights and gates included: ones and zeros would hide a
    wrong mapping. Matrices at 1/sqrt(fan-in), so activations stay O(1) and 1e-5 is float32 rounding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.ndim == 2 else 0.5))


# -- GATED XATTN-DENSE against IdeficsGatedCrossAttentionLayer --------------------------------

def _xattn_from_idefics(theirs: IdeficsGatedCrossAttentionLayer) -> dict[str, torch.Tensor]:
    """Their block's state under our names (the mapping an importer makes)."""
    s = theirs.state_dict()
    out = {
        "attn.norm.weight": s["input_layernorm.weight"],
        "attn.to_q.weight": s["cross_attn.q_proj.weight"],
        "attn.to_kv.weight": torch.cat([s["cross_attn.k_proj.weight"], s["cross_attn.v_proj.weight"]]),
        "attn.to_out.weight": s["cross_attn.o_proj.weight"],
        "attn_gate": s["alpha_cross_attn"].reshape(-1),  # (1) or (1, 1, H) -> (1) or (H)
        "ff_gate": s["alpha_dense"].reshape(-1),
        "ff.norm.weight": s["post_attention_layernorm.weight"],
        "ff.gate.weight": s["mlp.gate_proj.weight"],
        "ff.up.weight": s["mlp.up_proj.weight"],
        "ff.down.weight": s["mlp.down_proj.weight"],
    }
    for ours, their in (("attn.q_norm.weight", "cross_attn.q_layer_norm.weight"),
                        ("attn.k_norm.weight", "cross_attn.k_layer_norm.weight")):
        if their in s:
            out[ours] = s[their]
    return out


def _idefics_image_mask(phi: torch.Tensor, images: int, latents: int):
    """phi (b, t) -> IDEFICS's additive image_attention_mask (b, 1, t, m * l) and cross_attention_gate
    (b, t), built as IdeficsModel.forward builds them from the processor's (b, t, m) 0/1 mask."""
    binary = torch.nn.functional.one_hot(phi, images + 1)[..., 1:]  # phi = 0 -> a row of zeros
    expanded = binary[..., None].expand(-1, -1, -1, latents).reshape(*binary.shape[:2], -1)
    additive = torch.where(expanded[:, None].bool(), 0.0, torch.finfo(torch.float32).min)
    return additive, (additive == 0.0).any(dim=-1).squeeze(1).float()


def xattn_parity(qk_norm: bool, gate: str) -> float:
    """max |ours - theirs| over a batch with three images, tokens before any image, and a
    second chunk that reuses the first chunk's cached visual K/V."""
    theirs = IdeficsGatedCrossAttentionLayer(_idefics_config(qk_norm=qk_norm, gate=gate), layer_idx=0).eval()
    _randomise(theirs, seed=1)
    config = XAttnConfig(heads=HEADS, dim_head=HIDDEN // HEADS, norm="rmsnorm", norm_eps=EPS, qk_norm=qk_norm,
                         ff="swiglu", ff_dim=FF_DIM, gate="scalar" if gate == "float" else "vector")
    ours = GatedXAttnDense(dim=HIDDEN, dim_visual=VISION, config=config).eval()
    ours.load_state_dict(_xattn_from_idefics(theirs), strict=True)

    b, t, m, l = 2, 11, 3, 4
    g = torch.Generator().manual_seed(2)
    y = torch.randn(b, t, HIDDEN, generator=g)
    visual = torch.randn(b, m, l, VISION, generator=g)
    phi = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3],
                        [0, 1, 1, 0, 0, 0, 3, 3, 3, 3, 3]])  # 0 after a reset, as the processor makes it
    mask, cross_gate = _idefics_image_mask(phi, m, l)
    with torch.no_grad():
        expected = theirs(y, image_hidden_states=visual.reshape(b, m * l, VISION), image_attention_mask=mask,
                          cross_attention_gate=cross_gate)
        cache = {}
        got = torch.cat([ours(y[:, :7], visual, phi[:, :7], kv_cache=cache),
                         ours(y[:, 7:], visual, phi[:, 7:], kv_cache=cache)], dim=1)  # one image each: fast path
    return float((got - expected).abs().max())


@pytest.mark.parametrize("gate", ["float", "vector"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_gated_xattn_dense_matches_idefics(qk_norm, gate):
    assert xattn_parity(qk_norm, gate) < 1e-5


# -- Perceiver Resampler against IdeficsPerceiverResampler ------------------------------------

def _resampler_from_idefics(theirs: IdeficsPerceiverResampler, depth: int) -> dict[str, torch.Tensor]:
    s = theirs.state_dict()
    out = {"latents": s["latents"], "norm.weight": s["layer_norm.weight"], "norm.bias": s["layer_norm.bias"]}
    for k in range(depth):
        a, f = f"blocks.{k}.0", f"blocks.{k}.1"
        out[f"layers.{k}.0.to_q.weight"] = s[f"{a}.q_proj.weight"]
        out[f"layers.{k}.0.to_kv.weight"] = torch.cat([s[f"{a}.k_proj.weight"], s[f"{a}.v_proj.weight"]])
        out[f"layers.{k}.0.to_out.weight"] = s[f"{a}.output_proj.weight"]
        names = {"norm_media": "context_layer_norm", "norm_latents": "latents_layer_norm",
                 "q_norm": "q_layer_norm", "k_norm": "k_layer_norm"}
        for ours, their in names.items():
            for p in ("weight", "bias"):
                if f"{a}.{their}.{p}" in s:
                    out[f"layers.{k}.0.{ours}.{p}"] = s[f"{a}.{their}.{p}"]
        for ours, their in (("0", "ln"), ("1", "fc"), ("3", "c_proj")):
            for p in ("weight", "bias"):
                if f"{f}.{their}.{p}" in s:
                    out[f"layers.{k}.1.{ours}.{p}"] = s[f"{f}.{their}.{p}"]
    return out


def resampler_parity(qk_norm: bool) -> float:
    depth, heads, dim_head, latents = 2, 2, 8, 4
    theirs = IdeficsPerceiverResampler(_idefics_config(qk_norm_perceiver=qk_norm), VISION, depth, heads, dim_head,
                                       latents).eval()
    _randomise(theirs, seed=3)
    ours = PerceiverResampler(ResamplerConfig(dim=VISION, depth=depth, heads=heads, dim_head=dim_head,
                                              num_latents=latents, ff_mult=4, max_frames=0, activation="relu",
                                              qk_norm=qk_norm)).eval()
    ours.load_state_dict(_resampler_from_idefics(theirs, depth), strict=True)
    features = torch.randn(3, 7, VISION, generator=torch.Generator().manual_seed(4))  # (images, tokens, d)
    with torch.no_grad():
        return float((ours(features[:, None]) - theirs(features)).abs().max())


@pytest.mark.parametrize("qk_norm", [False, True])
def test_perceiver_resampler_matches_idefics(qk_norm):
    assert resampler_parity(qk_norm) < 1e-5


# -- the EOS reset against IDEFICS's processor ------------------------------------------------

def _sequences() -> torch.Tensor:
    """Hand-made corner cases, then random ones over a small vocabulary dense in <image> and EOS."""
    made = torch.tensor([
        [2, 3, IMAGE, 4, 4, EOS, 3, 3, IMAGE, 4, EOS, 3],  # the processor's own example's shape
        [EOS, 3, IMAGE, EOS, IMAGE, 3, EOS, EOS, 3, IMAGE, IMAGE, EOS],  # EOS first, twice, just before <image>
        [IMAGE, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, EOS],  # EOS last
        [2, 3, 4, 3, EOS, 3, 4, 3, 4, 3, 4, 3],  # no image at all
    ])
    g = torch.Generator().manual_seed(5)
    return torch.cat([made, torch.randint(0, 7, (300, made.shape[1]), generator=g)])


def _processor_masks(ids: torch.Tensor):
    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: {"<image>": IMAGE}[token], eos_token_id=EOS)
    last, upcoming = image_attention_mask_for_packed_input_ids_pt(ids, tokenizer)
    return last, upcoming  # 0-based image index, -1 for none


def test_eos_reset_matches_the_idefics_processor():
    ids = _sequences()
    last, upcoming = _processor_masks(ids)
    phi = image_index(ids, IMAGE, reset_token_id=EOS)
    images = int((ids == IMAGE).sum(1).max())
    binary = incremental_to_binary_attention_mask(last.clone(), "pt", num_classes=images)  # (b, t, m), the model's
    assert torch.equal(torch.nn.functional.one_hot(phi, images + 1)[..., 1:], binary)
    assert torch.equal(phi, last + 1)
    # Its mirror for text attending to the next image, which IDEFICS computes and then drops.
    nxt = image_index(ids, IMAGE, next_image=torch.ones(len(ids), dtype=torch.bool), reset_token_id=EOS)
    assert torch.equal(nxt, upcoming + 1)


def test_eos_reset_continues_exactly_from_images_before():
    """Every cut of every sequence: the continuation's phi from images_before equals the whole
    sequence's, with images_before 0 where the prefix ends in a reset (the scoring rule)."""
    ids = _sequences()
    whole = image_index(ids, IMAGE, reset_token_id=EOS)
    model = SimpleNamespace(image_token_id=IMAGE, reset_token_id=EOS)
    checked = 0
    for cut in range(1, ids.shape[1]):
        count = (ids[:, :cut] == IMAGE).sum(1)
        before = torch.tensor([_images_before(model, row.tolist()) for row in ids[:, :cut]])
        rest = image_index(ids[:, cut:], IMAGE, images_before=before, reset_token_id=EOS)
        exact = (before == count) | ~(ids[:, cut:] == IMAGE).any(1)  # the stated limit: a reset prefix, an <image>
        assert torch.equal(rest[exact], whole[exact, cut:]), cut
        # The prefix cache cuts just before an <image> and passes the count: exact, reset or not.
        cached = ids[:, cut] == IMAGE
        rest = image_index(ids[cached, cut:], IMAGE, images_before=count[cached], reset_token_id=EOS)
        assert torch.equal(rest, whole[cached, cut:]), cut
        checked += int(exact.sum()) + int(cached.sum())
    assert checked > 2000


def test_scoring_with_the_eos_reset_equals_the_whole_sequence(make_model):
    model = make_model(gates=0.7, reset_after_eos=True)
    eos = model.tokenizer.eos_token
    visual = visual_tokens(1, 2)
    candidates = [f"red{eos} a star", "green", f"a{eos}"]  # holding EOS then text: one row each
    for prompt in (f"<image>a red circle{eos}What colour is the shape?",  # ends in a reset
                   f"<image>a red circle{eos}<image>What colour is the shape?"):
        ids = ids_for(model, prompt)
        scores = score_candidates(model, ids, visual, candidates)
        for candidate, score in zip(candidates, scores):
            tokens = model.tokenizer(f" {candidate}<|endofchunk|>", add_special_tokens=False).input_ids
            whole = torch.cat([ids, torch.tensor([tokens])], dim=1)
            with torch.no_grad():
                logp = model(whole, visual).logits[0, ids.shape[1] - 1:-1].log_softmax(-1)
            assert score == pytest.approx(float(logp.gather(-1, torch.tensor(tokens)[:, None]).sum()), abs=1e-4)


# -- through the whole model ------------------------------------------------------------------

IDEFICS_BLOCK = dict(norm="rmsnorm", norm_eps=EPS, qk_norm=True, ff="swiglu", ff_dim=FF_DIM, gate="vector")


def test_idefics_block_runs_in_the_model_and_starts_as_the_bare_lm(make_model, lm_dir):
    model = make_model(gates=0.0, **IDEFICS_BLOCK)
    bare = AutoModelForCausalLM.from_pretrained(lm_dir("llama")).eval()
    ids = ids_for(model, "<image>a red circle<|endofchunk|><image>a")
    vocab = bare.get_input_embeddings().num_embeddings
    with torch.no_grad():
        embeds = model.lm.get_input_embeddings()(ids)
        assert torch.equal(model(ids, visual_tokens(1, 2)).logits[..., :vocab], bare(inputs_embeds=embeds).logits)
    set_gates(model, 0.5)
    assert model.generate(ids, visual_tokens(1, 2), num_beams=2, max_new_tokens=3).shape[0] == 1
    gates = gate_values(model)  # a vector gate's mean
    assert [g["attn"] for g in gates.values()] == pytest.approx([float(torch.tensor(0.5).tanh())] * len(gates))


def test_idefics_block_names_its_weights_for_an_importer():
    block = GatedXAttnDense(dim=HIDDEN, dim_visual=VISION, config=XAttnConfig(heads=HEADS, dim_head=8, **IDEFICS_BLOCK))
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == {
        "attn.norm.weight": (HIDDEN,), "attn.to_q.weight": (32, HIDDEN), "attn.to_kv.weight": (64, VISION),
        "attn.to_out.weight": (HIDDEN, 32), "attn.q_norm.weight": (8,), "attn.k_norm.weight": (8,),
        "attn_gate": (HIDDEN,), "ff.norm.weight": (HIDDEN,), "ff.gate.weight": (FF_DIM, HIDDEN),
        "ff.up.weight": (FF_DIM, HIDDEN), "ff.down.weight": (HIDDEN, FF_DIM), "ff_gate": (HIDDEN,)}


def test_reset_after_eos_needs_an_eos_token(lm_dir):
    from transformers import AutoTokenizer

    from flamingo_cli.model.flamingo import Flamingo

    path = lm_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="end-of-sequence"):
        Flamingo(tiny_config(path, reset_after_eos=True), AutoModelForCausalLM.from_pretrained(path), tokenizer)


# -- defaults unchanged -----------------------------------------------------------------------

def test_defaults_keep_todays_state_dict_names():
    block = GatedXAttnDense(dim=HIDDEN, dim_visual=VISION, config=XAttnConfig(heads=HEADS, dim_head=8))
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == {
        "attn.norm.weight": (HIDDEN,), "attn.norm.bias": (HIDDEN,), "attn.to_q.weight": (32, HIDDEN),
        "attn.to_kv.weight": (64, VISION), "attn.to_out.weight": (HIDDEN, 32), "attn_gate": (1,),
        "ff.0.weight": (HIDDEN,), "ff.0.bias": (HIDDEN,), "ff.1.weight": (4 * HIDDEN, HIDDEN),
        "ff.3.weight": (HIDDEN, 4 * HIDDEN), "ff_gate": (1,)}
    assert block.attn.norm.eps == block.ff[0].eps == 1e-5  # nn.LayerNorm's own
    resampler = PerceiverResampler(ResamplerConfig(dim=VISION, depth=1, heads=2, dim_head=8, num_latents=4,
                                                   max_frames=2))
    assert list(resampler.state_dict()) == [
        "latents", "time_embs", "layers.0.0.norm_media.weight", "layers.0.0.norm_media.bias",
        "layers.0.0.norm_latents.weight", "layers.0.0.norm_latents.bias", "layers.0.0.to_q.weight",
        "layers.0.0.to_kv.weight", "layers.0.0.to_out.weight", "layers.0.1.0.weight", "layers.0.1.0.bias",
        "layers.0.1.1.weight", "layers.0.1.3.weight", "norm.weight", "norm.bias"]


def test_a_config_written_before_the_options_reads_as_the_defaults():
    old = FlamingoConfig().to_dict()
    new = {"norm", "norm_eps", "qk_norm", "ff", "ff_dim", "gate", "reset_after_eos"}
    assert new <= set(old["xattn"]) and "qk_norm" in old["resampler"]
    for name in new:
        del old["xattn"][name]
    del old["resampler"]["qk_norm"]
    assert FlamingoConfig.from_dict(old) == FlamingoConfig()
    assert FlamingoConfig.from_dict(FlamingoConfig().to_dict()) == FlamingoConfig()


@pytest.mark.parametrize("part, field, value", [
    ("xattn", "norm", "batchnorm"), ("xattn", "norm_eps", 0.0), ("xattn", "norm_eps", "1e-6"),
    ("xattn", "ff", "geglu"), ("xattn", "ff_dim", 0),
    ("xattn", "gate", "matrix"), ("xattn", "qk_norm", "yes"), ("xattn", "reset_after_eos", 1),
    ("resampler", "activation", "tanh"), ("resampler", "qk_norm", "no"),
])
def test_each_bad_option_is_one_clear_config_error(part, field, value):
    data = FlamingoConfig().to_dict()
    data[part][field] = value
    with pytest.raises(ConfigError, match=f"{part}.{field} must"):
        FlamingoConfig.from_dict(data)
