"""`flamingo generate`: prompt records into open-ended answers."""
from __future__ import annotations

import click

from .core import (checkpoint_dir, input_records, model_dtype_option, prefix_cache, prefix_cache_option, setup,
                   shot_options, shot_prompts, stage_options)
from .placing import device_map_option, placed, placed_run, shard_option


@click.command(short_help="Generate answers for prompt records.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@shot_options
@click.option("--num-beams", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--length-penalty", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@model_dtype_option
@prefix_cache_option
@device_map_option
@shard_option
def generate(input, ckpt, output, device, seed, quiet, shots, k, select, template, num_beams,
             max_new_tokens, length_penalty, batch_size, dtype, prefix_cache_mib, device_map, shard):
    """Generate open-ended answers: beam search, stopping at <|endofchunk|>.

    Reads prompt records (from flamingo prompt) and adds `output`. With --shots, it
    reads query records instead (e.g. from flamingo encode) and builds the prompts
    itself, exactly as flamingo prompt does. INPUT is a records file, - for stdin, or
    webdataset shards (data/{000..009}.tar: what encode --wds writes, or img2dataset's).
    Each prompt's beams share one run of the prompt, and prompts with the same
    demonstrations run them once (--prefix-cache).
    Under torchrun or srun, batches are dealt to the ranks (one per GPU) and rank 0
    writes the output in input order, the same bytes as one process; --shard I/N splits
    the work across independent jobs instead.
    """
    from ..inference.generation import batches, generate_records
    from ..inference.media import load_for_inference

    place = placed(shard, device_map)
    quiet = quiet or not place.leader
    setup(seed, quiet)
    units = None
    if place.leader:
        records = input_records(input)
        if shots:
            records = shot_prompts(records, shots, k, select, seed, template, quiet=quiet)
        units = batches(place.records(records), batch_size)
    device = place.device(device)
    model, media = load_for_inference(checkpoint_dir(ckpt, quiet=quiet), device, dtype=dtype, device_map=device_map)
    device = media.device  # the embedding's, under a device map
    cache = prefix_cache(model, prefix_cache_mib)

    def work(batch):
        yield generate_records(model, batch, media, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                length_penalty=length_penalty, device=device, prefix_cache=cache)

    with placed_run(place, output, units, work, quiet=quiet, desc="generate") as (results, write):
        for outputs in results:
            write(outputs)
