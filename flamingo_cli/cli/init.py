"""`flamingo init`: an untrained checkpoint around a frozen LM and vision encoder."""
from __future__ import annotations

import os

import click

from .core import init_config, quiet_libraries


def choose_encoder_weights(encoder, random: bool) -> None:
    """An encoder never gets random weights by accident: a timm name with a pretrained tag means
    those weights; random ones only when asked for."""
    import timm

    if random:
        if encoder.weights:
            raise click.UsageError("--random-encoder and encoder weights contradict each other")
        encoder.random_init, encoder.pretrained = True, False
    elif not encoder.weights and not encoder.random_init:
        if "." in encoder.name:
            encoder.pretrained = True
        elif not encoder.pretrained and timm.is_model(encoder.name):
            raise click.UsageError(f"encoder {encoder.name} has no weights: give --encoder-weights FILE, a pretrained "
                                   f"tag ({encoder.name}.TAG, downloaded when online), or --random-encoder")


@click.command(short_help="Create an untrained checkpoint.")
@click.option("-c", "--config", "config_path",
              help="A FlamingoConfig preset: NAME (stages/init/NAME.yaml, e.g. tiny, openflamingo-3b) or YAML FILE.")
@click.option("--lm", help="The frozen causal LM: a local directory, or a hub repo id (fetched into the hub cache; "
              "offline, read from it).")
@click.option("--lm-revision", help="With --lm a hub repo id: its branch, tag or commit (default: main).")
@click.option("--lm-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype the frozen LM is held in.")
@click.option("--encoder", help="The frozen vision encoder: a timm model name, or a directory written by "
              "flamingo contrastive.")
@click.option("--encoder-weights", type=click.Path(dir_okay=False),
              help="The encoder's weights: a local file, or a hub repo id holding them (timm's or open_clip's).")
@click.option("--random-encoder", is_flag=True,
              help="Draw the encoder's weights at random (tests, toy runs), recorded in the checkpoint. Otherwise "
              "the encoder needs --encoder-weights, a pretrained tag (NAME.TAG, downloaded when online) or a "
              "preset that names its weights.")
@click.option("--every", type=click.IntRange(min=1), help="A GATED XATTN-DENSE block every N LM layers.")
@click.option("--placement", type=click.Choice(["paper", "openflamingo"]),
              help="paper: layers 0, N, 2N...; openflamingo: layers where (i+1) % N == 0.")
@click.option("--latents", type=click.IntRange(min=1), help="Visual tokens per image (resampler latents).")
@click.option("--embed", is_flag=True, default=None, help="Copy the LM and encoder weights into the checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the new weights.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
def init(config_path, lm, lm_revision, lm_dtype, encoder, encoder_weights, random_encoder, every, placement, latents, embed,
         seed, out):
    """Create an untrained checkpoint around a frozen LM and vision encoder.

    The gates start at 0, so the new model computes exactly what the LM does until
    it is trained. The resampler's width is taken from the encoder.
    """
    from ..formats.checkpoint import new_model, save_checkpoint
    from ..model.config import EncoderConfig

    quiet_libraries()
    config = init_config(config_path)
    for value, section, field in [(lm, config.lm, "path"), (lm_revision, config.lm, "revision"),
                                  (lm_dtype, config.lm, "dtype"),
                                  (every, config.xattn, "every"), (placement, config.xattn, "placement"),
                                  (latents, config.resampler, "num_latents")]:
        if value is not None:
            setattr(section, field, value)
    if encoder is not None:
        if os.path.isdir(encoder):  # written by flamingo contrastive
            from ..training.contrastive import read_encoder_dir

            config.encoder = read_encoder_dir(encoder)
        elif encoder != config.encoder.name:  # the preset's own encoder keeps its settings (QuickGELU, ...)
            config.encoder = EncoderConfig(name=encoder)
    if encoder_weights is not None:
        config.encoder.weights = encoder_weights
    choose_encoder_weights(config.encoder, random_encoder)
    model = new_model(config, seed=seed)
    save_checkpoint(model, out, embed_lm=bool(embed), embed_encoder=bool(embed) or config.encoder.weights is None)
    n = sum(p.numel() for p in model.trainable_parameters())
    click.echo(f"wrote {out}: {n:,} trainable parameters, xattn before LM layers "
               f"{', '.join(model.xattn.keys())} (untrained)", err=True)
