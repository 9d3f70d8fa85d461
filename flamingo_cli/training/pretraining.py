"""The `pretrain` stage as one call: a checkpoint and a dataset mixture into a trained run directory."""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from .data import DatasetSpec, ExampleStream, MediaEncoder, ShardStream, check_shards
from .sampling import SamplingConfig
from .trainer import CHECKPOINT_DIR, Distributed, TrainConfig, Trainer, truncate_metrics


def join_process_group(dist: Distributed, device: str) -> str:
    """Under torchrun or SLURM, join the group (gloo on the CPU, else NCCL) and return this
    process's device: cuda:LOCAL_RANK for any accelerator device."""
    if dist.world > 1 and not torch.distributed.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl")
        if device != "cpu":
            device = f"cuda:{dist.local_rank}"
    return device


def saved_checkpoint(run_dir: str | Path) -> Path | None:
    """RUN/checkpoint when the run has saved one (what a resume continues from), else None."""
    path = Path(run_dir) / CHECKPOINT_DIR
    return path if (path / "config.yaml").exists() else None


def pretrain(start: str | Path, run_dir: str | Path, specs: list[DatasetSpec], sampling: SamplingConfig,
             config: TrainConfig, *, resume: bool = False, split: str = "samples", workers: int = 2,
             fsdp: bool = False, grad_checkpointing: bool = False, device: str = "cpu",
             dist: Distributed | None = None, log: Callable[[str], None] | None = None,
             progress: Callable[[int, int], contextlib.AbstractContextManager] | None = None) -> Trainer:
    """Train from checkpoint `start`, writing run_dir/checkpoint/ and run_dir/metrics.jsonl.

    With resume, `start` is the run's own saved checkpoint (saved_checkpoint): optimizer,
    data positions and random state come back with it, metrics logged after its step are
    dropped, and the run continues exactly. split: "samples" (every process reads the whole
    stream and keeps its slice) or "shards" (webdataset deals shards to processes and
    DataLoader workers). progress(total, initial) gives a tqdm-like bar updated per step."""
    from ..formats.checkpoint import load_checkpoint, load_checkpoint_encoder

    dist = dist or Distributed()
    log = log or (lambda msg: None)
    start, run = Path(start), Path(run_dir)
    check_shards(specs)
    torch.manual_seed(config.seed)
    model = load_checkpoint(start, with_encoder=False).to(device)
    model.set_activation_checkpointing(grad_checkpointing)
    encode_images = MediaEncoder(lambda: load_checkpoint_encoder(start)[0], device)
    run.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, specs, sampling, config, run, dist=dist, encode_images=encode_images, log=log,
                      device=device, fsdp=fsdp)
    if resume:
        trainer.load_state(start)
        truncate_metrics(run, trainer.step)
    if split == "shards":
        streams = {s.name: ShardStream(s, model.tokenizer, sampling, seed=config.seed, world=dist.world,
                                       workers=workers, position=trainer.positions[s.name], log=log,
                                       model_config=model.config) for s in specs}
    else:
        streams = {s.name: ExampleStream(s, model.tokenizer, sampling, seed=config.seed,
                                         position=trainer.positions[s.name], log=log, model_config=model.config)
                   for s in specs}
    with (progress or (lambda total, initial: contextlib.nullcontext()))(config.steps, trainer.step) as bar:
        trainer.train(streams, bar)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return trainer
