"""Pretraining steps: precomputed features vs raw images through the frozen encoder every step.

Builds a small but non-trivial Flamingo on the spot (nothing is downloaded): a random
6-layer x 256 LLaMA from flamingo_cli.tiny, a randomly initialised timm
vit_small_patch16_224 (~22M parameters) as the frozen vision encoder, a 2-layer
resampler with 64 latents and a GATED XATTN-DENSE block every 2 LM layers. It writes
64 synthetic 224px image-caption pairs twice: as a raw-image webdataset shard (png +
txt, img2dataset's layout) and as a feature shard (`write_feature_shards`, what
`flamingo encode --wds` writes). Encoding the feature shard is a one-off cost, reported
on its own and not part of any training timing.

Modes: features and raw images, each in float32 and with bfloat16 autocast
(TrainConfig.dtype; fast on CPUs with AMX). Each builds a `Trainer` the way `flamingo
pretrain` does (the checkpoint loaded without its encoder; for raw images the same
`ImageEncoder`, which loads the encoder lazily and encodes each batch's images in one
call) with one dataset of global batch 8. Each step is one `Trainer.train` call
timed with time.perf_counter, the modes' steps interleaved so that load from elsewhere
hits all of them alike: 2 warm-up steps, then 10 timed ones, rated by the median step.
Tokens are the loss-bearing tokens `Trainer.accumulate` counts (the count behind
metrics.jsonl's tokens_per_s). Checkpoint writes are switched off: they are not
training steps. With CUDA the same modes run on the GPU too; CPU-only machines skip
that. The whole run takes about a minute on 2 CPU cores.

    .venv/bin/python benchmarks/pretrain_step.py

Timings use torch's thread count (printed). On a machine shared with other jobs,
OMP_NUM_THREADS=1 avoids oversubscribed thread pools and gives stable numbers.
"""
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `flamingo` itself does; the user's setting wins

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from flamingo_cli.formats.checkpoint import load_checkpoint, load_checkpoint_encoder, new_model, save_checkpoint  # noqa: E402
from flamingo_cli.model.config import EncoderConfig, FlamingoConfig, ResamplerConfig, XAttnConfig  # noqa: E402
from flamingo_cli.training.data import ExampleStream, ImageEncoder, parse_specs  # noqa: E402
from flamingo_cli.inference.encoding import write_feature_shards  # noqa: E402
from flamingo_cli.training.sampling import SamplingConfig  # noqa: E402
from flamingo_cli.tiny import save_tiny_lm  # noqa: E402
from flamingo_cli.training.trainer import Trainer, TrainConfig  # noqa: E402

ENCODER = "vit_small_patch16_224"
IMAGES, SIZE = 64, 224
BATCH, WARMUP, STEPS = 8, 2, 10
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star", "diamond"]
SIZES = ["small", "large", "tiny", "big"]
PLACES = ["background", "corner", "table", "grass", "wall"]


# -- setup ------------------------------------------------------------------------------

def build_checkpoint(root: Path) -> tuple[Path, str]:
    """An untrained self-contained checkpoint (LM and encoder embedded); returns it and a size summary."""
    lm = save_tiny_lm(root / "lm", "llama", layers=6, hidden=256, heads=4)
    config = FlamingoConfig(
        encoder=EncoderConfig(name=ENCODER),
        resampler=ResamplerConfig(depth=2, heads=4, dim_head=64, num_latents=64),
        xattn=XAttnConfig(every=2, heads=4, dim_head=64),
    )
    config.lm.path = str(lm)
    model = new_model(config, seed=0)
    ckpt = save_checkpoint(model, root / "ckpt", embed_lm=True, embed_encoder=True)
    millions = lambda params: sum(p.numel() for p in params) / 1e6  # noqa: E731
    sizes = (f"llama 6x256 LM {millions(model.lm.parameters()):.1f}M and {ENCODER} "
             f"{millions(model.encoder.parameters()):.1f}M frozen; resampler depth 2 x 64 latents, "
             f"xattn every 2: {millions(model.trainable_parameters()):.1f}M trainable")
    return ckpt, sizes


def caption(rng: random.Random) -> str:
    """About ten words in the tiny tokenizer's vocabulary."""
    c, s = rng.sample(COLOURS, 2), rng.sample(SHAPES, 2)
    return (f"a {rng.choice(SIZES)} {c[0]} {s[0]} next to a {c[1]} {s[1]} "
            f"on the {rng.choice(PLACES)}")


def draw_image(rng: random.Random) -> Image.Image:
    """Random coloured shapes on a random background, with some noise so PNGs are not trivial."""
    image = Image.new("RGB", (SIZE, SIZE), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(SIZE - 40), rng.randrange(SIZE - 40)
        box = (x, y, x + rng.randrange(20, 120), y + rng.randrange(20, 120))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=rng.choice(COLOURS))
    noise = Image.effect_noise((SIZE, SIZE), 24).convert("RGB")
    return Image.blend(image, noise, 0.15)


