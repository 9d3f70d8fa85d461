"""The prefix cache: prompts that begin alike share their LM states, with outputs unchanged."""
import pytest
import torch
from conftest import visual_tokens

from flamingo_cli.inference.generation import generate_records
from flamingo_cli.inference.prefix_cache import PrefixCache
from flamingo_cli.inference.scoring import score_records

SHOTS = "<image>a red circle<|endofchunk|><image>a green square<|endofchunk|><image>two<|endofchunk|>"
QUERIES = ["<image>Output:", "<image>a", "<image>What shape is it?"]
CANDIDATES = ["red", "a small purple diamond in the corner", "two", "a yellow triangle"]


class Media:
    """Media entries -> fixed random visual tokens: the resolver's contract, without files."""

    def __init__(self):
        self.tokens = {}

    def visuals(self, entries):
        for e in entries:
            self.tokens.setdefault(e, visual_tokens(1, 1, seed=len(self.tokens))[0, 0])
        return torch.stack([self.tokens[e] for e in entries]) if entries else torch.zeros(0, 4, 32)


def records():
    """Three queries after the same demonstrations, one after other ones, one without images."""
    shots = ["s0", "s1", "s2"]
    out = [{"id": f"q{i}", "prompt": SHOTS + q, "media": [*shots, f"q{i}"]} for i, q in enumerate(QUERIES)]
    out.append({"id": "other", "prompt": SHOTS + QUERIES[0], "media": ["s0", "s9", "s2", "q0"]})
    out.append({"id": "text", "prompt": "Question: how many shapes are there? Answer:", "media": []})
    return out


