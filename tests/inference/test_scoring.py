"""Close-ended scoring against a cached prompt prefix."""
import math

import pytest
import torch
from conftest import ids_for, visual_tokens

from flamingo_cli.inference.scoring import rank, score_candidates

PROMPT = "<image>a red circle<|endofchunk|><image>a green square<|endofchunk|><image>Output:"
IMAGES = 3
CANDIDATES = ["red", "a small purple diamond in the corner", "two", "a yellow triangle", "cat wearing sunglasses"]


def candidate_tokens(model, candidate: str, template: str = " {}<|endofchunk|>") -> list[int]:
    return model.tokenizer(template.format(candidate), add_special_tokens=False).input_ids


def naive_scores(model, prompt_ids, visual, candidates, normalize="sum", template=" {}<|endofchunk|>") -> list[float]:
    """The reference: a full forward of prompt + candidate for each candidate on its own."""
    scores = []
    with torch.no_grad():
        for candidate in candidates:
            tokens = torch.tensor([candidate_tokens(model, candidate, template)])
            logits = model(torch.cat([prompt_ids, tokens], dim=1), visual).logits
            # Logits at prompt_len - 1 + j predict candidate token j.
            logp = logits[0, prompt_ids.shape[1] - 1:-1].float().log_softmax(-1)
            total = float(logp.gather(-1, tokens[0, :, None]).sum())
            scores.append(total / tokens.shape[1] if normalize == "mean" else total)
    return scores


def prompt_of(model):
    return ids_for(model, PROMPT), visual_tokens(1, IMAGES)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox", "qwen2", "mistral"])
def test_prefix_scores_match_a_full_forward_per_candidate(make_model, family):
    model = make_model(family, gates=0.5)
    prompt_ids, visual = prompt_of(model)
    lengths = {len(candidate_tokens(model, c)) for c in CANDIDATES}
    assert len(lengths) >= 3, "candidates of different lengths, so the batch is padded"
    for normalize in ("sum", "mean"):
        got = score_candidates(model, prompt_ids, visual, CANDIDATES, normalize=normalize)
        want = naive_scores(model, prompt_ids, visual, CANDIDATES, normalize)
        assert got == pytest.approx(want, abs=1e-4), normalize


def test_text_only_prompt(make_model):
    model = make_model("gpt2", gates=0.5)
    prompt_ids = ids_for(model, "Question: how many shapes are there? Answer:")
    got = score_candidates(model, prompt_ids, None, CANDIDATES)
    assert got == pytest.approx(naive_scores(model, prompt_ids, None, CANDIDATES), abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_chunks_give_the_same_scores_and_leave_the_prefix_intact(make_model, family):
    model = make_model(family, gates=0.5)
    prompt_ids, visual = prompt_of(model)
    one_chunk = score_candidates(model, prompt_ids, visual, CANDIDATES, batch_size=len(CANDIDATES))
    for batch_size in (1, 2):
        first = score_candidates(model, prompt_ids, visual, CANDIDATES, batch_size=batch_size)
        again = score_candidates(model, prompt_ids, visual, CANDIDATES, batch_size=batch_size)
        assert first == again
        # With batch_size 1 a prefix cache grown by an earlier chunk would shift every later candidate.
        assert first == pytest.approx(one_chunk, abs=1e-5), batch_size
    assert one_chunk == pytest.approx(naive_scores(model, prompt_ids, visual, CANDIDATES), abs=1e-4)


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_the_prompt_runs_once(make_model, batch_size):
    model = make_model("llama", gates=0.5)
    prompt_ids, visual = prompt_of(model)
    lengths, projected = [], []
    handle = model.lm.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    to_kv = next(iter(model.xattn.values())).attn.to_kv
    kv_handle = to_kv.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[0]))
    score_candidates(model, prompt_ids, visual, CANDIDATES, batch_size=batch_size)
    handle.remove()
    kv_handle.remove()
    # Each image's K/V is projected once by the prompt's run, and the candidates' image once more
    # for all the chunks: not once per chunk.
    assert sum(projected) == IMAGES + 1
    # The prompt runs once, as its context (the tokens before its last <image>) and then its query.
    assert len(lengths) == 2 + math.ceil(len(CANDIDATES) / batch_size)
    ids = prompt_ids[0].tolist()
    assert lengths[:2] == [len(ids) - 1 - ids[::-1].index(model.image_token_id), ids[::-1].index(model.image_token_id) + 1]
    # Later calls run candidate tokens only, laid end to end: no padding, the prompt never again,
    # and a prefix that candidates of one chunk share (in token order) once.
    tokens = sorted(candidate_tokens(model, c) for c in CANDIDATES)
    chunks = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    assert sum(lengths[2:]) == sum(len({tuple(t[:d + 1]) for t in chunk for d in range(len(t) - 1)}) for chunk in chunks)
    assert batch_size < len(CANDIDATES) or sum(lengths[2:]) < sum(len(t) - 1 for t in tokens)


