"""`flamingo card`: a checkpoint directory's model card, for pushing it to the hub."""
from __future__ import annotations

import click


@click.command(short_help="Write a checkpoint's model card (README.md) for the hub.")
@click.argument("ckpt", type=click.Path(file_okay=False))
@click.option("--repo", help="The hub repo id it will be pushed to (owner/name), named in the card's commands.")
@click.option("--results", type=click.Path(dir_okay=False),
              help="Evaluation results to include: a Markdown file, e.g. the sweep's results.md.")
def card(ckpt, repo, results):
    """Write CKPT/README.md: the hub's metadata, what the model is made of, how to run it by
    repo id, its config.yaml, and evaluation results when given. Then push the directory
    with huggingface_hub's own command, and run it by name:

        flamingo card ckpt/ --repo you/flamingo-toy --results sweep/results.md
        hf upload you/flamingo-toy ckpt/ .
        flamingo generate --ckpt you/flamingo-toy --shots shots.jsonl prompts.jsonl
    """
    from ..formats.model_card import write_model_card

    click.echo(f"wrote {write_model_card(ckpt, repo=repo, results=results)}", err=True)
