"""Close-ended scoring: the prompt prefix run once vs a full forward per candidate.

Builds a small random Flamingo on the spot (nothing is downloaded), then times, for
2, 10 and 100 candidates, `flamingo_cli.inference.scoring.score_candidates` (prompt once, the
candidates in batched forwards against its KV cache) against the naive baseline
(prompt + candidate through the whole model, one candidate at a time), and checks
that both give the same scores.

    .venv/bin/python benchmarks/score_candidates.py

Timings use torch's thread count (printed). On a machine shared with other jobs,
OMP_NUM_THREADS=1 avoids oversubscribed thread pools and gives stable numbers.
"""
import itertools
import os
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from flamingo_cli.model.config import FlamingoConfig, ResamplerConfig, XAttnConfig  # noqa: E402
from flamingo_cli.model.flamingo import Flamingo  # noqa: E402
from flamingo_cli.inference.scoring import CONTINUATION, candidate_ids, score_candidates  # noqa: E402
from flamingo_cli.tiny import save_tiny_lm  # noqa: E402

SHOT = "<image>Question: What shape is it? Answer: a red circle on a blue background.<|endofchunk|>"
PROMPT = SHOT * 3 + "<image>Question: What shape is it? Answer:"
IMAGES = 4
VISUAL_DIM, LATENTS = 64, 8
COUNTS = (2, 10, 100)
REPEATS = 3


def build_model(directory: str) -> Flamingo:
    path = save_tiny_lm(directory, "llama", layers=6, hidden=256, heads=4)
    config = FlamingoConfig(
        resampler=ResamplerConfig(dim=VISUAL_DIM, depth=1, heads=2, dim_head=32, num_latents=LATENTS),
        xattn=XAttnConfig(every=1, heads=4, dim_head=32),
    )
    config.lm.path = str(path)
    torch.manual_seed(0)
    model = Flamingo(config, AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    with torch.no_grad():  # open the gates a little, so the images take part as in a trained model
        for block in model.xattn.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    return model.eval()


def candidates(n: int) -> list[str]:
    """n distinct answers of 2 to 5 words, so the batches are padded."""
    sizes = ["", "small ", "large ", "tiny striped "]
    colours = ["red", "green", "blue", "yellow", "purple"]
    shapes = ["circle", "square", "triangle", "star", "diamond"]
    return [f"a {size}{colour} {shape}" for size, colour, shape in itertools.product(sizes, colours, shapes)][:n]


@torch.no_grad()
def naive_scores(model, prompt_ids, visual, answers: list[str]) -> list[float]:
    """The baseline: the whole prompt + candidate through the model, once per candidate."""
    scores = []
    for answer in answers:
        tokens = torch.tensor([candidate_ids(model, CONTINUATION, answer)])
        logits = model(torch.cat([prompt_ids, tokens], dim=1), visual).logits
        logp = logits[0, prompt_ids.shape[1] - 1:-1].float().log_softmax(-1)  # position i predicts token i + 1
        scores.append(float(logp.gather(-1, tokens[0, :, None]).sum()))
    return scores


def best_ms(fn) -> tuple[float, list[float]]:
    """Best wall time of REPEATS runs after one warm-up, and the scores."""
    result = fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, result


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        model = build_model(directory)
    prompt_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
    visual = torch.randn(1, IMAGES, LATENTS, VISUAL_DIM, generator=torch.Generator().manual_seed(0))
    print(f"llama 6 layers x 256, xattn every layer; prompt {prompt_ids.shape[1]} tokens, {IMAGES} images; "
          f"{torch.get_num_threads()} threads; best of {REPEATS}")
    print(f"{'candidates':>10} {'batched ms':>11} {'naive ms':>10} {'speed-up':>9} {'max |diff|':>11}")
    for n in COUNTS:
        answers = candidates(n)
        batched_ms, batched = best_ms(lambda: score_candidates(model, prompt_ids, visual, answers))
        naive_ms, naive = best_ms(lambda: naive_scores(model, prompt_ids, visual, answers))
        diff = max(abs(a - b) for a, b in zip(batched, naive))
        print(f"{n:>10} {batched_ms:>11.1f} {naive_ms:>10.1f} {naive_ms / batched_ms:>8.1f}x {diff:>11.2e}")
        assert diff < 1e-3, f"batched and naive scores disagree by {diff}"


if __name__ == "__main__":
    main()
