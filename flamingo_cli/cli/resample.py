"""`flamingo resample`: feature records into visual-token records."""
from __future__ import annotations

import click

from .core import checkpoint_dir, input_records, setup, stage_options
from .placing import placed, placed_run, shard_option


@click.command(short_help="Turn feature records into visual-token records.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Directory for visual-token files (default: the cache).")
@shard_option
def resample(input, ckpt, output, device, seed, quiet, out_dir, shard):
    """Run the checkpoint's Perceiver Resampler over feature records.

    Adds `visual` (PATH.safetensors#visual, latents x dim) to each record with a
    `features` reference. Resample a support set once, and every prompt that uses
    it skips that work. Visual tokens are tied to the checkpoint that made them.
    Under torchrun or srun, records are dealt to the ranks and rank 0 writes the output
    in input order; --shard I/N splits the work across independent jobs instead.
    """
    from pathlib import Path

    from ..formats.artifacts import cache_dir
    from ..inference.encoding import resample_records
    from ..inference.generation import batches
    from ..inference.media import load_for_inference

    place = placed(shard)
    quiet = quiet or not place.leader
    setup(seed, quiet)
    # One record a unit: the resampler is cheap, and a pipe sees each record at once.
    units = batches(place.records(input_records(input)), 1) if place.leader else None
    device = place.device(device)
    model, _ = load_for_inference(checkpoint_dir(ckpt, quiet=quiet), device)
    root = Path(out_dir) if out_dir else cache_dir()
    with placed_run(place, output, units, lambda unit: [resample_records(model, unit, root=root, device=device)],
                    quiet=quiet, desc="resample") as (results, write):
        for outputs in results:
            write(outputs)
