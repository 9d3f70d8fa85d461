"""Evidence that the toy Flamingo learned its world and learns from shots in context.

    python evaluate.py --ckpt CKPT --out DIR [--n 100] [--videos 24] [--no-ablation]

Every image and episode here is drawn from seeds that training never uses. It measures:

- held-out images (new images of training colour-shape combinations), and held-out
  combinations never seen in training: caption exact match and colour / shape question
  accuracy, 4 shots from a support set, by `generate` (3 beams);
- task from context at 0, 1, 2 and 4 shots: the shots alone ("Output: a red circle",
  "Output: red" or "Output: circle") say whether to caption or name the colour or shape;
  by `generate` (exact match) and by `score` (ranked among every caption, colour and shape);
- novel labels at 0, 1, 2 and 4 shots: 2-way and 4-way episodes binding label words never
  seen in training to items; by `generate` and by `score` (ranked among the episode's words);
- the same curves by `score` with every gate forced to 0: the bare LM, the ablation;
- held-out video questions whose answers need the order of frames, with their ablations
  (video_evidence.py).

Prompts are built by the library the `prompt` stage uses (templates from stages/prompt) and
run through the functions the `generate` and `score` stages call. Writes DIR/results.json,
DIR/results.md and DIR/fewshot.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402
from video_evidence import video_evidence, video_table  # noqa: E402

from flamingo_cli.formats.checkpoint import load_checkpoint  # noqa: E402
from flamingo_cli.inference.generation import batches, generate_records  # noqa: E402
from flamingo_cli.inference.media import MediaResolver  # noqa: E402
from flamingo_cli.inference.prompting import load_template, make_prompt_record  # noqa: E402
from flamingo_cli.inference.scoring import score_record  # noqa: E402

SHOTS = (0, 1, 2, 4)
TASKS = ("caption", "colour", "shape")
# Evaluation seeds: training (make_data.py, train_lm.py) uses seeds below 10_000.
SEEDS = {"probe": 40_000, "support": 70_000, "held_out_images": 50_000, "held_out_combos": 60_000, "tasks": 80_000,
         "labels": 90_000}
MAX_NEW_TOKENS = 8


class MediaFiles:
    """Writes evaluation images (PNG) and clips (MP4) once, as files the stages read like any user's."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, media: world.Item | world.Clip) -> str:
        if isinstance(media, world.Clip):
            path = self.root / f"{media.colour}-{media.shape}-{media.task}-{media.seed:010d}.mp4"
            write = media.write
        else:
            path = self.root / f"{media.colour}-{media.shape}-{media.seed:010d}.png"
            write = media.image().save
        if not path.exists():
            write(path)
        return str(path)


def items(seed: int, n: int, combos=world.TRAIN_COMBOS) -> list[world.Item]:
    rng = random.Random(seed)
    return [world.random_item(rng, combos) for _ in range(n)]


def record(item: world.Item, images: MediaFiles, key: str, **fields) -> dict:
    return {"id": key, "image": images.path(item), "caption": item.caption, "colour": item.colour,
            "shape": item.shape, **fields}


class Runner:
    """The generate and score stages' library functions over one model."""

    def __init__(self, model, media: MediaResolver):
        self.model, self.media = model, media

    def generate(self, records: list[dict]) -> list[str]:
        out = []
        for batch in batches(records, 32):
            out += [r["output"] for r in generate_records(self.model, batch, self.media, num_beams=3,
                                                          max_new_tokens=MAX_NEW_TOKENS)]
        return out

    def score(self, records: list[dict], candidates) -> list[str]:
        return [score_record(self.model, r, self.media, candidates(r))["prediction"] for r in records]


def accuracy(predictions: list[str], truths: list[str]) -> float:
    return sum(p == t for p, t in zip(predictions, truths)) / len(truths)


def qa_records(queries: list[world.Item], support: list[world.Item], images: MediaFiles, task: str) -> list[dict]:
    """VQA-template prompts (4 shots) for one question type, or captioning prompts."""
    if task == "caption":
        template = load_template("captioning")
        make = lambda it, key: record(it, images, key)  # noqa: E731
    else:
        template = load_template("vqa")
        make = lambda it, key: record(it, images, key, question=world.QUESTIONS[task],  # noqa: E731
                                      answer=it.answer(task))
    pool = [make(it, f"support-{i}") for i, it in enumerate(support)]
    return [make_prompt_record(template, make(it, f"query-{i}"), pool, k=4, method="random", seed=0)
            for i, it in enumerate(queries)]


