"""Contrastive pretraining of the vision encoder, as the paper does before freezing it (§2.1).

An image tower (any timm model, its pooled features) and a small text tower are trained
so that matching image-caption pairs score higher than every other pairing in the batch:

    loss = CE(s * I·Tᵀ, targets) + CE(s * T·Iᵀ, targets)      (image→text + text→image InfoNCE)

I and T are L2-normalised projections and s a learned temperature, as in ALIGN/CLIP. Small
datasets repeat captions within a batch ("a red circle" twice): those pairs are positives of
each other, so the targets spread evenly over every item with the same caption instead of
pushing identical captions apart.

The image tower is then frozen for Flamingo; `save_encoder` writes it where `flamingo init
--encoder DIR` reads it.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.artifacts import storage_errors
from ..model.config import EncoderConfig
from ..model.vision_encoder import VisionEncoder

ENCODER_CONFIG_FILE = "encoder.yaml"
ENCODER_WEIGHTS_FILE = "encoder.safetensors"
TEXT_TOWER_FILE = "text_tower.safetensors"
METRICS_FILE = "metrics.jsonl"


@dataclass
class ContrastiveConfig:
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100  # linear warmup, then cosine decay to 0
    weight_decay: float = 0.1
    embed_dim: int = 128  # the shared embedding space
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_text_tokens: int = 32
    dtype: str = "float32"  # autocast dtype; master weights stay float32
    seed: int = 0


class TextTower(nn.Module):
    """Token embeddings + learned positions -> a small transformer encoder -> mean over real tokens."""

    def __init__(self, vocab_size: int, *, width: int, layers: int, heads: int, max_tokens: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.zeros(max_tokens, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (b, n) -> (b, width)."""
        x = self.embed(ids) + self.position[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask.bool()))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


def pool(image_model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """timm's own pooling, what forward_head sees before its classifier: (b, 3, h, w) -> (b, d)."""
    return image_model.forward_head(image_model.forward_features(pixels), pre_logits=True)


class DualEncoder(nn.Module):
    """Image and text towers projected into one space, with a learned temperature."""

    def __init__(self, image: nn.Module, image_dim: int, text: TextTower, text_dim: int, embed_dim: int):
        super().__init__()
        self.image, self.text = image, text
        self.image_proj = nn.Linear(image_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(pool(self.image, pixels)).float(), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.text(ids, mask)).float(), dim=-1)


def contrastive_loss(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor,
                     captions: list[str]) -> torch.Tensor:
    """The two-term InfoNCE loss over a batch of normalised embeddings (b, d). Items with the
    same caption are all positives: the target is uniform over them."""
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=images.device)
    targets = same / same.sum(1, keepdim=True)
    logits = scale * images @ texts.T  # (b, b): image i against text j
    image_to_text = -(targets * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets * logits.T.log_softmax(1)).sum(1).mean()
    return image_to_text + text_to_image


