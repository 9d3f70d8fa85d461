"""Evidence that the toy Flamingo reads time in videos (evaluate.py's video half).

Held-out clips (seeds training never uses) ask "Which way does it slide?" (left, right, up,
down: only the order of the frames tells) and "What colour does it become?" (the shape's colour
after the change, against the one before). Measured with 0 and 4 shots of the same question, by
`score` (ranked among the four directions or the eight colours) and `generate` (3 beams, exact
match), and at 4 shots by `score` under three changes:

- time embeddings zeroed: the resampler's learned temporal embeddings set to 0, so it sees a
  video's frames as an unordered set;
- frames shuffled: every clip's frames (shots' and query's) in a fixed random order;
- 8 frames: the training sampling's frame count (8 at 1 FPS, centred window) instead of the
  paper's evaluation sampling (30 at 3 FPS, which needs the 8 temporal embeddings interpolated).
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import world
from flamingo_cli.inference.media import MediaResolver
from flamingo_cli.inference.prompting import load_template, make_prompt_record
from flamingo_cli.inference.video import FrameSampling

if TYPE_CHECKING:
    from evaluate import MediaFiles

SEEDS = {"support": 71_000, "queries": 51_000, "fixed": 52_000, "shuffle": 53_000}
VIDEO_TASKS = ("direction", "becomes")
CANDIDATES = {"direction": list(world.DIRECTIONS), "becomes": list(world.COLOURS)}
TRAINING_SAMPLING = FrameSampling(frames=8, fps=1, clip="center")


def clips(seed: int, n: int, task: str) -> list[world.Clip]:
    """n clips of one task (a direction, or a colour change), training colour-shape combinations."""
    rng = random.Random(seed + VIDEO_TASKS.index(task))
    out: list[world.Clip] = []
    while len(out) < n:
        clip = world.random_clip(rng)
        if clip.task == task:
            out.append(clip)
    return out


def video_records(queries: list[world.Clip], support: list[world.Clip], files: MediaFiles, task: str, k: int) -> list[dict]:
    template = load_template("vqa")

    def make(clip, key):
        return {"id": key, "video": files.path(clip), "question": world.VIDEO_QUESTIONS[task],
                "answer": clip.answer(task)}

    pool = [make(c, f"support-{i}") for i, c in enumerate(support)]
    return [make_prompt_record(template, make(c, f"{task}-{i}"), pool, k=k, method="random", seed=0)
            for i, c in enumerate(queries)]


class ShuffledFrames(MediaResolver):
    """A resolver whose videos reach the resampler with their frames in a fixed random order.
    The encoder sees each frame alone, so permuting its features permutes the frames."""

    def _encode(self, path: str) -> torch.Tensor:
        features = super()._encode(path)
        order = list(range(features.shape[0]))
        random.Random(f"{SEEDS['shuffle']}:{Path(path).name}").shuffle(order)
        return features[order]


def accuracy(predictions: list[str], truths: list[str]) -> float:
    return sum(p == t for p, t in zip(predictions, truths)) / len(truths)


def run(runner, records: list[dict], task: str, *, generate: bool) -> dict:
    truths = [r["answer"] for r in records]
    entry = {"score": accuracy(runner.score(records, lambda r: CANDIDATES[task]), truths)}
    if generate:
        entry["generate"] = accuracy(runner.generate(records), truths)
    return entry


def fixed_accuracy(runner, files: MediaFiles, n: int) -> float:
    """4-shot `score` accuracy on n fixed held-out clips, half of each task: what the test checks."""
    right = 0
    for task in VIDEO_TASKS:
        records = video_records(clips(SEEDS["fixed"], n // 2, task), clips(SEEDS["support"], 32, task), files, task, 4)
        right += sum(p == r["answer"] for p, r in zip(runner.score(records, lambda r: CANDIDATES[task]), records))
    return right / (2 * (n // 2))


def video_evidence(model, make_runner, files: MediaFiles, n: int, fixed: int = 24) -> dict:
    """The video results; make_runner(model, resolver) is evaluate.py's Runner."""
    plain = make_runner(model, MediaResolver(model))
    out: dict = {"n": n, "fixed_videos": {"n": fixed, "accuracy": fixed_accuracy(plain, files, fixed)}}
    for task in VIDEO_TASKS:
        queries, support = clips(SEEDS["queries"], n, task), clips(SEEDS["support"], 32, task)
        shots = {k: video_records(queries, support, files, task, k) for k in (0, 4)}
        cells = {f"{k}_shots": run(plain, shots[k], task, generate=True) for k in (0, 4)}
        cells["shuffled_frames"] = run(make_runner(model, ShuffledFrames(model)), shots[4], task, generate=False)
        cells["8_frames"] = run(make_runner(model, MediaResolver(model, sampling=TRAINING_SAMPLING)), shots[4], task,
                                generate=True)
        embeddings = model.resampler.time_embs
        saved = embeddings.detach().clone()
        with torch.no_grad():
            embeddings.zero_()
        try:
            cells["time_embeddings_zeroed"] = run(make_runner(model, MediaResolver(model)), shots[4], task,
                                                  generate=False)
        finally:
            with torch.no_grad():
                embeddings.copy_(saved)
        out[task] = cells
    return out


def video_table(results: dict) -> str:
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    lines = [f"Held-out video questions, {results['n']} clips per task (`generate` / `score`; ablations by "
             "`score`, 4 shots; chance: direction 25%, becomes 50% between the colours before and after):", "",
             "| question | 0 shots | 4 shots | time embeddings zeroed | frames shuffled | 8 frames, not 30 |",
             "|---|---|---|---|---|---|"]
    names = {"direction": "Which way does it slide?", "becomes": "What colour does it become?"}
    for task, label in names.items():
        c = results[task]
        both = lambda cell: f"{pct(cell['generate'])} / {pct(cell['score'])}"  # noqa: E731
        lines.append(f"| {label} | {both(c['0_shots'])} | {both(c['4_shots'])} | "
                     f"{pct(c['time_embeddings_zeroed']['score'])} | {pct(c['shuffled_frames']['score'])} | "
                     f"{both(c['8_frames'])} |")
    fixed = results["fixed_videos"]
    lines += ["", f"4-shot `score` accuracy on the {fixed['n']} fixed held-out clips the test suite checks: "
              f"{pct(fixed['accuracy'])}."]
    return "\n".join(lines) + "\n"
