"""Few-shot inference against OpenFlamingo's method, on one random Flamingo (LLaMA 6 x 512 with a
2048-position context, xattn every layer, 64 visual tokens of width 768 per image; nothing is
downloaded), all measured in this run:

  generate: 8 queries after 32 or 4 shots (the same shots for all, or each query its own),
    greedy and 3 beams, batch 8, 20 new tokens:
      openflamingo  OpenFlamingo 2.0.1's inference on the same weights: each query's whole
                    prompt through transformers' generate, expanded per beam before its
                    prefill, its images repeated per beam, every image's cross-attention K/V
                    projected again at every step and attended by every token under a mask
      off           ours with the prefix cache off: a prompt prefilled once for all its beams,
                    each image's K/V projected once, each token attending to its own image
      on            as off, with the prefix cache: shared demonstrations run once
  score: 1000 candidates after one 4-shot prompt, of 1-4 tokens (as class names are) and of
    three words (8-13 tokens here), each closed by <|endofchunk|>:
      openflamingo  OpenFlamingo 2.0.1's get_rank_classifications on the same weights: the
                    prompt's cache computed once, then each candidate's tokens one per forward
                    over that cache (the last too), every image's cross-attention K/V projected
                    again at every forward and attended under a mask (timed on a sample, per
                    candidate)
      loop          a stronger loop, on our model: each candidate one forward of its tokens but
                    the last over a copy of the prompt's cache, its own image's K/V only
      ours          score_candidates: candidates laid end to end as a trie against the
                    prompt's states

Outputs are checked equal (texts; scores within 1e-4). Prints seconds and ratios, and for ours
on fixed shots, greedy, and on the 1000-way scoring, the FLOP/s achieved (FLOPs counted by
torch's FlopCounterMode on a second, untimed run) against this machine's ceilings (a 2048^3
matmul in fp32 and bf16, measured here).

    .venv/bin/python benchmarks/prefix_cache.py [--shots 32,4] [--sample 50]
"""
import argparse
import copy
import os
import random
import tempfile
import time
from contextlib import contextmanager

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from flamingo_cli.inference.generation import generate_records  # noqa: E402
from flamingo_cli.inference.prefix_cache import PrefixCache  # noqa: E402
from flamingo_cli.inference.scoring import CONTINUATION, candidate_ids, score_candidates  # noqa: E402
from flamingo_cli.model.config import FlamingoConfig, ResamplerConfig, XAttnConfig  # noqa: E402
from flamingo_cli.model.flamingo import Flamingo, MediaContext  # noqa: E402
from flamingo_cli.model.masking import image_index  # noqa: E402
from flamingo_cli.tiny import save_tiny_lm  # noqa: E402

DIM, LATENTS = 768, 64
POSITIONS = 2048  # 32 shots and 20 new tokens fit
WORDS = ["red", "green", "blue", "yellow", "purple", "circle", "square", "triangle", "star", "diamond"]