class PairImages(torch.utils.data.Dataset):
    """Image-caption records -> (pixels, caption), decoded and preprocessed in DataLoader workers."""

    def __init__(self, records: list[dict], transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        from ..inference.media import read_image

        record = self.records[i]
        return self.transform(read_image(record["image"])), record["caption"]


def _batches(dataset: PairImages, batch_size: int, seed: int, workers: int):
    """Endless shuffled batches, epoch after epoch, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=generator, persistent_workers=workers > 0)
    while True:
        yield from loader


def image_tower_config(name: str, kwargs: dict | None = None) -> EncoderConfig:
    """The config of a timm image tower to train here. The loss sees timm's pooled (normalised)
    tokens, so Flamingo should get the tokens after the final norm."""
    return EncoderConfig(name=name, kwargs=kwargs or {}, final_norm=True)


def check_pair_records(records: list[dict]) -> None:
    """Every record needs an `image` path and a `caption`."""
    from ..formats.artifacts import ArtifactError

    for r in records:
        if not isinstance(r.get("image"), str) or not isinstance(r.get("caption"), str):
            raise ArtifactError(f"{r.get('id', '<record>')}: contrastive needs 'image' (a path) and 'caption' fields")


def load_caption_tokenizer(directory: str):
    """A tokenizer directory (save_pretrained) for the captions; one without a pad token pads
    with its EOS (or UNK) token."""
    from transformers import AutoTokenizer

    from ..formats.artifacts import ArtifactError

    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{directory}: cannot load a tokenizer ({str(e).splitlines()[0][:160]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def train_contrastive(records: list[dict], encoder_config: EncoderConfig, tokenizer, config: ContrastiveConfig,
                      out_dir: str | Path, *, device: str = "cpu", workers: int = 1, progress=None) -> dict:
    """Train the dual encoder on image-caption records; write the image tower (and the text tower)
    to `out_dir`. Returns the last step's metrics."""
    from ..formats.checkpoint import load_encoder

    if len(records) < config.batch_size:
        raise ValueError(f"{len(records)} image-caption pairs is fewer than one batch of {config.batch_size}")
    torch.manual_seed(config.seed)
    encoder = load_encoder(encoder_config)  # frozen wrapper: here only for its model and preprocessing
    image_tower = encoder.model.requires_grad_(True).train()
    text = TextTower(len(tokenizer), width=config.text_width, layers=config.text_layers,
                     heads=config.text_heads, max_tokens=config.max_text_tokens)
    model = DualEncoder(image_tower, encoder.dim, text, config.text_width, config.embed_dim).to(device)
    no_decay = {id(p) for p in model.parameters() if p.ndim < 2}  # norms, biases, the temperature
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([
        {"params": [p for p in params if id(p) not in no_decay], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ], lr=config.lr)
    dtype = None if config.dtype == "float32" else getattr(torch, config.dtype)
    kind = torch.device(device).type
    data = _batches(PairImages(records, encoder.transform()), config.batch_size, config.seed, workers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    with storage_errors(metrics_path):
        metrics_path.write_text("")
    record = {}
    for step in range(1, config.steps + 1):
        start = time.perf_counter()
        lr = config.lr * min(step / max(1, config.warmup),
                             0.5 * (1 + math.cos(math.pi * max(0, step - config.warmup)
                                                 / max(1, config.steps - config.warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels, captions = next(data)
        tokens = tokenizer(list(captions), padding=True, truncation=True, max_length=config.max_text_tokens,
                           return_tensors="pt")
        with torch.autocast(device_type=kind, dtype=dtype, enabled=dtype is not None):
            images = model.embed_images(pixels.to(device))
            texts = model.embed_texts(tokens.input_ids.to(device), tokens.attention_mask.to(device))
        scale = model.log_scale.clamp(max=math.log(100)).exp()
        loss = contrastive_loss(images, texts, scale, list(captions))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            best = (images @ texts.T).argmax(1).tolist()
            accuracy = sum(captions[j] == c for j, c in zip(best, captions)) / len(captions)
        record = {"step": step, "lr": lr, "loss": loss.item(), "image_to_text_accuracy": accuracy,
                  "scale": scale.item(), "pairs_per_s": len(captions) / (time.perf_counter() - start)}
        with storage_errors(metrics_path), open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{accuracy:.2f}")
    model.eval()
    save_encoder(image_tower, encoder_config, out_dir, extra={TEXT_TOWER_FILE: {
        **{f"text.{k}": v for k, v in model.text.state_dict().items()},
        "text_proj.weight": model.text_proj.weight, "image_proj.weight": model.image_proj.weight,
        "log_scale": model.log_scale}}, training=asdict(config))
    return record


def save_encoder(model: nn.Module, config: EncoderConfig, out_dir: str | Path, *, extra: dict | None = None,
                 training: dict | None = None) -> Path:
    """Write DIR/encoder.safetensors (the timm state dict) and DIR/encoder.yaml (an EncoderConfig
    pointing at it), each atomically; `flamingo init --encoder DIR` reads the pair."""
    import yaml
    from safetensors.torch import save_file

    from ..formats.artifacts import atomic_path

    out_dir = Path(out_dir)
    for name, tensors in {ENCODER_WEIGHTS_FILE: model.state_dict(), **(extra or {})}.items():
        with atomic_path(out_dir / name) as tmp:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    described = EncoderConfig(**{**asdict(config), "weights": ENCODER_WEIGHTS_FILE})
    text = yaml.safe_dump({"encoder": asdict(described), **({"training": training} if training else {})},
                          sort_keys=False)
    with atomic_path(out_dir / ENCODER_CONFIG_FILE) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return out_dir


def read_encoder_dir(directory: str | Path) -> EncoderConfig:
    """The EncoderConfig a contrastive run wrote, its weights path made absolute."""
    import yaml

    from ..errors import ConfigError
    from ..model.config import _from_dict

    directory = Path(directory)
    path = directory / ENCODER_CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "encoder" not in data:
        raise ConfigError(f"{path}: expected an 'encoder' mapping")
    config = _from_dict(EncoderConfig, data["encoder"], f"{path}: encoder")
    if config.weights:
        config.weights = str((directory / config.weights).absolute())
    return config


def pooled_features(encoder: VisionEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """The pooled image embedding the contrastive loss saw, from a frozen encoder, for probes."""
    with torch.no_grad():
        return pool(encoder.model, pixels)
