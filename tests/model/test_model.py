"""The Flamingo model over tiny LMs of every supported family."""
import threading

import pytest
import torch
from conftest import cache_of, ids_for, visual_tokens
from transformers import AutoModelForCausalLM

from flamingo_cli.model.lm import xattn_layer_indices
from flamingo_cli.model.flamingo import lm_loss
from flamingo_cli.tiny import FAMILIES

PROMPT = "<image>a red circle<|endofchunk|><image>a green square<|endofchunk|><image>a"


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_give_the_bare_lm_logits(make_model, lm_dir, family):
    model = make_model(family, gates=0.0)
    bare = AutoModelForCausalLM.from_pretrained(lm_dir(family)).eval()
    vocab = bare.get_input_embeddings().num_embeddings
    with torch.no_grad():
        # Text only: the LM's own ids, exactly the LM's logits.
        ids = ids_for(model, "What colour is the shape? red")
        assert torch.equal(model(ids).logits[..., :vocab], bare(ids).logits)
        # With images: same embeddings in (including the new <image> rows), same logits out.
        ids = ids_for(model, PROMPT)
        embeds = model.lm.get_input_embeddings()(ids)
        logits = model(ids, visual_tokens(1, 3)).logits
        assert torch.equal(logits[..., :vocab], bare(inputs_embeds=embeds).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_xattn_placement_and_layer_discovery(make_model, family):
    assert list(make_model(family).xattn) == ["0", "2"]
    assert list(make_model(family, placement="openflamingo").xattn) == ["1", "3"]


def test_layer_index_rules():
    assert xattn_layer_indices(24, 1, "paper") == list(range(24))
    assert xattn_layer_indices(40, 4, "paper") == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert xattn_layer_indices(32, 4, "openflamingo") == [3, 7, 11, 15, 19, 23, 27, 31]


def _first_block_attention(model, ids, visual):
    """Output of the first block's cross-attention: its input does not depend on the images,
    so differences here are exactly the direct effect of each image."""
    captured = {}
    handle = model.xattn["0"].attn.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(ids, visual)
    handle.remove()
    return captured["out"][0]  # (t, d)


@pytest.mark.parametrize("masking", ["last_image", "all_previous"])
def test_changing_image_j_changes_only_its_tokens(make_model, masking):
    model = make_model("llama", gates=0.5, masking=masking)
    ids = ids_for(model, "before " + PROMPT)
    phi = (ids[0] == model.image_token_id).long().cumsum(0)
    visual = visual_tokens(1, 3)
    base = _first_block_attention(model, ids, visual)
    assert torch.all(base[phi == 0] == 0), "tokens before the first image get no cross-attention output"
    for j in (1, 2, 3):
        changed = visual.clone()
        changed[:, j - 1] = torch.randn_like(changed[:, j - 1])
        moved = (_first_block_attention(model, ids, changed) - base).abs().amax(-1) > 0
        expected = phi == j if masking == "last_image" else phi >= j
        assert torch.equal(moved, expected), f"image {j}"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_image_reaches_tokens_before_the_first_image(make_model, family):
    model = make_model(family, gates=0.7)
    ids = ids_for(model, "a short text before any image " + PROMPT)
    first = int((ids[0] == model.image_token_id).nonzero()[0])
    with torch.no_grad():
        a = model(ids, visual_tokens(1, 3, seed=1)).logits
        b = model(ids, visual_tokens(1, 3, seed=2)).logits
    assert torch.equal(a[:, :first], b[:, :first])
    assert not torch.allclose(a[:, first:], b[:, first:])


def _expected_trainable(model) -> int:
    r, x = model.config.resampler, model.config.xattn
    d, inner = r.dim, r.heads * r.dim_head
    ffw = lambda w, mult: 2 * w + 2 * w * w * mult  # noqa: E731  LayerNorm + two bias-free linears
    resampler = r.num_latents * d + r.max_frames * d + 2 * d + r.depth * (4 * d + 4 * d * inner + ffw(d, r.ff_mult))
    D = model.lm.config.get_text_config().hidden_size
    xinner = x.heads * x.dim_head
    block = 2 * D + D * xinner + d * 2 * xinner + xinner * D + 2 + ffw(D, x.ff_mult)
    emb = model.lm.get_input_embeddings().base
    tied = model.lm.get_output_embeddings().base.weight is emb.weight
    rows = len(model.config.special_tokens) * emb.embedding_dim * (1 if tied else 2)
    return resampler + len(model.xattn) * block + rows


@pytest.mark.parametrize("family", FAMILIES)
def test_only_resampler_xattn_and_new_rows_train(make_model, family):
    model = make_model(family).train()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.trainable_parameters()}
    assert sum(p.numel() for p in model.trainable_parameters()) == _expected_trainable(model)

    ids = ids_for(model, PROMPT)
    features = torch.randn(1, 3, 1, 9, model.config.resampler.dim)
    frozen_before = {n: p.clone() for n, p in model.lm.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    loss = lm_loss(model(ids, model.resample(features)).logits, ids)
    loss.backward()
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(float(b.attn_gate.grad.abs()) > 0 for b in model.xattn.values())
    optimizer.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.lm.named_parameters())
    assert not model.lm.training


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_incremental_decode_matches_full_forward(make_model, family):
    model = make_model(family, gates=0.5)
    ids = ids_for(model, PROMPT + " blue star<|endofchunk|>")
    visual = visual_tokens(1, 3)
    split = 5
    with torch.no_grad():
        full = model(ids, visual).logits
        out = model(ids[:, :split], visual, use_cache=True)
        steps = [out.logits]
        for t in range(split, ids.shape[1]):
            images_before = (ids[:, :t] == model.image_token_id).sum(1)
            out = model(ids[:, t:t + 1], visual, cache=cache_of(out), use_cache=True, images_before=images_before)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_greedy_generate_matches_a_plain_argmax_loop(make_model, family):
    model = make_model(family, gates=0.5)
    ids = ids_for(model, PROMPT)
    visual = visual_tokens(1, 3)
    generated = model.generate(ids, visual, num_beams=1, max_new_tokens=6)
    seq = ids
    with torch.no_grad():
        for _ in range(generated.shape[1]):
            logits = model(seq, visual).logits[:, -1]
            logits[:, model.image_token_id] = -float("inf")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(seq[:, ids.shape[1]:], generated)
    assert generated.shape[1] == 6 or int(generated[0, -1]) in (model.eoc_token_id, model.tokenizer.eos_token_id)


