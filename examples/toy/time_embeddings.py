"""How fast a fresh Perceiver Resampler learns the order of frames: time embeddings from zeros
against a standard normal start (the resampler's, as OpenFlamingo's and flamingo-pytorch's).

    python time_embeddings.py [--ckpt DIR] [--clips 2200] [--steps 800] [--threads 2]

Direction clips of the toy world ("Which way does it slide?": only the frames' order tells), 8
frames spread over each, through a frozen encoder (by default the bundled model's); a resampler
of the toy preset's shape, and a learned query attending to its visual tokens, trained directly on
the four directions. Same data, seed and steps for both starts; held-out accuracy every 100 steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402
from flamingo_cli.formats.checkpoint import load_checkpoint_encoder, read_config  # noqa: E402
from flamingo_cli.model.resampler import PerceiverResampler  # noqa: E402

HELD_OUT = 200
DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "flamingo_cli" / "default_model"


def direction_features(ckpt: Path, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 8, tokens, d) features of n direction clips, and their directions as indices."""
    encoder, _ = load_checkpoint_encoder(ckpt)
    transform = encoder.eval().transform()
    rng = random.Random(5)
    features, labels = [], []
    while len(features) < n:
        clip = world.random_clip(rng)
        if clip.task != "direction":
            continue
        frames = clip.frames()
        spread = [round(i * (len(frames) - 1) / 7) for i in range(8)]
        with torch.no_grad():
            features.append(encoder(torch.stack([transform(frames[i]) for i in spread]).unsqueeze(0))[0])
        labels.append(list(world.DIRECTIONS).index(clip.direction))
    return torch.stack(features), torch.tensor(labels)


class Readout(nn.Module):
    """A learned query over the visual tokens, then the four directions."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.out = nn.Linear(dim, len(world.DIRECTIONS))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attn(self.query.expand(tokens.shape[0], -1, -1), tokens, tokens)
        return self.out(pooled[:, 0])


def accuracies(start: str, config, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    torch.manual_seed(0)
    resampler = PerceiverResampler(config)
    if start == "zeros":
        nn.init.zeros_(resampler.time_embs)
    readout = Readout(config.dim)
    optimiser = torch.optim.AdamW([*resampler.parameters(), *readout.parameters()], lr=1e-3)
    train_x, train_y, test_x, test_y = x[:-HELD_OUT], y[:-HELD_OUT], x[-HELD_OUT:], y[-HELD_OUT:]
    out = []
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(train_x), (32,))
        loss = nn.functional.cross_entropy(readout(resampler(train_x[batch])), train_y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            with torch.no_grad():
                out.append((readout(resampler(test_x)).argmax(-1) == test_y).float().mean().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT, help="checkpoint whose encoder makes the features")
    parser.add_argument("--clips", type=int, default=2200, help=f"direction clips (the last {HELD_OUT} held out)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = direction_features(args.ckpt, args.clips)
    config = dataclasses.replace(read_config(args.ckpt).resampler, max_frames=8)  # the toy preset's clips
    runs = {start: accuracies(start, config, x, y, args.steps) for start in ("zeros", "randn")}
    print("| step | " + " | ".join(f"time embeddings from {s}" for s in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for i in range(len(runs["zeros"])):
        print(f"| {(i + 1) * 100} | " + " | ".join(f"{runs[s][i]:.0%}" for s in runs) + " |")
    print(f"held-out accuracy on {HELD_OUT} clips, chance 25%", file=sys.stderr)


if __name__ == "__main__":
    main()
