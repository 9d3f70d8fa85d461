"""`flamingo import idefics`: a transformers IDEFICS checkpoint into a checkpoint directory."""
from __future__ import annotations

import click

from .core import quiet_libraries


@click.command(name="idefics", short_help="Import an IDEFICS checkpoint (transformers'), strictly.")
@click.argument("checkpoint", metavar="DIR_OR_REPO")
@click.option("--revision", help="With a hub repo id: its branch, tag or commit (default: main).")
@click.option("--lm-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="dtype the frozen LM is held in when the checkpoint is loaded.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
def import_idefics(checkpoint, revision, lm_dtype, out):
    """Import DIR_OR_REPO, an IdeficsForVisionText2Text as transformers saves it (config.json, the
    tokenizer, model.safetensors or pytorch_model.bin, possibly sharded), or a hub repo id holding
    one (HuggingFaceM4/idefics-9b), into a checkpoint directory that every stage reads.

    The checkpoint is self-contained: its LM is the file's LLaMA, written as a plain
    LlamaForCausalLM with IDEFICS's tokenizer (lm/), and its encoder is the file's vision tower in
    timm's layout (encoder.safetensors). Prompts and training documents keep our markup: each
    <image> is written as IDEFICS's processor writes it, and <|endofchunk|> becomes the model's
    end of text. Every tensor in the file is imported; anything missing, unknown or mis-shaped is
    an error that names it.
    """
    import tempfile
    from pathlib import Path

    from ..formats.checkpoint import save_checkpoint
    from ..importers.idefics import import_idefics as run_import

    quiet_libraries()
    parent = Path(out).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".idefics-import.", dir=parent) as work:
        model, report = run_import(checkpoint, work, revision=revision, lm_dtype=lm_dtype)
        save_checkpoint(model, out, embed_lm=True, embed_encoder=True)
    for line in report.lines():
        click.echo(f"{checkpoint}: {line}", err=True)
    click.echo(f"wrote {out}", err=True)