def test_beam_search_returns_a_hypothesis_at_least_as_likely_as_greedy(make_model):
    model = make_model("llama", gates=0.5)
    ids, visual = ids_for(model, PROMPT), visual_tokens(1, 3)
    greedy = model.generate(ids, visual, num_beams=1, max_new_tokens=6)
    beams = model.generate(ids, visual, num_beams=3, max_new_tokens=6)
    assert beams.shape[0] == 1 and 1 <= beams.shape[1] <= 6
    # Beam search returns its best hypothesis: at least as likely as the greedy one.
    def logprob(new):
        seq = torch.cat([ids, new], dim=1)
        with torch.no_grad():
            logp = model(seq, visual).logits.log_softmax(-1)[0, ids.shape[1] - 1:-1]
        return float(logp.gather(-1, new[0, :, None]).sum())
    if beams.shape[1] == greedy.shape[1]:
        assert logprob(beams) >= logprob(greedy) - 1e-4


def _force_end_of_chunk(model, ids, visual):
    """Point the <|endofchunk|> output row at the prompt's last hidden state, so it wins at once."""
    with torch.no_grad():
        hidden = model.lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        row = model.eoc_token_id - model.new_tokens.first_id
        model.new_tokens.output_rows[row] = 1e3 * hidden / hidden.norm() ** 2


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_stops_at_end_of_chunk(make_model, num_beams):
    model = make_model("llama", gates=0.0)  # zero gates: the LM alone decides, so the forcing is exact
    ids, visual = ids_for(model, PROMPT), visual_tokens(1, 3)
    _force_end_of_chunk(model, ids, visual)
    out = model.generate(ids, visual, num_beams=num_beams, max_new_tokens=8)
    assert out.tolist() == [[model.eoc_token_id]]