def test_shared_prefixes_run_once_and_score_as_alone(make_model):
    model = make_model("llama", gates=0.5)
    prompt_ids, visual = prompt_of(model)
    candidates = [f"a {size} {colour} {shape}" for size in ("small", "large") for colour in ("red", "blue", "green")
                  for shape in ("circle", "square")]
    lengths = []
    handle = model.lm.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    got = score_candidates(model, prompt_ids, visual, candidates, batch_size=64)
    handle.remove()
    assert got == pytest.approx(naive_scores(model, prompt_ids, visual, candidates), abs=1e-4)
    # " a", its 2 sizes, 6 size-colours and 12 shapes each once (the end-of-chunk token predicts nothing)
    prefixes = {tuple(t[:d + 1]) for t in (candidate_tokens(model, c) for c in candidates) for d in range(len(t) - 1)}
    assert lengths[2:] == [len(prefixes)] and len(prefixes) < sum(len(candidate_tokens(model, c)) - 1 for c in candidates)


def test_the_images_matter(make_model):
    model = make_model("llama", gates=0.5)
    prompt_ids, visual = prompt_of(model)
    base = score_candidates(model, prompt_ids, visual, CANDIDATES)
    other = score_candidates(model, prompt_ids, visual_tokens(1, IMAGES, seed=1), CANDIDATES)
    assert all(abs(a - b) > 1e-6 for a, b in zip(base, other))
    # Control: with closed gates the images cannot matter.
    closed = make_model("llama", gates=0.0)
    assert score_candidates(closed, prompt_ids, visual, CANDIDATES) == pytest.approx(
        score_candidates(closed, prompt_ids, visual_tokens(1, IMAGES, seed=1), CANDIDATES), abs=1e-6)


def test_mean_is_sum_over_token_count(make_model):
    model = make_model("qwen2", gates=0.5)
    prompt_ids, visual = prompt_of(model)
    with torch.no_grad():
        total = score_candidates(model, prompt_ids, visual, CANDIDATES, normalize="sum", batch_size=2)
        mean = score_candidates(model, prompt_ids, visual, CANDIDATES, normalize="mean", batch_size=2)
    counts = [len(candidate_tokens(model, c)) for c in CANDIDATES]
    assert mean == pytest.approx([s / n for s, n in zip(total, counts)], rel=1e-6)
    assert mean != pytest.approx(total)


def test_continuation_template_is_what_gets_scored(make_model):
    model = make_model("llama", gates=0.5)
    prompt_ids, visual = prompt_of(model)
    bare = score_candidates(model, prompt_ids, visual, CANDIDATES, continuation=" {candidate}")
    full = score_candidates(model, prompt_ids, visual, CANDIDATES)
    # Dropping <|endofchunk|> removes one (negative) log-prob from every candidate.
    assert all(b > f for b, f in zip(bare, full))


