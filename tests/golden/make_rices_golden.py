"""Golden RICES from the real OpenFlamingo, for tests/inference/test_rices_embedding.py.

Runs in the virtual environment of make_openflamingo_golden.py (OpenFlamingo 2.0.1, open_clip 2.20),
offline, on the CPU:

    /tmp/ofvenv/bin/python tests/golden/make_rices_golden.py tests/golden/rices

It loads the tiny open_clip tower of tests/golden/openflamingo/clip.pt (QuickGELU, width 16,
projection to 24) into OpenFlamingo's own RICES class (open_flamingo/eval/rices.py: open_clip's
create_model_and_transforms, its evaluation transform, encode_image, L2 normalisation, cosine
ranking, the top k reversed), over small pictures of several sizes, and writes:

    images/s<i>.png, images/q<i>.png   the support and query pictures
    embedding.safetensors              open_clip's encode_image of every picture (support, then queries),
                                       before RICES normalises it: `embedding` (n, 24)
    rices.json                         the support and query names, and for each k the support names
                                       RICES.find returns per query, in its order (most similar last)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_openflamingo_golden import CLIP_CONFIG, CLIP_NAME  # noqa: E402

import open_flamingo  # noqa: E402

sys.path.insert(0, str(Path(open_flamingo.__file__).parent / "eval"))  # rices.py imports eval/utils.py as `utils`
from rices import RICES  # noqa: E402

CLIP_WEIGHTS = Path(__file__).resolve().parent / "openflamingo" / "clip.pt"
SIZES = [(120, 80), (64, 96), (100, 100), (90, 60), (70, 110), (128, 96), (80, 80), (96, 64)]
QUERY_SIZES = [(110, 70), (60, 90), (88, 88)]
KS = (1, 2, 4, 8)


def picture(seed: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.1, 1, 3)
    grad = np.linspace(0, 255, h, dtype=np.float32)[:, None, None] * rng.uniform(0.1, 1, 3)
    img = Image.fromarray(((base + grad) / 2).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        draw.rectangle([x, y, x + 20, y + 16], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def main(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    clip_dir = Path(tempfile.mkdtemp())
    (clip_dir / f"{CLIP_NAME}.json").write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(clip_dir)

    names = [f"s{i}" for i in range(len(SIZES))] + [f"q{i}" for i in range(len(QUERY_SIZES))]
    for seed, (name, (w, h)) in enumerate(zip(names, SIZES + QUERY_SIZES)):
        picture(seed, w, h).save(out / "images" / f"{name}.png")
    pics = {name: Image.open(out / "images" / f"{name}.png") for name in names}
    support, queries = names[: len(SIZES)], names[len(SIZES):]

    dataset = [{"image": pics[name], "name": name} for name in support]
    rices = RICES(dataset, "cpu", 4, vision_encoder_path=CLIP_NAME, vision_encoder_pretrained=str(CLIP_WEIGHTS))
    with torch.no_grad():
        embedding = rices.model.encode_image(torch.stack([rices.image_processor(pics[n]) for n in names]))
        query = embedding[len(support):] / embedding[len(support):].norm(dim=-1, keepdim=True)
        similarity = query @ rices.features.T
    # Near ties would make the golden order depend on float rounding rather than on the method.
    gaps = similarity.sort(dim=-1).values.diff(dim=-1)
    if float(gaps.min()) < 1e-4:
        raise SystemExit(f"near-tied similarities ({float(gaps.min()):.2e}): choose other pictures")
    found = {str(k): [[d["name"] for d in row] for row in rices.find([pics[q] for q in queries], k)] for k in KS}
    save_file({"embedding": embedding.contiguous()}, str(out / "embedding.safetensors"))
    (out / "rices.json").write_text(json.dumps({"support": support, "queries": queries, "find": found}, indent=1)
                                    + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