def test_batched_generation_with_left_padding_matches_single(make_model):
    model = make_model("llama", gates=0.5)
    model.tokenizer.padding_side = "left"
    texts = [PROMPT, "<image>a blue<|endofchunk|><image>a"]
    batch = model.tokenizer(texts, return_tensors="pt", padding=True)
    visual = visual_tokens(2, 3)
    out = model.generate(batch.input_ids, visual, attention_mask=batch.attention_mask, num_beams=1, max_new_tokens=4)
    for i, text in enumerate(texts):
        single = model.generate(ids_for(model, text), visual[i:i + 1], num_beams=1, max_new_tokens=4)
        assert out[i, :single.shape[1]].tolist() == single[0].tolist()


def test_two_models_and_two_threads_do_not_interfere(make_model):
    a, b = make_model("llama", gates=0.5, seed=1), make_model("gpt2", gates=0.5, seed=2)
    ids_a, ids_b = ids_for(a, PROMPT), ids_for(b, PROMPT)
    va, vb = visual_tokens(1, 3, seed=3), visual_tokens(1, 3, seed=4)
    with torch.no_grad():
        ref_a, ref_b = a(ids_a, va).logits, b(ids_b, vb).logits
        assert torch.equal(a(ids_a, va).logits, ref_a)
        # Same model, different media, concurrently: each call sees only its own media.
        visuals = [visual_tokens(1, 3, seed=s) for s in range(6)]
        expected = [a(ids_a, v).logits for v in visuals]
        results = [None] * len(visuals)

        def run(i):
            with torch.no_grad():
                for _ in range(3):
                    results[i] = a(ids_a, visuals[i]).logits

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(visuals))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))
    assert torch.equal(b(ids_b, vb).logits, ref_b)


def test_an_lm_cannot_be_wrapped_twice(make_model):
    from flamingo_cli.model.flamingo import Flamingo

    model = make_model("llama")
    with pytest.raises(ValueError, match="already part of a Flamingo"):
        Flamingo(model.config, model.lm, model.tokenizer)


def test_more_images_than_media_is_an_error(make_model):
    model = make_model("llama")
    with pytest.raises(ValueError, match="3 <image>.*2 visual"):
        model(ids_for(model, PROMPT), visual_tokens(1, 2))
    with pytest.raises(ValueError, match="visual tokens must be"):
        model(ids_for(model, PROMPT), torch.randn(1, 3, 4, 7))


def test_videos_and_images_share_one_sequence(make_model):
    model = make_model("llama", gates=0.5)
    image = torch.randn(1, 1, 1, 9, model.config.resampler.dim)
    video = torch.randn(1, 1, 4, 9, model.config.resampler.dim)
    visual = torch.cat([model.resample(image), model.resample(video)], dim=1)
    assert visual.shape == (1, 2, 4, model.config.resampler.dim)
    logits = model(ids_for(model, "<image>a photo<|endofchunk|><image>a video"), visual).logits
    assert torch.isfinite(logits).all()


def test_lm_held_in_bfloat16_with_fp32_blocks(lm_dir):
    from conftest import tiny_config
    from transformers import AutoTokenizer

    from flamingo_cli.model.flamingo import Flamingo

    path = lm_dir("llama")
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = Flamingo(tiny_config(path), lm, AutoTokenizer.from_pretrained(path)).eval()
    bare = AutoModelForCausalLM.from_pretrained(lm_dir("llama"), dtype=torch.bfloat16).eval()
    ids = ids_for(model, PROMPT)
    vocab = bare.get_input_embeddings().num_embeddings
    with torch.no_grad():
        logits = model(ids, visual_tokens(1, 3)).logits
        assert torch.equal(logits[..., :vocab], bare(inputs_embeds=model.lm.get_input_embeddings()(ids)).logits)
    assert model.xattn["0"].attn_gate.dtype == torch.float32


