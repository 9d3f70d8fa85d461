"""The Python API: load() and one call per task, the same prompts and functions the stages run."""
import json
from pathlib import Path

import pytest
from PIL import Image

from flamingo_cli import load
from flamingo_cli.inference.generation import generate_records
from flamingo_cli.inference.scoring import score_records

TOY = Path(__file__).resolve().parents[2] / "examples" / "toy"
SHOTS = [json.loads(line) for line in (TOY / "shots.jsonl").read_text().splitlines()][:4]
IMAGES = sorted((TOY / "images").glob("*.png"))[:2]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]


@pytest.fixture(scope="module")
def flamingo():
    return load()


def shot_prompt(shots, field, query="Output:"):
    return "".join(f"<image>Output: {s[field]}<|endofchunk|>" for s in shots) + "<image>" + query


def test_caption_is_generate_on_the_prompt_flamingo_prompt_would_build(flamingo):
    shots = [(TOY / s["image"], s["caption"]) for s in SHOTS]
    captions = flamingo.caption(IMAGES, shots=shots)
    records = [{"id": i, "prompt": shot_prompt(SHOTS, "caption"), "media": [str(p) for p, _ in shots] + [str(image)]}
               for i, image in enumerate(IMAGES)]
    assert captions == [r["output"] for r in generate_records(flamingo.model, records, flamingo.media)]
    assert captions == ["a blue diamond", "a blue triangle"]
    assert flamingo.caption(IMAGES[0], shots=shots) == captions[0], "one image, one string"


def test_pil_images_give_what_their_files_give_and_leave_nothing_behind(flamingo):
    shots = [(Image.open(TOY / s["image"]), s["caption"]) for s in SHOTS]
    assert flamingo.caption([Image.open(p) for p in IMAGES], shots=shots) == ["a blue diamond", "a blue triangle"]
    assert flamingo.media.inline == {}


def test_rank_is_score_best_first(flamingo):
    shots = [(TOY / s["image"], s["shape"]) for s in SHOTS]
    ranked = flamingo.rank(IMAGES[0], SHAPES, shots=shots)
    record = {"id": 0, "prompt": shot_prompt(SHOTS, "shape"), "media": [str(p) for p, _ in shots] + [str(IMAGES[0])]}
    [scored] = score_records(flamingo.model, [record], flamingo.media, candidates=SHAPES)
    assert ranked == sorted(scored["scores"].items(), key=lambda kv: -kv[1])
    assert ranked[0][0] == "diamond" and len(ranked) == len(SHAPES)


def test_answer_follows_the_vqa_template_and_zero_shots_is_the_query_alone(flamingo):
    question = "What colour is the shape?"  # the toy world's own wording
    shots = [(TOY / s["image"], question, s["colour"]) for s in SHOTS]
    answers = flamingo.answer(IMAGES, question, shots=shots)
    prompt = "".join(f"<image>Question: {question} Answer: {s['colour']}<|endofchunk|>" for s in SHOTS)
    records = [{"id": i, "prompt": prompt + f"<image>Question: {question} Answer:",
                "media": [str(p) for p, _, _ in shots] + [str(image)]} for i, image in enumerate(IMAGES)]
    assert answers == [r["output"] for r in generate_records(flamingo.model, records, flamingo.media)]
    assert answers == ["blue", "blue"]
    bare = {"id": 0, "prompt": "<image>Output:", "media": [str(IMAGES[0])]}
    assert flamingo.caption(IMAGES[0]) == generate_records(flamingo.model, [bare], flamingo.media)[0]["output"]