def write_images(folder: Path) -> list[dict]:
    """IMAGES png files on disk; records {id, image, caption} as `flamingo encode` reads them."""
    folder.mkdir(parents=True)
    rng = random.Random(0)
    records = []
    for i in range(IMAGES):
        path = folder / f"{i:03d}.png"
        draw_image(rng).save(path)
        records.append({"id": f"{i:03d}", "image": str(path), "caption": caption(rng)})
    return records


def write_raw_shard(records: list[dict], path: Path) -> Path:
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for r in records:
            sink.write({"__key__": r["id"], "png": Path(r["image"]).read_bytes(), "txt": r["caption"].encode()})
    return path


def write_features_shard(ckpt: Path, records: list[dict], root: Path) -> tuple[Path, float]:
    """The feature shard, as `flamingo encode --wds` writes it; returns it and the seconds it took."""
    start = time.perf_counter()
    encoder, identity = load_checkpoint_encoder(ckpt)
    write_feature_shards(encoder, identity, records, str(root / "features-%06d.tar"), root=root / "cache",
                         batch_size=16, workers=1)
    return root / "features-000000.tar", time.perf_counter() - start


# -- training ---------------------------------------------------------------------------

def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class TimedRun:
    """One mode's Trainer, built as `flamingo pretrain` builds it, stepped one step at a time."""

    def __init__(self, ckpt: Path, shard: Path, run_dir: Path, *, raw: bool, dtype: str, device: str):
        torch.manual_seed(0)
        model = load_checkpoint(ckpt, with_encoder=False).to(device)
        specs = parse_specs([f"pairs={shard}"], [], [f"pairs={BATCH}"])
        sampling = SamplingConfig()
        self.config = TrainConfig(steps=0, warmup=10, dtype=dtype, save_every=10**9)
        self.trainer = Trainer(model, specs, sampling, self.config, run_dir, device=device,
                               encode_images=ImageEncoder(lambda: load_checkpoint_encoder(ckpt)[0], device)
                               if raw else None)
        self.trainer.save = lambda: None  # checkpoint writes are not training steps
        accumulate = self.trainer.accumulate

        def counting(streams):  # the loss-bearing tokens of each step, as the trainer counts them
            losses, tokens, examples = accumulate(streams)
            self.tokens.append(tokens)
            return losses, tokens, examples

        self.trainer.accumulate = counting
        self.streams = {s.name: ExampleStream(s, model.tokenizer, sampling, seed=0, model_config=model.config)
                        for s in specs}
        self.device, self.seconds, self.tokens = device, [], []
        run_dir.mkdir(parents=True)

    def step(self) -> None:
        """One optimizer step through `Trainer.train`, timed."""
        self.config.steps += 1
        sync(self.device)
        start = time.perf_counter()
        self.trainer.train(self.streams)
        sync(self.device)
        self.seconds.append(time.perf_counter() - start)

    def rates(self) -> tuple[float, float]:
        """(steps/s, tokens/s) from the median timed step, warm-up steps left out."""
        step = statistics.median(self.seconds[WARMUP:])
        return 1 / step, statistics.mean(self.tokens[WARMUP:]) / step


MODES = [  # (name, raw images?, autocast dtype)
    ("features", False, "float32"),
    ("raw images", True, "float32"),
    ("features", False, "bfloat16"),
    ("raw images", True, "bfloat16"),
]


def bench_device(ckpt: Path, shards: dict[bool, Path], root: Path, device: str) -> None:
    """All modes on one device, their steps interleaved so that load from elsewhere hits each alike."""
    runs = {(name, dtype): TimedRun(ckpt, shards[raw], root / f"run-{device}-{i}", raw=raw, dtype=dtype, device=device)
            for i, (name, raw, dtype) in enumerate(MODES)}
    for _ in range(WARMUP + STEPS):  # the warm-up steps load the encoder lazily, fill caches
        for run in runs.values():
            run.step()
    results = {mode: run.rates() for mode, run in runs.items()}
    raw = results["raw images", "float32"][0]
    for (name, dtype), (steps, tokens) in results.items():
        fp32 = results[name, "float32"][0]
        print(f"{device:>6} {name:>10} {dtype:>8} {steps:>8.2f} {tokens:>9.0f} {steps / raw:>9.1f}x "
              f"{steps / fp32:>9.2f}x")


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # as `flamingo` does off a terminal
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        ckpt, sizes = build_checkpoint(root)
        records = write_images(root / "images")
        raw_shard = write_raw_shard(records, root / "raw-000000.tar")
        features_shard, encode_s = write_features_shard(ckpt, records, root)
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        print(sizes)
        print(f"{IMAGES} {SIZE}px pairs, global batch {BATCH}, {WARMUP} warm-up + median of {STEPS} timed steps; "
              f"{torch.get_num_threads()} threads; devices {', '.join(devices)}")
        print(f"one-off: encoding {IMAGES} images into the feature shard took {encode_s:.1f} s (cpu)")
        print(f"{'device':>6} {'mode':>10} {'dtype':>8} {'steps/s':>8} {'tokens/s':>9} {'vs raw':>10} {'vs fp32':>10}")
        for device in devices:
            bench_device(ckpt, {False: features_shard, True: raw_shard}, root, device)
        print("vs raw: steps/s over raw images in float32 on the same device; vs fp32: over the same mode in float32")


if __name__ == "__main__":
    main()