def held_out(runner: Runner, images: MediaFiles, n: int, support: list[world.Item]) -> dict:
    out = {}
    for name, combos in (("held_out_images", world.TRAIN_COMBOS), ("held_out_combos", world.TEST_COMBOS)):
        queries = items(SEEDS[name], n, combos)
        out[name] = {task: accuracy(runner.generate(qa_records(queries, support, images, task)),
                                    [q.answer(task) for q in queries]) for task in TASKS}
    return out


def caption_accuracy(runner: Runner, images: MediaFiles, n: int, support: list[world.Item]) -> float:
    """Caption exact match on the first n held-out images (4 shots): the number the test suite checks."""
    queries = items(SEEDS["held_out_images"], n)
    return accuracy(runner.generate(qa_records(queries, support, images, "caption")), [q.caption for q in queries])


def task_records(n: int, k: int, support: list[world.Item], images: MediaFiles) -> list[dict]:
    """Task from context: one task per query, drawn at random; shots answer that task."""
    template = load_template("captioning")
    rng = random.Random(SEEDS["tasks"] + k)
    out = []
    for i, query in enumerate(items(SEEDS["tasks"], n)):
        task = rng.choice(TASKS)
        pool = [record(it, images, f"support-{j}", caption=it.answer(task)) for j, it in enumerate(support)]
        q = record(query, images, f"task-{i}", caption=query.answer(task))
        out.append({**make_prompt_record(template, q, pool, k=k, method="random", seed=0), "task": task})
    return out


def bare_task_records(n: int, images: MediaFiles) -> list[dict]:
    """Task from context with no context at all: the query image alone, no text examples either.
    What the model does unprompted, against which the paper's zero-shot prompt (two text-only
    examples, which do name the task) is read."""
    template = load_template("captioning")
    return [{**record(it, images, f"bare-{i}", caption=it.answer(task)), "prompt": template.query,
             "media": [images.path(it)]} for i, (it, task) in enumerate(
                 zip(items(SEEDS["tasks"], n), [TASKS[i % 3] for i in range(n)]))]


ALL_ANSWERS = sorted({world.Item(c, s, 0).caption for c in world.COLOURS for s in world.SHAPES}
                     | set(world.COLOURS) | set(world.SHAPES))


def label_records(n: int, ways: int, k: int, images: MediaFiles) -> list[dict]:
    """Novel labels: `ways` items bound to held-out label words; k shots in all (each item
    shown at least once when k >= ways), then a new image of one of the items."""
    template = load_template("classification")
    rng = random.Random(SEEDS["labels"] + 100 * ways + k)
    out = []
    for i in range(n):
        classes = rng.sample(world.TRAIN_COMBOS, ways)
        words = rng.sample(world.HELD_OUT_LABELS, ways)
        order = list(range(ways))[:k] + [rng.randrange(ways) for _ in range(max(0, k - ways))]
        rng.shuffle(order)
        answer = rng.randrange(ways)
        make = lambda c, key: record(world.Item(*classes[c], rng.getrandbits(32)), images, key,  # noqa: E731
                                     label=words[c])
        shots = [make(c, f"shot-{j}") for j, c in enumerate(order)]
        query = make(answer, f"labels-{ways}-{i}")
        if k == 0:  # the paper's zero-shot: two text-only examples, here with the episode's words
            shots = [make(c, f"text-{j}") for j, c in enumerate(rng.sample(range(ways), 2))]
        prompt = make_prompt_record(template, query, shots, k=k, method="first", seed=0)
        out.append({**prompt, "candidates": words})
    return out


