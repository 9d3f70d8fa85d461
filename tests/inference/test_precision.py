"""--dtype: the model held in bfloat16, cast once as it loads, not autocast at each call."""

import pytest
import torch

from conftest import toy_shot_records
from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT
from flamingo_cli.inference.generation import generate_records
from flamingo_cli.inference.media import load_for_inference
from flamingo_cli.inference.scoring import score_records

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]




@pytest.fixture(scope="module")
def models():
    return {dtype: load_for_inference(BUNDLED_CHECKPOINT, dtype=dtype) for dtype in (None, "bfloat16")}


def test_the_model_is_held_in_the_dtype_and_the_encoder_stays_float32(models):
    full, _ = models[None]
    half, media = models["bfloat16"]
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}, "LM, cross-attention and resampler"
    media.visuals(toy_shot_records()[0]["media"])  # image paths: the encoder loads on demand
    assert {p.dtype for p in media._encoder.parameters()} == {torch.float32}


def test_bfloat16_scores_are_near_float32s_and_rank_alike(models):
    (full_model, full_media), (half_model, half_media) = models[None], models["bfloat16"]
    full = list(score_records(full_model, toy_shot_records(), full_media, candidates=SHAPES))
    half = list(score_records(half_model, toy_shot_records(), half_media, candidates=SHAPES))
    for a, b in zip(full, half):
        assert max(abs(a["scores"][c] - b["scores"][c]) for c in SHAPES) < 0.5
        assert a["prediction"] == b["prediction"]
        assert a["scores"] != b["scores"], "the half-precision model really ran"


def test_bfloat16_generates_the_same_answers_here(models):
    (full_model, full_media), (half_model, half_media) = models[None], models["bfloat16"]
    full = generate_records(full_model, toy_shot_records(), full_media, num_beams=3, max_new_tokens=6)
    half = generate_records(half_model, toy_shot_records(), half_media, num_beams=3, max_new_tokens=6)
    assert [r["output"] for r in half] == [r["output"] for r in full]
    assert all(r["output"] for r in full)