def test_new_token_rows_land_at_their_ids_even_past_a_gap():
    from torch import nn

    from flamingo_cli.model.lm import EmbeddingWithNewRows, HeadWithNewRows, NewTokenRows

    base_emb, base_head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    # right after the LM's rows, after a gap, inside padding rows (dropped past the tokenizer),
    # and tokens the tokenizer already had, with more ids after them
    for first, vocab_size in ((10, 12), (12, 14), (7, 9), (5, 10)):
        rows = NewTokenRows(first_id=first, count=2, dim_in=4, dim_out=4, init_in=torch.randn(1, 4),
                            init_out=torch.randn(1, 4))
        with torch.no_grad():
            rows.input.copy_(torch.randn(2, 4))
            rows.output.copy_(torch.randn(2, 4))
        emb, head = EmbeddingWithNewRows(base_emb, rows), HeadWithNewRows(base_head, rows, vocab_size)
        ids = torch.tensor([[0, 3, first, first + 1]])
        out = emb(ids)
        assert torch.equal(out[0, :2], base_emb(ids[0, :2]))
        assert torch.equal(out[0, 2:], rows.input)
        h = torch.randn(3, 4)
        logits = head(h)
        assert logits.shape[-1] == vocab_size
        assert torch.allclose(logits[:, first:first + 2], h @ rows.output.T)
        assert torch.equal(logits[:, :min(first, 10)], base_head(h)[:, :min(first, 10)])
        if first > 10:
            assert (logits[:, 10:first] == torch.finfo(logits.dtype).min).all()
        assert torch.equal(logits[:, first + 2:], base_head(h)[:, first + 2:vocab_size])


def test_next_image_mode_attends_to_the_following_image(make_model):
    from flamingo_cli.model.masking import image_index

    model = make_model("llama", gates=0.5)
    ids = ids_for(model, "before " + PROMPT + " after")
    img = model.image_token_id
    nxt = image_index(ids, img, next_image=torch.tensor([True]))[0]
    prev = image_index(ids, img)[0]
    positions = (ids[0] == img).nonzero().flatten().tolist()
    assert nxt[: positions[0]].eq(1).all(), "text before the first image attends to it"
    assert [int(nxt[p]) for p in positions] == [1, 2, 3], "an <image> attends to its own image"
    assert nxt[positions[-1] + 1:].eq(0).all(), "text after the last image has no next image"
    assert torch.equal(prev, image_index(ids, img, next_image=torch.tensor([False]))[0])
    visual = visual_tokens(1, 3)
    changed = visual.clone()
    changed[:, 0] = torch.randn_like(changed[:, 0])
    with torch.no_grad():
        a = model(ids, visual, next_image=torch.tensor([True])).logits
        b = model(ids, changed, next_image=torch.tensor([True])).logits
    assert not torch.allclose(a[:, : positions[0]], b[:, : positions[0]]), "image 1 now reaches the text before it"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_activation_checkpointing_gives_the_same_gradients(make_model, family):
    model = make_model(family, gates=0.5).train()
    ids = ids_for(model, PROMPT)
    features = torch.randn(1, 3, 1, 9, model.config.resampler.dim)

    def grads():
        model.zero_grad(set_to_none=True)
        lm_loss(model(ids, model.resample(features), next_image=torch.tensor([True])).logits, ids).backward()
        return [p.grad.clone() for p in model.trainable_parameters()]

    plain = grads()
    model.set_activation_checkpointing(True)
    recomputed = grads()
    model.set_activation_checkpointing(False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, recomputed))
    assert all(p.grad is None for p in model.lm.parameters())
    from flamingo_cli.model.lm import decoder_layers

    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model.lm))


