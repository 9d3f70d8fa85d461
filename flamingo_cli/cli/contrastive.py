"""`flamingo contrastive`: a vision encoder pretrained on image-caption pairs."""
from __future__ import annotations

import click

from .core import input_records, key_values, preset_option, progress, quiet_libraries
from .placing import single_process


@click.command(short_help="Pretrain a vision encoder contrastively on image-caption pairs.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@preset_option("Preset NAME (stages/contrastive/NAME.yaml) or YAML FILE of option defaults.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write: encoder.yaml, encoder.safetensors, text_tower.safetensors, metrics.jsonl.")
@click.option("--encoder", default="vit_tiny_patch16_224", show_default=True, help="timm model name of the image tower.")
@click.option("--encoder-arg", multiple=True,
              help="KEY=VALUE passed to timm.create_model (YAML value), e.g. img_size=32. Repeat.")
@click.option("--tokenizer", required=True, type=click.Path(),
              help="A tokenizer directory (save_pretrained) for the captions, e.g. the LM's.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True,
              help="Linear warmup steps, then cosine decay.")
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--embed-dim", type=click.IntRange(min=1), default=128, show_default=True,
              help="Width of the shared image-text embedding space.")
@click.option("--text-width", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--text-layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="DataLoader processes decoding images.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Autocast dtype; master weights stay float32.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def contrastive(input, out_dir, encoder, encoder_arg, tokenizer, steps, batch_size, lr, warmup, weight_decay,
                embed_dim, text_width, text_layers, workers, dtype, device, seed, quiet):
    """Pretrain a vision encoder contrastively, as Flamingo does before freezing it.

    Reads image-caption records ({"image": PATH, "caption": TEXT}, JSON Lines; - or
    no INPUT is stdin) and trains the timm image tower with a small text tower on
    the two-term contrastive loss (image->text and text->image InfoNCE, learned
    temperature). Records with the same caption count as positives of each other.
    Writes OUT/encoder.yaml and OUT/encoder.safetensors, which `flamingo init
    --encoder OUT` takes as the frozen encoder, plus the text tower and metrics.jsonl.
    """
    import yaml

    from ..formats.artifacts import ArtifactError
    from ..training.contrastive import (ContrastiveConfig, check_pair_records, image_tower_config,
                                        load_caption_tokenizer, train_contrastive)

    single_process("contrastive")
    quiet_libraries(quiet)
    kwargs = {key: yaml.safe_load(value) for key, value in key_values(encoder_arg, "--encoder-arg")}
    records = list(input_records(input))  # training draws batches from all of them
    check_pair_records(records)
    tok = load_caption_tokenizer(tokenizer)
    if text_width % ContrastiveConfig.text_heads:
        raise click.BadParameter(f"must be a multiple of the text tower's {ContrastiveConfig.text_heads} heads",
                                 param_hint="--text-width")
    config = ContrastiveConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                               embed_dim=embed_dim, text_width=text_width, text_layers=text_layers, dtype=dtype,
                               seed=seed)
    encoder_config = image_tower_config(encoder, kwargs)
    try:
        with progress(quiet, total=steps, unit="step", desc="contrastive") as bar:
            last = train_contrastive(records, encoder_config, tok, config, out_dir, device=device, workers=workers,
                                     progress=bar)
    except ValueError as e:
        raise ArtifactError(f"{input}: {e}") from None
    click.echo(f"wrote {out_dir}: loss {last['loss']:.3f}, in-batch image->text accuracy "
               f"{last['image_to_text_accuracy']:.2f}", err=True)
