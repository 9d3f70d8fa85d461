"""`make demo`: few-shot captioning with an interleaved prompt, end to end.

The bundled toy model does not exist yet (a later issue trains it), so this builds a
tiny *untrained* checkpoint on the spot: a 4-layer LLaMA with a locally trained
tokenizer and a 2-block ViT, all random. The pipeline is real (encoder -> resampler ->
gated cross-attention -> 3-beam search stopping at <|endofchunk|>); the words are noise.
Records go to stdout as JSON Lines; everything else goes to stderr.
"""
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from flamingo_cli.checkpoint import load_checkpoint, new_model, save_checkpoint
from flamingo_cli.config import FlamingoConfig
from flamingo_cli.tiny import save_tiny_lm

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".cache" / "demo"

SHAPES = {  # name -> (colour, polygon or ellipse in a 64x64 frame)
    "red circle": ("red", "ellipse"),
    "blue square": ("blue", [(14, 14), (50, 14), (50, 50), (14, 50)]),
    "green triangle": ("green", [(32, 10), (54, 52), (10, 52)]),
}


def draw(colour: str, shape) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    pen = ImageDraw.Draw(image)
    if shape == "ellipse":
        pen.ellipse((12, 12, 52, 52), fill=colour)
    else:
        pen.polygon(shape, fill=colour)
    return image


def untrained_checkpoint() -> Path:
    ckpt = WORK / "ckpt"
    if not (ckpt / "config.yaml").exists():
        lm = save_tiny_lm(WORK / "lm", "llama", layers=4, hidden=128)
        config = FlamingoConfig.from_yaml((ROOT / "stages/init/tiny.yaml").read_text())
        config.lm.path = str(lm)
        save_checkpoint(new_model(config, seed=0), ckpt, embed_lm=True, embed_encoder=True)
    return ckpt


def main() -> None:
    print("flamingo demo: the bundled default model does not exist yet, so this runs a tiny UNTRAINED "
          "model built on the spot. The pipeline is real; its captions are noise.", file=sys.stderr)
    model = load_checkpoint(untrained_checkpoint())
    transform = model.encoder.transform()
    names = list(SHAPES)
    pixels = torch.stack([transform(draw(*SHAPES[n])) for n in names])
    with torch.no_grad():
        visual = model.resample(model.encode(pixels))  # (3, latents, d)
    shots = [n for n in names[:2]]
    prompt = "".join(f"<image>Output: a {n}.<|endofchunk|>" for n in shots) + "<image>Output:"
    ids = model.tokenizer(prompt, return_tensors="pt").input_ids
    new = model.generate(ids, visual.unsqueeze(0), num_beams=3, max_new_tokens=12)
    output = model.tokenizer.decode(new[0], skip_special_tokens=True)
    record = {"id": names[2].replace(" ", "-"), "shots": shots, "prompt": prompt, "output": output,
              "model": "untrained-tiny"}
    print(json.dumps(record, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
