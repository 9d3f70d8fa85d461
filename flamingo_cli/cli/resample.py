"""`flamingo resample`: feature records into visual-token records."""
from __future__ import annotations

import click

from .core import checkpoint_dir, input_records, progress, setup, single_process, stage_options


@click.command(short_help="Turn feature records into visual-token records.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Directory for visual-token files (default: the cache).")
def resample(input, ckpt, output, device, seed, quiet, out_dir):
    """Run the checkpoint's Perceiver Resampler over feature records.

    Adds `visual` (PATH.safetensors#visual, latents x dim) to each record with a
    `features` reference. Resample a support set once, and every prompt that uses
    it skips that work. Visual tokens are tied to the checkpoint that made them.
    Runs as a single process.
    """
    from pathlib import Path

    from ..formats.artifacts import cache_dir, open_output
    from ..formats.records import write_records
    from ..inference.encoding import resample_records
    from ..inference.media import load_for_inference

    single_process("resample")
    setup(seed, quiet)
    records = input_records(input)
    model, _ = load_for_inference(checkpoint_dir(ckpt, quiet=quiet), device)
    root = Path(out_dir) if out_dir else cache_dir()
    with progress(quiet, unit="rec", desc="resample") as bar, open_output(output) as out:
        for record in records:  # one at a time: the resampler is cheap, and a pipe sees each at once
            write_records(out, resample_records(model, [record], root=root, device=device))
            bar.update(1)
