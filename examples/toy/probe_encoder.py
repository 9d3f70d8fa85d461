"""Does a contrastive encoder see where the shape is? A linear probe, before Flamingo is built on it.

    python probe_encoder.py ENCODER_DIR [--images 2000] [--max-error 0.5] > probe.json

Held-out images (seeds training never uses) through the frozen encoder; a ridge regression from
its pooled features to the shape's centre, fit on half of them and measured on the other half, as
a mean absolute error in fractions of the image, against a constant guess (the training half's
mean). A slide's direction is a change of place, so an encoder whose features cannot place the
shape leaves the direction questions at chance whatever Flamingo learns on top (stops 27-29).

Prints {"images", "error", "constant", "ratio"} as JSON; exits 1, saying so on stderr, when the
ratio of the errors (mean over x and y) is over --max-error.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402
from flamingo_cli.formats.checkpoint import load_encoder  # noqa: E402
from flamingo_cli.training.contrastive import pooled_features, read_encoder_dir  # noqa: E402

SEED = 30_000  # training seeds are below 10_000; evaluate.py's start at 40_000
RIDGE = 1e-2


def features_and_centres(encoder_dir: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoder = load_encoder(read_encoder_dir(encoder_dir), encoder_dir)
    transform = encoder.transform()
    rng = random.Random(SEED)
    items = [world.random_item(rng) for _ in range(n)]
    features = [pooled_features(encoder, torch.stack([transform(it.image()) for it in items[i:i + 256]]))
                for i in range(0, n, 256)]
    return torch.cat(features).double(), torch.tensor([it.centre for it in items], dtype=torch.float64)


def probe(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Ridge on standardised features, fit on the first half, errors on the second."""
    half = len(x) // 2
    mean, std = x[:half].mean(0), x[:half].std(0).clamp(min=1e-6)
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    a, b = x[:half], y[:half]
    w = torch.linalg.solve(a.T @ a + RIDGE * half * torch.eye(a.shape[1], dtype=a.dtype), a.T @ b)
    error = (x[half:] @ w - y[half:]).abs().mean(0)
    constant = (y[half:] - b.mean(0)).abs().mean(0)
    return {"images": len(x), "error": [round(v, 4) for v in error.tolist()],
            "constant": [round(v, 4) for v in constant.tolist()], "ratio": round((error / constant).mean().item(), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("encoder", type=Path, help="a directory `flamingo contrastive -o` wrote")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--max-error", type=float, default=0.5,
                        help="largest error allowed, as a fraction of the constant guess's")
    args = parser.parse_args()
    result = probe(*features_and_centres(args.encoder, args.images))
    print(json.dumps(result))
    if result["ratio"] > args.max_error:
        sys.exit(f"probe_encoder.py: {args.encoder} places the shape at {result['ratio']:.2f} of a constant "
                 f"guess's error (allowed {args.max_error}): its features hardly see position")


if __name__ == "__main__":
    main()
