"""Two benchmarks in miniature, in their native download layouts, from the toy world of examples/toy:
pictures the bundled model can read, so a sweep on them shows real few-shot behaviour.

    python examples/eval/toy_benchmarks.py DIR      # DIR/vqav2 (VQAv2 layout), DIR/hatefulmemes, DIR/coco, DIR/msrvttqa

- vqav2: "What colour is the shape?" with ten human answers (eight agree).
- hatefulmemes: the HatefulMemes layout with "hateful" meaning "the picture is red": a task
  the model can only learn from the demonstrations.
- coco: COCO's Karpathy-split layout (dataset_coco.json), five reference captions per picture,
  worded as people word them differently, for the caption metric suite.
- msrvttqa: the MSRVTT-QA layout, short H.264 clips of one toy shape, "What colour is the shape?".
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "toy"))

import world  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow"]


def make_vqav2(root: Path, n: int = 10) -> None:
    """A VQAv2 download in miniature: toy-world pictures, colour questions, ten answers each."""
    rng = random.Random(0)
    for split in ("train", "val"):
        (root / f"{split}2014").mkdir(parents=True)
        questions, annotations = [], []
        for i in range(n):
            image_id = 1000 * (split == "val") + i
            colour, shape = rng.choice(COLOURS), rng.choice(world.SHAPES)
            world.draw(colour, shape, seed=image_id).save(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg")
            qid = image_id * 10
            questions.append({"image_id": image_id, "question": "What colour is the shape?", "question_id": qid})
            answers = [colour] * 8 + [rng.choice(COLOURS)] * 2
            annotations.append({"question_id": qid, "image_id": image_id, "question_type": "what color",
                                "answer_type": "other", "multiple_choice_answer": colour,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                            for j, a in enumerate(answers)]})
        (root / f"v2_OpenEnded_mscoco_{split}2014_questions.json").write_text(json.dumps({"questions": questions}))
        (root / f"v2_mscoco_{split}2014_annotations.json").write_text(json.dumps({"annotations": annotations}))


def make_hatefulmemes(root: Path, n: int = 8) -> None:
    """A HatefulMemes download in miniature: `label` 1 for red pictures."""
    rng = random.Random(1)
    (root / "img").mkdir(parents=True)
    for split in ("train", "dev_seen"):
        lines = []
        for i in range(n):
            meme_id = 100 * (split == "dev_seen") + i
            colour = COLOURS[i % 2]  # both labels in every split
            world.draw(colour, rng.choice(world.SHAPES), seed=meme_id).save(root / "img" / f"{meme_id:05d}.png")
            lines.append(json.dumps({"id": meme_id, "img": f"img/{meme_id:05d}.png", "label": int(colour == "red"),
                                     "text": f"a {colour} picture"}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def make_coco(root: Path, n: int = 10) -> None:
    """A COCO Karpathy download in miniature: train and test pictures with five references each."""
    rng = random.Random(3)
    images = []
    for split in ("train", "test"):
        (root / f"{split}2014").mkdir(parents=True)
        for i in range(n):
            image_id = 1000 * (split == "test") + i
            colour, shape = rng.choice(COLOURS), rng.choice(world.SHAPES)
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            world.draw(colour, shape, seed=5000 + image_id).save(root / f"{split}2014" / name)
            a = world.article(colour)
            words = [f"{a} {colour} {shape}", f"a {shape} that is {colour}", f"{a} {colour} {shape} on a dark background",
                     f"a single {colour} {shape}", f"the {shape} is {colour}"]
            images.append({"filepath": f"{split}2014", "filename": name, "cocoid": image_id, "split": split,
                           "sentences": [{"raw": w, "tokens": w.split()} for w in words]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))


def make_msrvttqa(root: Path, n: int = 6, frames: int = 6) -> None:
    """An MSRVTT-QA download in miniature: clips of one shape redrawn in each frame (2 FPS,
    H.264), one colour question each; train clips are MSR-VTT's TrainValVideo, test its TestVideo."""
    import av
    import numpy as np

    rng = random.Random(2)
    for split, first in (("train", 0), ("test", 7010)):
        folder = root / ("TrainValVideo" if first < 7010 else "TestVideo")
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for i in range(n):
            video_id, colour, shape = first + i, rng.choice(COLOURS), rng.choice(world.SHAPES)
            with av.open(str(folder / f"video{video_id}.mp4"), "w") as out:
                stream = out.add_stream("libx264", rate=2)
                stream.width = stream.height = world.IMAGE_SIZE
                stream.pix_fmt = "yuv420p"
                for t in range(frames):
                    picture = np.asarray(world.draw(colour, shape, seed=video_id * 100 + t).convert("RGB"))
                    out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")))
                out.mux(stream.encode())
            items.append({"answer": colour, "id": 10 * video_id, "question": "what colour is the shape?",
                          "video_id": video_id})
        (root / f"{split}_qa.json").write_text(json.dumps(items))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--questions", type=int, default=24, help="VQAv2 questions per split")
    parser.add_argument("--memes", type=int, default=16, help="memes per split")
    parser.add_argument("--captions", type=int, default=16, help="COCO pictures per split")
    args = parser.parse_args()
    make_vqav2(args.dir / "vqav2", args.questions)
    make_hatefulmemes(args.dir / "hatefulmemes", args.memes)
    make_coco(args.dir / "coco", args.captions)
    make_msrvttqa(args.dir / "msrvttqa")
