"""Pretraining (paper §2.4, App. A.3): a weighted sum of per-dataset NLL, every dataset in
every optimizer step.

    loss = sum_m lambda_m * NLL_m     (gradients accumulated over all datasets, not round-robin)

AdamW, linear warmup then a constant rate, global-norm clipping, no weight decay on the
resampler. Only the trainable parts have gradients or optimizer state. A checkpoint
holds the weights, the optimizer and schedule, the step and each dataset's position,
so a resumed run continues bitwise as if it had never stopped.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FlamingoError
from ..formats.artifacts import storage_errors
from .data import DatasetSpec, ExampleStream, batch_features, to_tensors
from .sampling import SamplingConfig

STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-4
    warmup: int = 5000  # linear warmup from 0, then constant (the paper's schedule)
    weight_decay: float = 0.1  # 0 for the resampler and the gates
    grad_clip: float = 1.0
    gate_lr_mult: float = 1.0  # zero-start gates move slowly in short runs; a documented option
    save_every: int = 1000
    dtype: str = "float32"  # autocast dtype for the forward; master weights stay fp32
    seed: int = 0


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID."""
        env = os.environ
        if "WORLD_SIZE" in env:
            return cls(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        if "SLURM_NTASKS" in env:
            return cls(int(env.get("SLURM_PROCID", 0)), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        return cls()

    def init_process_group(self, backend: str) -> None:
        """Join the group. Under plain `srun` (one task per GPU, no torchrun) there is no
        MASTER_ADDR: the node srun launched from hosts the rendezvous."""
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(backend, rank=self.rank, world_size=self.world)


def param_groups(model, config: TrainConfig) -> list[dict]:
    gates = [p for block in model.xattn.values() for p in (block.attn_gate, block.ff_gate)]
    gate_ids = {id(p) for p in gates}
    decayed = [p for p in [*model.xattn.parameters(), *model.new_tokens.parameters()] if id(p) not in gate_ids]
    return [
        {"params": decayed, "weight_decay": config.weight_decay, "lr_mult": 1.0},
        {"params": list(model.resampler.parameters()), "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": gates, "weight_decay": 0.0, "lr_mult": config.gate_lr_mult},
    ]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps from 0, then constant (step counts from 0)."""
    return config.lr * min(1.0, (step + 1) / max(1, config.warmup))


class Trainer:
    def __init__(self, model, specs: list[DatasetSpec], sampling: SamplingConfig, config: TrainConfig,
                 run_dir: str | Path, *, dist: Distributed | None = None, encode_images=None, log=None,
                 device: str = "cpu", fsdp: bool = False):
        self.model, self.specs, self.config = model, specs, config
        self.run_dir = Path(run_dir)
        self.dist = dist or Distributed()
        self.encode_images, self.device = encode_images, device
        self.log = log or (lambda msg: None)
        for spec in specs:
            if spec.batch < self.dist.world:
                raise FlamingoError(f"dataset {spec.name}: global batch {spec.batch} is smaller than "
                                    f"the {self.dist.world} processes")
        self.fsdp = fsdp and self.dist.world > 1
        if self.fsdp:
            shard(model, torch.device(device).type, self.dist.world)
        self.optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr, betas=(0.9, 0.999))
        self.step = 0
        self.positions = {spec.name: 0 for spec in specs}
        self.ddp = None
        if self.dist.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=None if device == "cpu" else [self.dist.local_rank])

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Collective under FSDP: every rank must call it."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            optimizer = get_optimizer_state_dict(self.model, self.optimizer,
                                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            optimizer = self.optimizer.state_dict()
        positions = [dict(self.positions)]
        if self.dist.world > 1:  # under --split shards every process has its own place in its shards
            positions = [None] * self.dist.world
            torch.distributed.all_gather_object(positions, dict(self.positions))
        return {"step": self.step, "optimizer": optimizer, "sharded_optimizer": self.fsdp,
                "positions": positions, "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "config": dict(self.config.__dict__)}

    def load_state(self, directory: Path) -> None:
        path = directory / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise FlamingoError(f"{path}: cannot read the training state ({str(e).splitlines()[0][:160]})") from None
        ranks = state["positions"]
        if len(ranks) == self.dist.world:
            positions = ranks[self.dist.rank]
        elif all(r == ranks[0] for r in ranks):  # --split samples: the same everywhere
            positions = ranks[0]
        else:
            raise FlamingoError(f"{path}: a --split shards run of {len(ranks)} processes resumes only with "
                                f"{len(ranks)} processes")
        missing = sorted(set(self.positions) - set(positions))
        if missing:
            raise FlamingoError(f"{path}: no data position for dataset(s) {', '.join(missing)}")
        if state.get("sharded_optimizer", False) != self.fsdp:
            raise FlamingoError(f"{path}: this run was {'' if state.get('sharded_optimizer') else 'not '}trained "
                                "with --fsdp; resume it the same way")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.positions = {name: positions[name] for name in self.positions}
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def save(self) -> None:
        from ..formats.checkpoint import save_checkpoint

        # Under FSDP, gathering the full weights and optimizer state takes every rank.
        weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                   for k, v in self.model.trainable_state_dict().items()}
        state = self.state_dict()
        if self.dist.rank != 0:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        save_checkpoint(self.model, self.run_dir / CHECKPOINT_DIR, extra={STATE_FILE: buffer.getvalue()},
                        weights=weights)

    # -- the loop -----------------------------------------------------------------------

    def _loss(self, batch: dict, global_tokens: int) -> torch.Tensor:
        """Summed NLL of this rank's slice over the global batch's token count: DDP averages
        gradients over ranks, so scaling by the world size gives the global mean exactly."""
        model = self.ddp or self.model
        ids = batch["input_ids"].to(self.device)
        kind = torch.device(self.device).type
        dtype = None if self.config.dtype == "float32" else getattr(torch, self.config.dtype)
        with torch.autocast(device_type=kind, dtype=dtype, enabled=dtype is not None):
            features = batch_features(batch["media"], self.encode_images, self.device)
            logits = model(ids, features=features, attention_mask=batch["attention_mask"].to(self.device),
                           next_image=batch["next_image"].to(self.device)).logits
        labels = batch["labels"].to(self.device)[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                ignore_index=-100, reduction="sum")
        return nll * self.dist.world / max(1, global_tokens)

    def accumulate(self, streams: dict[str, ExampleStream]) -> tuple[dict[str, float], int, int]:
        """Gradients of sum_m lambda_m * NLL_m from one global batch of every dataset. Returns
        each dataset's loss, and the tokens and examples seen."""
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        losses, tokens, examples = {}, 0, 0
        for i, spec in enumerate(self.specs):
            full = streams[spec.name].next_batch()  # the global batch, or this process's share
            foreign = {e for _, _, e in full} - {None, model.encoder_id}
            if foreign:
                raise FlamingoError(f"dataset {spec.name}: features made by encoder {foreign.pop()}, "
                                    f"but this checkpoint's encoder is {model.encoder_id}")
            stream = streams[spec.name]
            tokens_here = sum(sum(label != -100 for label in ex.labels[1:]) for ex, _, _ in full)
            if stream.local:  # this process's share only: the global count needs the others'
                global_tokens = self._global_sum(tokens_here)
                batch = to_tensors(full, model.pad_token_id)
            else:
                global_tokens = tokens_here
                batch = to_tensors(full[self.dist.rank::self.dist.world], model.pad_token_id)
            # Only the last backward of the step all-reduces (DDP) or reduce-scatters (FSDP) gradients.
            last = i == len(self.specs) - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                loss = self._loss(batch, global_tokens)
                (spec.weight * loss).backward()
            losses[spec.name] = self._global_mean(loss.detach())
            tokens += global_tokens
            examples += len(full) * (self.dist.world if stream.local else 1)
            self.positions[spec.name] = stream.stats.position
        return losses, tokens, examples

    def train(self, streams: dict[str, ExampleStream], progress=None) -> None:
        """Run from self.step to config.steps, saving every save_every steps and at the end."""
        config, model = self.config, self.model
        trainable = model.trainable_parameters()
        model.train()
        metrics = self.run_dir / METRICS_FILE
        while self.step < config.steps:
            start = time.perf_counter()
            lr = learning_rate(self.step, config)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            losses, tokens, examples = self.accumulate(streams)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            self.optimizer.step()
            self.step += 1
            seconds = time.perf_counter() - start
            # Collective under FSDP (gathers shards): every rank computes them.
            gates = gate_values(model)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if self.dist.rank == 0:
                record = {"step": self.step, "lr": lr, "loss": losses,
                          "weighted_loss": sum(s.weight * losses[s.name] for s in self.specs),
                          "grad_norm": grad_norm, "tokens_per_s": tokens / seconds,
                          "examples_per_s": examples / seconds,
                          "gates": gates,
                          "bad_samples": {n: s.stats.bad for n, s in streams.items()},
                          "empty_windows": {n: s.stats.empty for n, s in streams.items()}}
                with storage_errors(metrics), open(metrics, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix({n: f"{v:.3f}" for n, v in losses.items()})
            if self.step % config.save_every == 0 or self.step == config.steps:
                self.save()

    def _global_sum(self, count: int) -> int:
        if self.dist.world == 1:
            return count
        total = torch.tensor([count], dtype=torch.long)
        torch.distributed.all_reduce(total)
        return int(total)

    def _global_mean(self, loss: torch.Tensor) -> float:
        """This dataset's loss over the whole global batch (the ranks' slices already carry the scaling)."""
        if self.dist.world > 1:
            loss = loss.clone()
            torch.distributed.all_reduce(loss)
            return float(loss) / self.dist.world
        return float(loss)


def gate_values(model) -> dict:
    """tanh of every gate, per xattn layer: the curves the paper plots (a vector gate's mean)."""
    def value(p):
        p = p.detach()
        return float((p.full_tensor() if hasattr(p, "full_tensor") else p).tanh().mean())

    return {i: {"attn": value(b.attn_gate), "ffw": value(b.ff_gate)} for i, b in model.xattn.items()}


def shard(model, device_type: str, world: int) -> None:
    """FSDP2: every decoder layer, xattn block and the resampler is its own unit (the resampler
    also runs outside the model's forward), the rest sits in the root unit. Frozen and
    trainable parameters may share a unit: only the trainable ones get gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..model.lm import decoder_layers

    mesh = init_device_mesh(device_type, (world,))
    for module in [*decoder_layers(model.lm), *model.xattn.values(), model.resampler]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop metrics logged after the checkpoint's step: they will be redone."""
    from ..formats.artifacts import open_output

    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line)["step"] <= step]
    with open_output(str(path)) as f:
        f.writelines(keep)
