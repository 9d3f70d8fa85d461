"""`flamingo prompt`: query records and a support set into few-shot prompt records."""
from __future__ import annotations

import click

from .core import input_records, shot_options, shot_prompts, stage_options
from .placing import single_process


@click.command(short_help="Build few-shot prompts from queries and a support set.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options(ckpt=False)
@shot_options
@click.option("--ensembles", type=click.IntRange(min=1), default=1, show_default=True,
              help="Prompt ensembling for close-ended tasks: one record per order of the same shots, up to N "
              "(the paper averages 6); flamingo evaluate averages their scores.")
def prompt(input, output, device, seed, quiet, shots, k, select, template, ensembles):
    """Build interleaved few-shot prompts.

    Reads query records and adds `prompt` (text with <image> markers and
    <|endofchunk|>), `media` (one entry per <image>, in order), `shots` (the ids of
    the demonstrations, in prompt order) and `template`. Shots depend only on --seed
    and the query id. With --ensembles N, each query gives min(N, k!) records, the
    same shots in different orders, each with an `ensemble` number. Runs as a single process.
    """
    from ..formats.artifacts import open_output
    from ..formats.records import write_records

    single_process("prompt")
    if not shots:
        raise click.UsageError("--shots FILE is required")
    records = input_records(input)
    with open_output(output) as out:
        for record in shot_prompts(records, shots, k, select, seed, template, ensembles, quiet=quiet):
            write_records(out, [record])