def test_single_token_candidates_need_no_forward_beyond_the_prompt(make_model):
    model = make_model("llama", gates=0.5)
    prompt_ids, visual = prompt_of(model)
    single = ["<|endofchunk|>", " ", "a"]
    assert all(len(candidate_tokens(model, c, "{}")) == 1 for c in single)
    calls = []
    handle = model.lm.register_forward_pre_hook(lambda *_: calls.append(1))
    got = score_candidates(model, prompt_ids, visual, single, continuation="{candidate}")
    handle.remove()
    assert len(calls) == 2  # the prompt's context and its query
    assert got == pytest.approx(naive_scores(model, prompt_ids, visual, single, template="{}"), abs=1e-4)
    # Mixed with longer ones in one chunk: the single-token rows are all padding after their first token.
    mixed = [*single, *CANDIDATES]
    got = score_candidates(model, prompt_ids, visual, mixed, continuation="{candidate}")
    assert got == pytest.approx(naive_scores(model, prompt_ids, visual, mixed, template="{}"), abs=1e-4)


def test_bad_arguments(make_model):
    model = make_model("llama")
    prompt_ids, visual = prompt_of(model)
    with pytest.raises(ValueError, match="normalize"):
        score_candidates(model, prompt_ids, visual, CANDIDATES, normalize="max")
    with pytest.raises(ValueError, match="one prompt"):
        score_candidates(model, prompt_ids.repeat(2, 1), visual.repeat(2, 1, 1, 1), CANDIDATES)
    with pytest.raises(ValueError, match="no tokens"):
        score_candidates(model, prompt_ids, visual, ["red", ""], continuation="{candidate}")


def test_rank_picks_the_argmax_and_the_first_of_ties(make_model):
    assert rank({"a": -3.0, "b": -1.0, "c": -2.0}) == "b"
    assert rank({"a": -3.0, "b": -1.0, "c": -1.0}) == "b"
    assert rank({"c": -1.0, "b": -1.0, "a": -3.0}) == "c"
    model = make_model("llama", gates=0.5)
    prompt_ids, visual = prompt_of(model)
    scores = dict(zip(CANDIDATES, score_candidates(model, prompt_ids, visual, CANDIDATES)))
    assert scores[rank(scores)] == max(scores.values())


def test_a_prompt_and_candidate_past_the_lms_context_is_refused(make_model):
    import pytest

    from flamingo_cli.formats.artifacts import ArtifactError
    from flamingo_cli.inference.media import MediaResolver
    from flamingo_cli.inference.scoring import score_record

    model = make_model("llama")
    record = {"id": "long", "prompt": "What shape is it? " * 200, "media": []}
    n = model.tokenizer(record["prompt"], return_tensors="pt").input_ids.shape[1]
    with pytest.raises(ArtifactError, match=rf"^long: the prompt is {n} tokens and its longest candidate takes \d+ more: "
                                            r"\d+ is over the LM's context of 512 tokens"):
        score_record(model, record, MediaResolver(model), ["red", "a much longer candidate"])


def test_a_record_without_bos_is_scored_without_it(make_model):
    from conftest import add_bos

    from flamingo_cli.inference.media import MediaResolver
    from flamingo_cli.inference.scoring import score_records

    model = make_model("llama", gates=0.5)
    add_bos(model.tokenizer)
    text = "Question: how many shapes are there? Answer:"
    record = {"id": "a", "prompt": text, "media": [], "bos": False}
    got = next(score_records(model, [record], MediaResolver(model), candidates=CANDIDATES))["scores"]
    with_bos = next(score_records(model, [{**record, "bos": True}], MediaResolver(model), candidates=CANDIDATES))
    ids = model.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert list(got.values()) == pytest.approx(score_candidates(model, ids, None, CANDIDATES), abs=1e-5)
    assert list(with_bos["scores"].values()) != pytest.approx(list(got.values()), abs=1e-3)
