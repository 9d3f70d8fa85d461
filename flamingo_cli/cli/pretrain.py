"""`flamingo pretrain`: the resampler, gated cross-attention and new token rows, trained."""
from __future__ import annotations

import click

from .core import checkpoint_dir, preset_option, progress, quiet_libraries


def _preset_entries_for(data: list[str], **named: tuple[str, ...]) -> list[list[str]]:
    """A preset's per-dataset weights and batches apply to its own datasets: when --data on the
    command line replaces them, entries for datasets no longer present are dropped, not errors.
    A NAME=VALUE flag overrides the preset's entry for that NAME only (--weight vtp=1.0 keeps the
    preset's other weights), as a flag overrides one key of a preset."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    names = {item.partition("=")[0] for item in data}
    preset = ctx.default_map or {}
    out = []
    for param, entries in named.items():
        from_preset = entries if ctx.get_parameter_source(param) == ParameterSource.DEFAULT_MAP else [
            e for e in preset.get(param) or () if e.partition("=")[0] not in {g.partition("=")[0] for g in entries}]
        given = [] if from_preset is entries else list(entries)  # a flag naming no dataset stays an error
        out.append([e for e in from_preset if e.partition("=")[0] in names] + given)
    return out


@click.command(short_help="Train the resampler, gated cross-attention and new token rows.")
@preset_option("Preset NAME (stages/pretrain/NAME.yaml) or YAML FILE of option defaults.")
@click.option("--ckpt", envvar="FLAMINGO_CKPT", type=click.Path(),
              help="Checkpoint to start from (e.g. from flamingo init); also FLAMINGO_CKPT.")
@click.option("--run-dir", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory: checkpoint/ and metrics.jsonl go here.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint, exactly.")
@click.option("--data", multiple=True, help="NAME=SHARDS: a dataset of webdataset shards (brace patterns allowed). Repeat.")
@click.option("--weight", multiple=True,
              help="NAME=LAMBDA: the dataset's weight in the loss (default 1.0); replaces a preset's for NAME only.")
@click.option("--batch", multiple=True,
              help="NAME=B: the dataset's global batch size per step (default 8); replaces a preset's for NAME only.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Linear warmup steps, then a constant rate.")
@click.option("--weight-decay", type=float, default=0.1, show_default=True, help="AdamW decay; never on the resampler or gates.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Global gradient-norm clip.")
@click.option("--gate-lr-mult", type=float, default=1.0, show_default=True,
              help="Learning-rate multiplier for the tanh-gate scalars (zero-start gates move slowly in short runs).")
@click.option("--save-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Autocast dtype of the forward pass; master weights stay float32.")
@click.option("--split", type=click.Choice(["samples", "shards"]), default="samples", show_default=True,
              help="samples: every process reads the whole stream and keeps its slice of each global batch "
                   "(results independent of the process count); shards: webdataset deals shards to processes "
                   "and DataLoader workers (less reading at scale; results depend on the counts).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader workers decoding shards per process, with --split shards.")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard the model with FSDP2 (each LM layer, xattn block and the resampler) "
                   "instead of replicating it with DDP, for LMs too large for one device.")
@click.option("--grad-checkpointing", is_flag=True,
              help="Recompute decoder layers and xattn blocks in backward: less memory, more compute.")
@click.option("--window", type=click.IntRange(min=8), default=256, show_default=True,
              help="Tokens per interleaved sample.")
@click.option("--max-images", type=click.IntRange(min=1), default=5, show_default=True,
              help="Images kept per interleaved window.")
@click.option("--p-next", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Per document, probability that text attends to the next image instead of the previous.")
@click.option("--video-frames", type=click.IntRange(min=1), default=8, show_default=True,
              help="Frames per clip of a raw shard video (KEY.mp4, ...), from a window at a random start seeded by "
              "--seed and the video's bytes.")
@click.option("--video-fps", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Frames per second within such a clip (the paper: 8 frames at 1 FPS).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def pretrain(ckpt, run_dir, resume, data, weight, batch, steps, lr, warmup, weight_decay, grad_clip, gate_lr_mult,
             save_every, dtype, split, workers, fsdp, grad_checkpointing, window, max_images, p_next, video_frames,
             video_fps, device, seed, quiet):
    """Pretrain on a weighted mixture of webdataset shards, as the paper does.

    Every step accumulates gradients from every dataset, each loss scaled by its
    lambda (--weight); the LM and the vision encoder stay frozen. Shards hold
    image-caption pairs (a caption and an image) or interleaved documents (segments
    of text and image indices), with raw images or precomputed features from
    `flamingo encode --wds`; training from features never loads the encoder.
    Writes RUN/checkpoint/ (a checkpoint every stage accepts, plus the training
    state) and RUN/metrics.jsonl. Under torchrun or SLURM it trains with DDP, or
    with FSDP2 given --fsdp; the global batch does not depend on the process count.
    """
    from pathlib import Path

    from ..training.data import parse_specs
    from ..training.pretraining import join_process_group, pretrain as run_pretraining, saved_checkpoint
    from ..training.sampling import SamplingConfig
    from ..training.trainer import Distributed, TrainConfig

    quiet_libraries(quiet)
    dist = Distributed.from_env()
    device = join_process_group(dist, device)
    saved = saved_checkpoint(run_dir) if resume else None
    start = saved or Path(checkpoint_dir(ckpt, bundled=False))
    specs = parse_specs(list(data), *_preset_entries_for(list(data), weight=weight, batch=batch))
    config = TrainConfig(steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
                         gate_lr_mult=gate_lr_mult, save_every=save_every, dtype=dtype, seed=seed)
    sampling = SamplingConfig(window=window, max_images=max_images, p_next=p_next, video_frames=video_frames,
                              video_fps=video_fps)
    log = (lambda msg: click.echo(msg, err=True)) if dist.rank == 0 else (lambda msg: None)
    if resume and saved is None:
        log(f"flamingo pretrain: nothing to resume in {Path(run_dir)}; starting from {start}")

    def bar(total, initial):
        return progress(quiet or dist.rank != 0, total=total, initial=initial, unit="step", desc="pretrain")

    run_pretraining(start, run_dir, specs, sampling, config, resume=saved is not None, split=split, workers=workers,
                    fsdp=fsdp, grad_checkpointing=grad_checkpointing, device=device, dist=dist, log=log,
                    progress=bar)