def curves(runner: Runner, n: int, support: list[world.Item], images: MediaFiles, *, generate: bool = True) -> dict:
    out = {"tasks": {}, "labels_2way": {}, "labels_4way": {}}
    records = bare_task_records(n, images)
    out["tasks_without_examples"] = {"score": accuracy(runner.score(records, lambda r: ALL_ANSWERS),
                                                       [r["caption"] for r in records])}
    for k in SHOTS:
        records = task_records(n, k, support, images)
        truths = [r["caption"] for r in records]
        entry = {"score": accuracy(runner.score(records, lambda r: ALL_ANSWERS), truths)}
        if generate:
            entry["generate"] = accuracy(runner.generate(records), truths)
        out["tasks"][k] = entry
        for ways in (2, 4):
            records = label_records(n, ways, k, images)
            truths = [r["label"] for r in records]
            entry = {"score": accuracy(runner.score(records, lambda r: r["candidates"]), truths)}
            if generate:
                entry["generate"] = accuracy(runner.generate(records), truths)
            out[f"labels_{ways}way"][k] = entry
    return out


def probe(encoder, images: MediaFiles, n_train: int = 1200, n_test: int = 600) -> dict:
    """Linear-probe accuracy of pooled encoder features for colour and shape: what a frozen
    encoder hands the resampler. Trained on one set of images, tested on another."""
    from flamingo_cli.training.contrastive import pooled_features

    transform = encoder.transform()

    def features(batch):
        from PIL import Image

        pixels = torch.stack([transform(Image.open(images.path(it)).convert("RGB")) for it in batch])
        return pooled_features(encoder, pixels).float()

    train, test = items(SEEDS["probe"], n_train), items(SEEDS["probe"] + 1, n_test)
    x_train, x_test = features(train), features(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    out = {}
    for attribute, classes in (("colour", list(world.COLOURS)), ("shape", list(world.SHAPES))):
        y_train = torch.tensor([classes.index(getattr(it, attribute)) for it in train])
        y_test = torch.tensor([classes.index(getattr(it, attribute)) for it in test])
        head = torch.nn.Linear(x_train.shape[1], len(classes))
        optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(300):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(head(x_train), y_train).backward()
            optimizer.step()
        out[attribute] = float((head(x_test).argmax(1) == y_test).float().mean())
    return out


def gate_table(metrics_path: Path) -> dict:
    """tanh of each layer's gates during pretraining, at a few steps, from RUN/metrics.jsonl."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    last = rows[-1]["step"]
    steps = sorted({s for s in (1, 50, 100, 250, 500, 1000, last) if s <= last})
    by_step = {r["step"]: r["gates"] for r in rows}
    return {s: by_step[s] for s in steps if s in by_step}


def zero_gates(model) -> None:
    """The ablation: tanh(0) = 0 closes every block, leaving the frozen LM alone."""
    with torch.no_grad():
        for block in model.xattn.values():
            block.attn_gate.zero_()
            block.ff_gate.zero_()


def evaluate(ckpt: str, out: Path, n: int, *, captions: int = 50, videos: int = 24, ablation: bool = True,
             metrics: Path | None = None) -> dict:
    from flamingo_cli.formats.checkpoint import load_encoder

    torch.manual_seed(0)
    model = load_checkpoint(ckpt).eval()
    random_init = load_encoder(dataclasses.replace(model.config.encoder, weights=None))
    encoders = {"random_init": probe(random_init, MediaFiles(out / "images")),
                "contrastive": probe(model.encoder, MediaFiles(out / "images"))}
    runner = Runner(model, MediaResolver(model))
    images = MediaFiles(out / "images")
    support = items(SEEDS["support"], 64)
    results = {"n": n, "checkpoint": str(ckpt),
               "fixed_captions": {"n": captions, "accuracy": caption_accuracy(runner, images, captions, support)},
               "encoder_probe": encoders, **held_out(runner, images, n, support),
               "curves": curves(runner, n, support, images),
               "video": video_evidence(model, Runner, MediaFiles(out / "videos"), n, fixed=videos)}
    if metrics is not None and metrics.exists():
        results["gates"] = gate_table(metrics)
    if ablation:
        zero_gates(model)
        runner = Runner(model, MediaResolver(model))
        results["ablation_gates_0"] = curves(runner, n, support, images, generate=False)
    return results


def table(results: dict) -> str:
    pct = lambda v: f"{100 * v:.0f}%"  # noqa: E731
    lines = [f"Held-out evaluation, {results['n']} queries per cell, 4 shots, `generate` (3 beams):", "",
             "| images | caption exact match | colour question | shape question |", "|---|---|---|---|"]
    for name, label in (("held_out_images", "new images, training combinations"),
                        ("held_out_combos", "colour-shape combinations never seen")):
        r = results[name]
        lines.append(f"| {label} | {pct(r['caption'])} | {pct(r['colour'])} | {pct(r['shape'])} |")
    probes = results["encoder_probe"]
    lines += ["", "Linear probe of pooled encoder features (held-out images):", "",
              "| encoder | colour | shape |", "|---|---|---|"]
    for name, label in (("random_init", "random init"), ("contrastive", "contrastive (frozen in Flamingo)")):
        lines.append(f"| {label} | {pct(probes[name]['colour'])} | {pct(probes[name]['shape'])} |")
    fixed = results["fixed_captions"]
    lines += ["", f"Caption exact match on the {fixed['n']} fixed held-out images the test suite checks: "
              f"{pct(fixed['accuracy'])}.", "",
              "Few-shot curves (accuracy; `generate` / `score`; ablation: `score` with every gate at 0):", "",
              "| curve | " + " | ".join(f"{k} shots" for k in SHOTS) + " |", "|---|" + "---|" * len(SHOTS)]
    names = {"tasks": "task from context", "labels_2way": "novel labels, 2-way", "labels_4way": "novel labels, 4-way"}
    for key, label in names.items():
        cells = results["curves"][key]
        lines.append(f"| {label} | " + " | ".join(
            f"{pct(cells[k]['generate'])} / {pct(cells[k]['score'])}" for k in SHOTS) + " |")
        if "ablation_gates_0" in results:
            cells = results["ablation_gates_0"][key]
            lines.append(f"| {label}, gates 0 | " + " | ".join(f"{pct(cells[k]['score'])}" for k in SHOTS) + " |")
    bare = results["curves"]["tasks_without_examples"]["score"]
    lines += ["", "Zero shots follow the paper: two text-only examples, which name the task. With no examples at "
              f"all (the query image alone), task from context scores {pct(bare)} by `score`."]
    if "gates" in results:
        layers = list(next(iter(results["gates"].values())))
        lines += ["", "tanh(gate) per LM layer during pretraining (attention / dense):", "",
                  "| step | " + " | ".join(f"layer {i}" for i in layers) + " |", "|---|" + "---|" * len(layers)]
        for step, gates in results["gates"].items():
            lines.append(f"| {step} | " + " | ".join(
                f"{gates[i]['attn']:.2f} / {gates[i]['ffw']:.2f}" for i in layers) + " |")
    return "\n".join(lines) + "\n\n" + video_table(results["video"])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
    titles = {"tasks": "task from context", "labels_2way": "novel labels, 2-way", "labels_4way": "novel labels, 4-way"}
    chance = {"tasks": None, "labels_2way": 0.5, "labels_4way": 0.25}
    for ax, (key, title) in zip(axes, titles.items()):
        cells = results["curves"][key]
        ax.plot(SHOTS, [cells[k]["generate"] for k in SHOTS], "o-", label="generate (3 beams)")
        ax.plot(SHOTS, [cells[k]["score"] for k in SHOTS], "s-", label="score (ranking)")
        if "ablation_gates_0" in results:
            ax.plot(SHOTS, [results["ablation_gates_0"][key][k]["score"] for k in SHOTS], "x--",
                    color="grey", label="score, gates 0 (bare LM)")
        if chance[key]:
            ax.axhline(chance[key], color="black", lw=0.8, ls=":", label="chance")
        ax.set_title(title)
        ax.set_xlabel("shots")
        ax.set_xticks(SHOTS)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default="results")
    parser.add_argument("--n", type=int, default=100, help="queries (or episodes) per cell")
    parser.add_argument("--captions", type=int, default=50, help="fixed held-out images for the caption check")
    parser.add_argument("--videos", type=int, default=24, help="fixed held-out clips for the video check")
    parser.add_argument("--no-ablation", action="store_true")
    parser.add_argument("--metrics", type=Path, help="the pretraining run's metrics.jsonl, for the gate table")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(args.out)
    results = evaluate(args.ckpt, out, args.n, captions=args.captions, videos=args.videos,
                       ablation=not args.no_ablation,
                       metrics=args.metrics)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(table(results))
    plot(results, out / "fewshot.png")
    print(table(results))


if __name__ == "__main__":
    main()