def build_model(directory: str) -> Flamingo:
    path = save_tiny_lm(directory, "llama", layers=6, hidden=512, heads=8)
    lm_config = AutoConfig.from_pretrained(path)  # rotary positions: a longer context changes no weight
    lm_config.max_position_embeddings = POSITIONS
    lm_config.save_pretrained(path)
    config = FlamingoConfig(resampler=ResamplerConfig(dim=DIM, depth=1, heads=8, dim_head=64, num_latents=LATENTS),
                            xattn=XAttnConfig(every=1, heads=8, dim_head=64))
    config.lm.path = str(path)
    torch.manual_seed(0)
    model = Flamingo(config, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model.eval()


class Media:
    def __init__(self):
        self.tokens = {}

    def visuals(self, entries):
        for e in entries:
            if e not in self.tokens:
                self.tokens[e] = torch.randn(LATENTS, DIM, generator=torch.Generator().manual_seed(len(self.tokens)))
        return torch.stack([self.tokens[e] for e in entries]) if entries else torch.zeros(0, LATENTS, DIM)


def shot(i: int) -> str:
    rng = random.Random(i)
    return f"<image>Output: a {rng.choice(WORDS)} {rng.choice(WORDS)}.<|endofchunk|>"


def records(shots: int, queries: int, fixed: bool) -> list[dict]:
    out = []
    for q in range(queries):
        ids = list(range(shots)) if fixed else random.Random(q).sample(range(1000), shots)
        prompt = "".join(shot(i) for i in ids) + "<image>Output:"
        out.append({"id": q, "prompt": prompt, "media": [f"s{i}" for i in ids] + [f"q{q}"]})
    return out


@contextmanager
def every_key_masked(model):
    """Cross-attention over all m x l keys of a sequence's images under the mask, as OpenFlamingo
    attends (ours attends to each token's own image's l keys): the same outputs, more work."""
    attns = [block.attn for block in model.xattn.values()]
    for attn in attns:
        attn._own_image = attn._masked  # shadows the method on this instance
    try:
        yield
    finally:
        for attn in attns:
            del attn._own_image


def openflamingo(model, batch, media, num_beams):
    """OpenFlamingo's generate on our weights: the whole prompt through transformers' generate,
    the media repeated per beam, no K/V kept between steps (kv=None)."""
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True)
    visual = torch.stack([media.visuals(r["media"]) for r in batch])
    phi = image_index(enc.input_ids, model.image_token_id)
    ctx = MediaContext(visual=visual.repeat_interleave(num_beams, 0), phi=phi.repeat_interleave(num_beams, 0), kv=None)
    with every_key_masked(model), model._conditioned(ctx), torch.no_grad():
        out = model.lm.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                                num_beams=num_beams, max_new_tokens=20, eos_token_id=[model.eoc_token_id],
                                pad_token_id=model.pad_token_id, suppress_tokens=[model.image_token_id])
    return [t.strip() for t in tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def ceilings() -> dict[str, float]:
    """GFLOP/s of a 2048^3 matmul on this machine, fp32 and bf16: the best of 5."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = min(timed(lambda: a @ b)[0] for _ in range(5))
        out[str(dtype).removeprefix("torch.")] = 2 * 2048 ** 3 / best / 1e9
    return out


def achieved(what: str, fn, seconds: float, peak: dict[str, float]) -> None:
    with FlopCounterMode(display=False) as counter:
        fn()
    rate = counter.get_total_flops() / seconds / 1e9
    print(f"  achieved, {what}: {counter.get_total_flops() / 1e9:.1f} GFLOP in {seconds:.2f} s = {rate:.1f} GFLOP/s, "
          f"{rate / peak['float32']:.0%} of the fp32 ceiling", flush=True)


def bench_generate(model, media, shots, peak):
    n = len(model.tokenizer(records(shots, 1, True)[0]["prompt"]).input_ids)
    print(f"generate: 8 queries, {shots} shots ({n} tokens), batch 8, 20 new tokens")
    for fixed in (True, False):
        rs = records(shots, 8, fixed)
        for beams in (1, 3):
            t_of, want = timed(lambda: openflamingo(model, rs, media, beams))
            t_off, off = timed(lambda: [r["output"] for r in generate_records(model, rs, media, num_beams=beams)])
            cache = PrefixCache(model)
            t_on, on = timed(lambda: [r["output"] for r in generate_records(model, rs, media, num_beams=beams,
                                                                          prefix_cache=cache)])
            assert want == off == on, (want, off, on)
            print(f"  {'fixed ' if fixed else 'random'} shots, {beams} beam(s): openflamingo {t_of:6.2f} s  "
                  f"off {t_off:6.2f} s  on {t_on:6.2f} s   on vs openflamingo {t_of / t_on:5.1f}x  "
                  f"on vs off {t_off / t_on:4.1f}x", flush=True)
            if fixed and beams == 1:
                achieved(f"{shots} fixed shots, greedy, cache on", lambda: list(generate_records(
                    model, rs, media, num_beams=1, prefix_cache=PrefixCache(model))), t_on, peak)


def short_candidates(model, n: int) -> list[str]:
    """n distinct candidates of 1 to 4 tokens (uniformly), each word-start tokens of this vocabulary
    that tokenize back to themselves, so their lengths are what the issue's class names have."""
    tok, rng = model.tokenizer, random.Random(0)
    special = set(tok.all_special_ids) | {model.image_token_id, model.eoc_token_id}
    plain = [i for t, i in tok.get_vocab().items() if i not in special and t.isalpha()]
    starts = [i for t, i in tok.get_vocab().items() if i not in special and t[:1] == "Ġ" and t[1:].isalpha()]
    out = {}
    while len(out) < n:
        ids = [rng.choice(starts)] + [rng.choice(plain) for _ in range(rng.randint(0, 3))]
        text = tok.decode(ids)[1:]  # the continuation's own space comes first
        if candidate_ids(model, CONTINUATION, text) == ids + [model.eoc_token_id]:
            out.setdefault(text, None)
    return list(out)


def openflamingo_scores(model, cache, first, visual, answers):
    """OpenFlamingo's rank classification: per candidate, one token per forward over the prompt's
    cache, every image's K/V recomputed at each forward and all keys masked."""
    images = torch.tensor([visual.shape[1]])
    scores = []
    with every_key_masked(model):
        for answer in answers:
            tokens = candidate_ids(model, CONTINUATION, answer)
            state, logps = copy.deepcopy(cache), [first]
            for token in tokens:
                out = model(torch.tensor([[token]]), visual, images_before=images, cache=state, use_cache=True)
                logps.append(out.logits[0, -1].log_softmax(-1))
            scores.append(float(sum(logp[t] for logp, t in zip(logps, tokens))))
    return scores


def loop_scores(model, cache, first, visual, answers):
    """A per-candidate loop on our model: a candidate's tokens but the last in one forward over a copy
    of the prompt's cache, attending to its own image's keys only."""
    scores = []
    for answer in answers:
        tokens = torch.tensor([candidate_ids(model, CONTINUATION, answer)])
        out = model(tokens[:, :-1], visual, images_before=torch.tensor([visual.shape[1]]),
                    cache=copy.deepcopy(cache), use_cache=True)
        logp = out.logits[0].log_softmax(-1).gather(-1, tokens[0, 1:, None]).sum()
        scores.append(float(first[tokens[0, 0]] + logp))
    return scores


def bench_score(model, media, peak, sample: int):
    r = records(4, 1, True)[0]
    ids = model.tokenizer(r["prompt"], return_tensors="pt").input_ids
    visual = media.visuals(r["media"])[None]
    with torch.no_grad():
        prefix = model(ids, visual, use_cache=True)
    cache = getattr(prefix, "cache", None) or prefix.past_key_values
    first = prefix.logits[0, -1].log_softmax(-1)
    print(f"score: 1000 candidates after a 4-shot prompt of {ids.shape[1]} tokens; baselines timed on "
          f"{sample} candidates")
    sets = {"1-4 tokens": short_candidates(model, 1000),
            "three words": [f"{a} {b} {c}" for a in WORDS for b in WORDS for c in WORDS][:1000]}
    for name, answers in sets.items():
        lengths = [len(candidate_ids(model, CONTINUATION, a)) - 1 for a in answers]
        t_ours, ours = timed(lambda: score_candidates(model, ids, visual, answers, batch_size=64))
        with torch.no_grad():
            t_of, of = timed(lambda: openflamingo_scores(model, cache, first, visual, answers[:sample]))
            t_loop, loop = timed(lambda: loop_scores(model, cache, first, visual, answers[:sample]))
        assert all(abs(a - b) < 1e-3 for a, b in zip(of, ours)) and all(
            abs(a - b) < 1e-3 for a, b in zip(loop, ours)), "the same scores"
        per_ours, per_of, per_loop = t_ours / len(answers), t_of / sample, t_loop / sample
        print(f"  {name} (mean {sum(lengths) / len(lengths):.1f} + <|endofchunk|>): ours {t_ours:.2f} s "
              f"({per_ours * 1e3:.2f} ms per candidate); openflamingo {per_of * 1e3:.1f} ms per candidate: "
              f"{per_of / per_ours:.0f}x; loop {per_loop * 1e3:.1f} ms: {per_loop / per_ours:.0f}x", flush=True)
        achieved(f"1000-way scoring, {name}", lambda: score_candidates(model, ids, visual, answers, batch_size=64),
                 t_ours, peak)
        t_wide, _ = timed(lambda: score_candidates(model, ids, visual, answers, batch_size=256))
        print(f"  {name}, 256 candidates per forward: {t_wide / len(answers) * 1e3:.2f} ms per candidate", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="32,4", help="shot counts for generate, comma separated")
    parser.add_argument("--sample", type=int, default=50, help="candidates the scoring baselines are timed on")
    args = parser.parse_args()
    peak = ceilings()
    print(f"torch threads: {torch.get_num_threads()}; ceilings (2048^3 matmul): "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peak.items()))
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(tmp)
        media = Media()
        bench_score(model, media, peak, args.sample)
        for shots in map(int, args.shots.split(",")):
            bench_generate(model, media, shots, peak)


if __name__ == "__main__":
    main()