def fresh_states(model, ids, visual):
    with torch.no_grad():
        out = model(torch.tensor([ids]), visual, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_generate_with_the_prefix_cache_gives_the_same_text(make_model, family, num_beams, batch_size):
    model = make_model(family, gates=0.5)
    media = Media()
    want, got = [], []
    cache = PrefixCache(model)
    rs = records()
    for start in range(0, len(rs), batch_size):
        batch = rs[start:start + batch_size]
        want += generate_records(model, batch, media, num_beams=num_beams, max_new_tokens=6)
        got += generate_records(model, batch, media, num_beams=num_beams, max_new_tokens=6, prefix_cache=cache)
    assert [r["output"] for r in got] == [r["output"] for r in want]
    assert len({r["output"] for r in want}) > 1, "the prompts give different answers"
    # q1, q2 reuse all of q0's demonstrations; "other" reuses them up to its second image.
    demos = len(model.tokenizer(SHOTS).input_ids)
    assert cache.hits >= 2 * demos


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_score_with_the_prefix_cache_and_grouped_records_gives_the_same_scores(make_model, family):
    model = make_model(family, gates=0.5)
    media = Media()
    one_by_one = [r for record in records()
                  for r in score_records(model, [record], media, candidates=CANDIDATES, batch_size=1)]
    cache = PrefixCache(model)
    grouped = list(score_records(model, records(), media, candidates=CANDIDATES, batch_size=32, prefix_cache=cache))
    assert [r["id"] for r in grouped] == [r["id"] for r in one_by_one]
    for a, b in zip(grouped, one_by_one):
        assert list(a["scores"]) == CANDIDATES
        assert list(a["scores"].values()) == pytest.approx(list(b["scores"].values()), abs=1e-5)
        assert a["prediction"] == b["prediction"]
    assert cache.hits > 0
    # Without the SDPA layout (one row per prompt and candidate, the prompts' states gathered per row).
    model.lm.set_attn_implementation("eager")
    rows = list(score_records(model, records(), media, candidates=CANDIDATES, batch_size=32))
    for a, b in zip(rows, one_by_one):  # another attention kernel: equal to float32 rounding of sums near 100
        assert list(a["scores"].values()) == pytest.approx(list(b["scores"].values()), rel=1e-6, abs=1e-5)


def test_scores_do_not_depend_on_what_the_cache_saw_before(make_model):
    """The property sharded runs rest on: a group's scores are the same bits whether its contexts
    come from a cache that saw other groups first, from a fresh one, or from none."""
    model = make_model("gpt2", gates=0.5)
    media = Media()
    rs = [{**r, "id": i} for i, r in enumerate(records() * 2)]
    groups = [rs[i:i + 2] for i in range(0, len(rs), 2)]  # 2 records x 4 candidates = one batch of 8
    one_run = list(score_records(model, rs, media, candidates=CANDIDATES, batch_size=8,
                                 prefix_cache=PrefixCache(model)))
    alone = [r for group in groups for r in score_records(model, group, media, candidates=CANDIDATES, batch_size=8,
                                                          prefix_cache=PrefixCache(model))]
    off = list(score_records(model, rs, media, candidates=CANDIDATES, batch_size=8))
    assert [r["scores"] for r in one_run] == [r["scores"] for r in alone] == [r["scores"] for r in off]


def test_a_context_runs_once_and_its_states_are_those_of_a_fresh_run(make_model):
    model = make_model("llama", gates=0.5)
    cache = PrefixCache(model)
    tok = model.tokenizer
    a = tok(SHOTS + QUERIES[0]).input_ids
    b = tok(SHOTS + QUERIES[2]).input_ids
    context = [i for i, t in enumerate(a) if t == model.image_token_id][3]  # up to the query's image (qa vs qb)
    assert a[:context + 1] == b[:context + 1]
    media = Media()
    va, vb = media.visuals(["s0", "s1", "s2", "qa"])[None], media.visuals(["s0", "s1", "s2", "qb"])[None]
    first, _ = cache.run(a, ["s0", "s1", "s2", "qa"], va, len(a))
    assert (cache.hits, cache.misses) == (0, len(a))
    states, _ = cache.run(b, ["s0", "s1", "s2", "qb"], vb, len(b))
    assert (cache.hits, cache.misses) == (context, len(a) + len(b) - context)
    for (k, v), (k0, v0), (ka, _) in zip(states, fresh_states(model, b, vb), first):
        assert torch.equal(k[..., :context, :], ka[..., :context, :])  # the same context, not a re-run
        torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, v0, atol=1e-5, rtol=1e-5)
    # Same tokens, another image in second place: another context, run afresh.
    hits = cache.hits
    vc = media.visuals(["s0", "x", "s2", "qa"])[None]
    states, _ = cache.run(a, ["s0", "x", "s2", "qa"], vc, len(a))
    assert cache.hits == hits
    for (k, _), (k0, _) in zip(states, fresh_states(model, a, vc)):
        torch.testing.assert_close(k, k0, atol=1e-5, rtol=1e-5)
    # A prompt seen before: its context comes back, its query (with the logits asked for) runs.
    _, logits = cache.run(a, ["s0", "x", "s2", "qa"], vc, len(a), logits=True)
    assert cache.hits - hits == context and logits is not None


def test_the_cache_stays_within_its_bound_and_keeps_what_was_used_last(make_model):
    model = make_model("llama", gates=0.5)
    tok = model.tokenizer
    media = Media()
    prompts = [tok(f"{word} " * 20 + "<image>Output:").input_ids for word in ("red", "blue", "green", "two")]
    run = lambda cache, ids: cache.run(ids, ["q"], media.visuals(["q"])[None], len(ids))  # noqa: E731
    probe = PrefixCache(model)
    sizes = []
    for ids in prompts:
        before = probe.bytes
        run(probe, ids)
        sizes.append(probe.bytes - before)
    bound = sizes[-1] + sizes[-2]  # the last two contexts
    cache = PrefixCache(model, max_bytes=bound)
    for ids in prompts:
        run(cache, ids)
        assert 0 < cache.bytes <= bound
    assert len(cache.contexts) == 2 and not any(t.requires_grad for t, _ in next(iter(cache.contexts.values())))
    hits = cache.hits
    run(cache, prompts[-1])
    assert cache.hits > hits, "the last context is still there"
    hits = cache.hits
    run(cache, prompts[0])
    assert cache.hits == hits, "the first was evicted"
    off = PrefixCache(model, max_bytes=0)
    run(off, prompts[0])
    run(off, prompts[0])
    assert off.hits == 0 and off.bytes == 0 and not off.contexts
