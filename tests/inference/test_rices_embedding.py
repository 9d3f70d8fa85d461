"""RICES over a CLIP image embedding, as OpenFlamingo 2.0.1 ranks demonstrations.

The golden files under tests/golden/rices/ were written by OpenFlamingo's own RICES class
(tests/golden/make_rices_golden.py) with the tiny open_clip tower of tests/golden/openflamingo/:
open_clip's encode_image of each picture, and the demonstrations RICES.find returned.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flamingo_cli.formats.artifacts import EMBEDDING, ArtifactError, load_ref, make_ref, read_metadata, save_tensors
from flamingo_cli.model.config import EncoderConfig, FlamingoConfig

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
RICES = json.loads((GOLDEN / "rices" / "rices.json").read_text())
CLIP_WEIGHTS = GOLDEN / "openflamingo" / "clip.pt"
# float32 rounding between timm's attention and open_clip's nn.MultiheadAttention.
TOL = 1e-5


def golden_tower() -> EncoderConfig:
    """The golden preset's tiny CLIP tower (QuickGELU, width 16, projection to 24) with its weights."""
    config = FlamingoConfig.from_yaml((GOLDEN / "openflamingo" / "preset.yaml").read_text()).encoder
    config.weights = str(CLIP_WEIGHTS)
    return config


@pytest.fixture(scope="module")
def embedder():
    from flamingo_cli.importers.clip_towers import load_clip_embedding

    return load_clip_embedding(golden_tower())


@pytest.fixture(scope="module")
def encoder():
    from flamingo_cli.formats.checkpoint import load_encoder

    torch.manual_seed(0)
    return load_encoder(EncoderConfig(name="test_vit", kwargs={"img_size": 32}, random_init=True))


def image_records(names):
    return [{"id": n, "image": str(GOLDEN / "rices" / "images" / f"{n}.png")} for n in names]


def encode(encoder, embedder, records, root, **kw):
    from flamingo_cli.inference.encoding import encode_records

    return [r for batch in encode_records(encoder, "test-encoder", records, root=root, batch_size=4, workers=0,
                                          embedder=embedder, **kw) for r in batch]


def test_the_embedding_is_open_clips_encode_image(embedder, encoder, tmp_path):
    names = RICES["support"] + RICES["queries"]
    out = encode(encoder, embedder, image_records(names), tmp_path)
    ours = torch.cat([load_ref(r["embedding"])[0] for r in out])  # (1, 24) per image
    golden = load_file(str(GOLDEN / "rices" / "embedding.safetensors"))["embedding"]
    assert ours.shape == golden.shape == (len(names), 24)
    assert float((ours - golden).abs().max()) < TOL
    meta = read_metadata(out[0]["embedding"].rpartition("#")[0])
    assert meta["embedding"] == embedder.identity and meta["frames"] == "1" and meta["source"].endswith("s0.png")
    assert all(r["features"] != r["embedding"] and r["encoder"] == "test-encoder" for r in out)


def test_the_embedding_is_the_projected_cls_token_after_the_final_norm(embedder):
    pixels = torch.stack([embedder.transform()(Image.open(r["image"]).convert("RGB"))
                          for r in image_records(RICES["queries"])])
    model = embedder.encoder.model
    proj = torch.load(CLIP_WEIGHTS, weights_only=True)["visual.proj"]  # open_clip's (width, embed_dim)
    with torch.no_grad():
        tokens = model.forward_features(pixels)  # ln_post applied to every token
        by_hand = tokens[:, 0] @ proj
    assert torch.allclose(embedder(pixels), by_hand, atol=1e-6)
    assert embedder.encoder.config.kwargs["act_layer"] == "quick_gelu"


def test_cached_embeddings_are_not_recomputed_and_recomputed_ones_are_identical(embedder, encoder, tmp_path,
                                                                               monkeypatch):
    records = image_records(RICES["queries"])
    first = encode(encoder, embedder, records, tmp_path / "a")
    calls = []
    monkeypatch.setattr(type(embedder), "forward", lambda self, pixels: calls.append(pixels) or 1 / 0)
    assert encode(encoder, embedder, records, tmp_path / "a") == first  # found, not run again
    assert calls == []
    monkeypatch.undo()
    fresh = encode(encoder, embedder, records, tmp_path / "b")
    for a, b in zip(first, fresh):
        assert torch.equal(load_ref(a["embedding"])[0], load_ref(b["embedding"])[0])


