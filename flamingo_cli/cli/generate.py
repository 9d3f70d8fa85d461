"""`flamingo generate`: prompt records into open-ended answers."""
from __future__ import annotations

import click

from .core import (autocast_dtype, checkpoint_dir, dtype_option, input_records, prefix_cache, prefix_cache_option,
                   progress, setup, shot_options, shot_prompts, single_process, stage_options)


@click.command(short_help="Generate answers for prompt records.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@shot_options
@click.option("--num-beams", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--length-penalty", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@dtype_option
@prefix_cache_option
def generate(input, ckpt, output, device, seed, quiet, shots, k, select, template, num_beams,
             max_new_tokens, length_penalty, batch_size, dtype, prefix_cache_mib):
    """Generate open-ended answers: beam search, stopping at <|endofchunk|>.

    Reads prompt records (from flamingo prompt) and adds `output`. With --shots, it
    reads query records instead (e.g. from flamingo encode) and builds the prompts
    itself, exactly as flamingo prompt does. Each prompt's beams share one run of the
    prompt, and prompts that share their first tokens and images (the same demonstrations)
    share their states (--prefix-cache). Runs as a single process.
    """
    from ..formats.artifacts import open_output
    from ..formats.records import write_records
    from ..inference.generation import batches, generate_records
    from ..inference.media import load_for_inference

    single_process("generate")
    setup(seed, quiet)
    records = input_records(input)
    if shots:
        records = shot_prompts(records, shots, k, select, seed, template, quiet=quiet)
    model, media = load_for_inference(checkpoint_dir(ckpt, quiet=quiet), device)
    cache = prefix_cache(model, prefix_cache_mib)
    with progress(quiet, unit="rec", desc="generate") as bar, open_output(output) as out:
        for batch in batches(records, batch_size):
            write_records(out, generate_records(model, batch, media, num_beams=num_beams,
                                                max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                                device=device, dtype=autocast_dtype(dtype),
                                                prefix_cache=cache))
            bar.update(len(batch))