def test_own_image_attention_equals_attention_over_all_images_masked(make_model):
    """The grouped path (each token against its own image's keys) against the reference: every
    image's keys under the last-image mask. Two sequences of different image counts, tokens
    before any image, the p_next training order (image indices not monotonic), and gradients."""
    model = make_model("llama", gates=0.5)
    attn = model.xattn["0"].attn
    first = ids_for(model, "before " + PROMPT)
    second = first.clone()
    second[0, (first[0] == model.image_token_id).nonzero()[:2, 0]] = first[0, 0]  # one image, late
    ids = torch.cat([first, second])
    y = torch.randn(*ids.shape, 64, requires_grad=True)
    visual = visual_tokens(2, 3).requires_grad_(True)
    rows = torch.arange(2)
    from flamingo_cli.model.masking import image_index
    from flamingo_cli.model.xattn import VisualKV
    for next_image in (None, torch.tensor([True, False])):
        phi = image_index(ids, model.image_token_id, next_image=next_image)
        assert (phi == 0).any() and len(phi.unique()) >= 3
        outs, grads = [], []
        for path in (attn._own_image, attn._masked):
            q = attn.to_q(attn.norm(y)).unflatten(-1, (attn.heads, attn.dim_head))
            out = path(q, VisualKV(attn, visual), phi, rows)
            (g_y, g_v) = torch.autograd.grad(out.square().sum(), (y, visual))
            outs.append(out.detach()), grads.append((g_y, g_v))
        torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert torch.all(outs[0][phi == 0] == 0)


def test_a_batch_may_share_one_set_of_media(make_model):
    """visual (1, m, l, d) for a batch of b: the same logits as the media repeated b times, and
    each image's K/V projected once, not b times."""
    model = make_model("llama", gates=0.5)
    ids = ids_for(model, PROMPT).repeat(3, 1)
    visual = visual_tokens(1, 3)
    calls = []
    handle = model.xattn["0"].attn.to_kv.register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    with torch.no_grad():
        shared = model(ids, visual).logits
        repeated = model(ids, visual.expand(3, -1, -1, -1)).logits
    handle.remove()
    assert torch.equal(shared, repeated)
    assert calls == [3, 9], "3 images once when shared, 3 per row when repeated"


def _transformers_generate(model, ids, visual, mask, num_beams, max_new_tokens):
    """The reference: transformers' generate over the whole prompt, expanded per beam before
    its prefill, with the media repeated per beam (what generate did before prefilling once)."""
    from flamingo_cli.model.flamingo import MediaContext
    from flamingo_cli.model.masking import image_index
    phi = image_index(ids, model.image_token_id)
    ctx = MediaContext(visual=visual.repeat_interleave(num_beams, 0), phi=phi.repeat_interleave(num_beams, 0))
    with model._conditioned(ctx), torch.no_grad():
        out = model.lm.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
                                max_new_tokens=max_new_tokens, eos_token_id=[model.eoc_token_id, 1],
                                pad_token_id=model.pad_token_id, suppress_tokens=[model.image_token_id])
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_prompt_is_prefilled_once_for_all_beams(make_model, family, num_beams):
    model = make_model(family, gates=0.5)
    model.tokenizer.padding_side = "left"
    batch = model.tokenizer([PROMPT, "<image>a blue<|endofchunk|><image>a"], return_tensors="pt", padding=True)
    visual = visual_tokens(2, 3)
    calls, projected = [], []
    hooks = [model.lm.register_forward_pre_hook(
                 lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True),
             model.xattn["0"].attn.to_kv.register_forward_hook(lambda m, a, out: projected.append(a[0].shape[0]))]
    out = model.generate(batch.input_ids, visual, attention_mask=batch.attention_mask, num_beams=num_beams,
                         max_new_tokens=5)
    for hook in hooks:
        hook.remove()
    n = batch.input_ids.shape[1]
    assert calls[0] == (2, n - 1), "the prompt once, not once per beam"
    assert all(shape == (2 * num_beams, 1) for shape in calls[1:])
    assert projected == [5], "the 5 images' K/V once, shared by the beams"
    want = _transformers_generate(model, batch.input_ids, visual, batch.attention_mask, num_beams, 5)
    assert out.tolist() == want.tolist()
