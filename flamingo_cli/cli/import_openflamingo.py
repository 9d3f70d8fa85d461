"""`flamingo import openflamingo`: an OpenFlamingo checkpoint into a checkpoint directory."""
from __future__ import annotations

import click

from .core import init_config, quiet_libraries


@click.command(name="openflamingo", short_help="Import an OpenFlamingo checkpoint, strictly.")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--revision", help="With CHECKPOINT a hub repo id: its branch, tag or commit (default: main).")
@click.option("-c", "--config", "config_path",
              help="A preset (openflamingo-3b, openflamingo-4b, openflamingo-9b) or YAML file. It names the LM and "
              "encoder, and the import fails if the checkpoint contradicts it. Default: a released repo's own "
              "preset; for a file, the architecture is read from it, and --lm is required.")
@click.option("--lm", help="The LM the checkpoint was trained with: a local directory (or a hub id when online).")
@click.option("--lm-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype the frozen LM is held in.")
@click.option("--encoder", help="The CLIP tower the checkpoint was trained with, as a timm name (e.g. "
              "vit_base_patch32_clip_224.openai). Its width is the perceiver's, QuickGELU goes with OpenAI's weights, "
              "and preprocessing is set to OpenFlamingo's where timm's differs (said on stderr). Default: the "
              "preset's, vit_large_patch14_clip_224.openai.")
@click.option("--encoder-weights", type=click.Path(dir_okay=False),
              help="The encoder's weights, in timm's or open_clip's layout (e.g. open_clip_pytorch_model.bin): a "
              "file, or a hub repo id holding one. "
              "Default: timm's pretrained weights for the encoder's name, downloaded.")
@click.option("--take-lm-rows", is_flag=True,
              help="Where the file's embedding rows of the LM's own tokens differ from the LM's (a run that trained "
              "them all), use the file's, as OpenFlamingo does; they are stored in the checkpoint. Default: an error.")
@click.option("--embed", is_flag=True, help="Copy the LM and encoder weights into the checkpoint.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
def import_openflamingo(checkpoint, revision, config_path, lm, lm_dtype, encoder, encoder_weights, take_lm_rows, embed,
                        out):
    """Import CHECKPOINT, a file written by OpenFlamingo's training (checkpoint_*.pt) or a
    released OpenFlamingo checkpoint.pt, into a checkpoint directory that every stage reads.
    CHECKPOINT may be a hub repo id (openflamingo/OpenFlamingo-9B-vitl-mpt7b): its checkpoint.pt
    is fetched, and a released repo brings its preset, whose LM and CLIP weights are fetched too.

    The file is loaded with torch.load(weights_only=True): tensors only, never code. Every
    tensor in it must be either imported (perceiver, gated cross-attention, the new tokens'
    embedding rows) or a frozen LM or encoder weight equal to the one loaded; anything
    missing, unknown, mis-shaped or different is an error that names it.
    """
    from ..formats.checkpoint import save_checkpoint
    from ..formats.hub import is_repo_name, snapshot
    from ..importers.clip_towers import openflamingo_encoder
    from ..importers.openflamingo import CHECKPOINT_FILE, RELEASED
    from ..importers.openflamingo import import_openflamingo as run_import

    quiet_libraries()
    if is_repo_name(checkpoint):
        repo = checkpoint
        config_path = config_path or RELEASED.get(repo)
        checkpoint = str(snapshot(repo, revision, required=(CHECKPOINT_FILE,), patterns=[CHECKPOINT_FILE])
                         / CHECKPOINT_FILE)
    config = init_config(config_path or "openflamingo-9b")
    if lm is not None:
        config.lm.path = lm
    elif config_path is None:
        raise click.UsageError("give --lm (the checkpoint's LM), or a preset with -c")
    if lm_dtype is not None:
        config.lm.dtype = lm_dtype
    if encoder is not None and encoder != config.encoder.name:  # the preset's own encoder keeps its settings
        config.encoder = openflamingo_encoder(encoder)
    if encoder_weights is not None:
        config.encoder.weights, config.encoder.pretrained = encoder_weights, False
    model, report = run_import(checkpoint, config, check_preset=config_path is not None, take_lm_rows=take_lm_rows)
    save_checkpoint(model, out, embed_lm=embed, embed_encoder=embed)
    for line in report.lines():
        click.echo(f"{checkpoint}: {line}", err=True)
    click.echo(f"wrote {out}", err=True)