def test_an_embedding_by_the_encoders_own_tower_lies_apart_from_its_features(embedder, tmp_path):
    from flamingo_cli.inference.encoding import encode_records

    records = image_records(["s0"])
    (out,) = next(encode_records(embedder.encoder, embedder.identity, records, root=tmp_path, workers=0,
                                 embedder=embedder))
    assert out["features"].rpartition("#")[0] != out["embedding"].rpartition("#")[0]
    assert load_ref(out["features"])[0].shape[-1] == 16 and load_ref(out["embedding"])[0].shape == (1, 24)


def test_rices_over_the_embedding_picks_what_openflamingo_picks(embedder, encoder, tmp_path):
    from flamingo_cli.inference.prompting import rices_shots

    encoded = {r["id"]: r for r in encode(encoder, embedder, image_records(RICES["support"] + RICES["queries"]),
                                          tmp_path)}
    support = [encoded[n] for n in RICES["support"]]
    queries = [encoded[n] for n in RICES["queries"]]
    for k, expected in RICES["find"].items():
        chosen = list(rices_shots(queries, support, int(k), vectors="embedding"))
        assert [[support[i]["id"] for i in row] for row in chosen] == expected, k


def embedding_record(tmp_path, name, frames, tower="clip"):
    path = save_tensors(tmp_path / f"{name}.safetensors", {EMBEDDING: torch.tensor(frames)}, {"embedding": tower})
    return {"id": name, "embedding": make_ref(path, EMBEDDING)}


def test_rices_ranks_by_cosine_similarity_of_the_embeddings_most_similar_last(tmp_path):
    from flamingo_cli.inference.prompting import rices_shots

    # Cosines with the query (3, 4)/5: s0 (1, 0) 0.6; s1 (0, 2) 0.8; s2 (6, 8) 1.0; s3 (-1, 1) 0.141;
    # s4, a video, frames (1, 0) and (0, 1) normalised and averaged to (0.5, 0.5): 0.990.
    support = [embedding_record(tmp_path, "s0", [[1.0, 0.0]]), embedding_record(tmp_path, "s1", [[0.0, 2.0]]),
               embedding_record(tmp_path, "s2", [[6.0, 8.0]]), embedding_record(tmp_path, "s3", [[-1.0, 1.0]]),
               embedding_record(tmp_path, "s4", [[3.0, 0.0], [0.0, 0.5]])]
    query = embedding_record(tmp_path, "q", [[3.0, 4.0]])
    chosen = {k: next(rices_shots([query], support, k, vectors="embedding")) for k in (1, 3, 5)}
    assert chosen == {1: [2], 3: [1, 4, 2], 5: [3, 0, 1, 4, 2]}
    # The pooled features of the same records are not what ranks: they have none.
    with pytest.raises(ArtifactError, match="s0: --select rices needs a 'features' reference"):
        next(rices_shots([query], support, 1, vectors="pooled"))


def test_records_without_embeddings_or_from_two_towers_are_one_error(tmp_path):
    from flamingo_cli.inference.prompting import rices_shots

    support = [embedding_record(tmp_path, "s0", [[1.0, 0.0]]), {"id": "s1", "features": "x.safetensors#features"}]
    with pytest.raises(ArtifactError, match=r"^s1: no 'embedding' .*`flamingo encode --embedding "
                                            r"vit_large_patch14_clip_224\.openai`$"):
        next(rices_shots([support[0]], support, 1, vectors="embedding"))
    other = embedding_record(tmp_path, "s2", [[0.0, 1.0]], tower="another")
    with pytest.raises(ArtifactError, match=r"embeddings come from different towers \(another, clip\)"):
        next(rices_shots([other], support[:1], 1, vectors="embedding"))
    with pytest.raises(ValueError, match="unknown rices vectors 'clip'"):
        next(rices_shots([other], support[:1], 1, vectors="clip"))


def test_a_named_tower_is_run_as_openflamingo_runs_openais_clip():
    from flamingo_cli.importers.clip_towers import embedding_config

    config = embedding_config("vit_large_patch14_clip_224.openai", "clip.pt")
    assert (config.kwargs, config.pretrained, config.weights) == ({"act_layer": "quick_gelu"}, True, "clip.pt")
    assert embedding_config("vit_huge_patch14_clip_224.laion2b").kwargs == {}  # GELU, as LAION trained it
