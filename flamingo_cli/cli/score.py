"""`flamingo score`: candidate answers ranked by likelihood."""
from __future__ import annotations

import click

from .core import (autocast_dtype, checkpoint_dir, dtype_option, input_records, prefix_cache, prefix_cache_option,
                   progress, setup, single_process, stage_options)


@click.command(short_help="Rank candidate answers by likelihood.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@click.option("--candidates", "candidates_file", type=click.Path(dir_okay=False),
              help="File with one candidate per line (else each record's `candidates`, else the template's).")
@click.option("--normalize", type=click.Choice(["sum", "mean"]), default="sum", show_default=True,
              help="Total log-likelihood, or per token.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="(prompt, candidate) pairs per batched forward; records that share their candidates are batched.")
@dtype_option
@prefix_cache_option
def score(input, ckpt, output, device, seed, quiet, candidates_file, normalize, batch_size, dtype, prefix_cache_mib):
    """Score close-ended candidates for prompt records.

    Adds `scores` {candidate: log-likelihood of " candidate<|endofchunk|>" after the
    prompt} and `prediction` (the best). Each prompt runs once (prompts that begin alike
    share what they have in common: --prefix-cache); its candidates are then scored against
    its states in batched forwards, several records at a time when they share candidates.
    Runs as a single process.
    """
    from ..formats.artifacts import ArtifactError, open_output
    from ..formats.records import write_records
    from ..inference.media import load_for_inference
    from ..inference.scoring import score_records

    single_process("score")
    setup(seed, quiet)
    fixed = None
    if candidates_file:
        try:
            fixed = [line.strip() for line in open(candidates_file, encoding="utf-8") if line.strip()]
        except OSError as e:
            raise ArtifactError(f"{candidates_file}: {e.strerror}") from None
        if not fixed:
            raise ArtifactError(f"{candidates_file}: no candidates")
    records = input_records(input)
    model, media = load_for_inference(checkpoint_dir(ckpt, quiet=quiet), device)
    cache = prefix_cache(model, prefix_cache_mib)
    with progress(quiet, unit="rec", desc="score") as bar, open_output(output) as out:
        for record in score_records(model, records, media, candidates=fixed, normalize=normalize,
                                    batch_size=batch_size, device=device, dtype=autocast_dtype(dtype),
                                    prefix_cache=cache):
            write_records(out, [record])
            bar.update(1)
