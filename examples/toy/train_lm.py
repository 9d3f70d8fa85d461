"""Train the toy world's frozen LM: a small LLaMA on the world's text, before Flamingo sees it.

    python train_lm.py OUT_DIR [--steps N] [--batch B]

The text mixes repeated random spans (which grow induction heads), text-only few-shot
episodes with made-up label words, and captions and questions in the prompt formats.
Held-out label words and colour-shape combinations never appear. At the end it measures
in-context learning on episodes with held-out label words (2-way, 4 shots) and writes
OUT_DIR/icl.json; the LM and its tokenizer are saved with save_pretrained.
"""
import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402


def batches(tokenizer, rng: random.Random, batch: int, length: int):
    """Packed rows of `length` tokens: samples joined by </s>, cut into rows."""
    vocabulary = world.WORDS + world.SYLLABLES + world.TRAIN_LABELS
    buffer: list[int] = []
    while True:
        while len(buffer) < batch * length:
            buffer += tokenizer(world.lm_sample(rng, vocabulary)).input_ids + [tokenizer.eos_token_id]
        rows, buffer = buffer[: batch * length], buffer[batch * length:]
        yield torch.tensor(rows).view(batch, length)


@torch.no_grad()
def icl_accuracy(model, tokenizer, labels, *, ways: int, shots: int, episodes: int, seed: int) -> float:
    """Fraction of text episodes where the right label word is the likelier continuation."""
    rng = random.Random(seed)
    right = 0
    for _ in range(episodes):
        prompt, answer, words = world.text_episode(rng, labels=labels, ways=ways, shots=shots)
        scores = {w: continuation_logprob(model, tokenizer, prompt, " " + w) for w in words}
        right += max(scores, key=scores.get) == answer
    return right / episodes


@torch.no_grad()
def icl_generate_accuracy(model, tokenizer, labels, *, ways: int, shots: int, episodes: int, seed: int) -> float:
    """Fraction of text episodes where greedy decoding writes the right label word: unlike
    ranking, this fails when the LM completes a word from memory instead of the context."""
    rng = random.Random(seed)
    right = 0
    for _ in range(episodes):
        prompt, answer, _ = world.text_episode(rng, labels=labels, ways=ways, shots=shots)
        head = tokenizer(prompt).input_ids
        n = len(tokenizer(" " + answer).input_ids)
        out = model.generate(torch.tensor([head]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        right += tokenizer.decode(out[0, len(head):]).replace(" ", "") == answer
    return right / episodes


def continuation_logprob(model, tokenizer, prompt: str, continuation: str) -> float:
    head = tokenizer(prompt).input_ids
    ids = torch.tensor([head + tokenizer(continuation).input_ids])
    logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return float(logprobs[len(head) - 1:].gather(-1, targets[len(head) - 1:, None]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--eval-episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = world.build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 32, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, args.steps - warmup))))))
    data = batches(tokenizer, random.Random(args.seed), args.batch, args.length)
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        ids = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", file=sys.stderr, flush=True)

    model.eval()
    out = Path(args.out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n = args.eval_episodes
    icl = {"held_out_labels_2way_4shot": icl_accuracy(model, tokenizer, world.HELD_OUT_LABELS, ways=2, shots=4,
                                                      episodes=n, seed=10_001),
           "held_out_labels_4way_8shot": icl_accuracy(model, tokenizer, world.HELD_OUT_LABELS, ways=4, shots=8,
                                                      episodes=n, seed=10_002),
           "held_out_labels_2way_4shot_generate": icl_generate_accuracy(
               model, tokenizer, world.HELD_OUT_LABELS, ways=2, shots=4, episodes=n, seed=10_003),
           "held_out_labels_2way_0shot_chance": 0.5, "steps": args.steps, "episodes": n}
    (out / "icl.json").write_text(json.dumps(icl, indent=1) + "\n")
    print(json.dumps(icl), file=sys.stderr)


if __name__ == "__main__":
    main()
