"""`flamingo score`: candidate answers ranked by likelihood."""
from __future__ import annotations

import click

from .core import (checkpoint_dir, input_records, model_dtype_option, prefix_cache, prefix_cache_option, setup,
                   stage_options)
from .placing import device_map_option, placed, placed_run, shard_option


@click.command(short_help="Rank candidate answers by likelihood.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@click.option("--candidates", "candidates_file", type=click.Path(dir_okay=False),
              help="File with one candidate per line (else each record's `candidates`, else the template's).")
@click.option("--normalize", type=click.Choice(["sum", "mean"]), default="sum", show_default=True,
              help="Total log-likelihood, or per token.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="(prompt, candidate) pairs per batched forward; records that share their candidates are batched.")
@model_dtype_option
@prefix_cache_option
@device_map_option
@shard_option
def score(input, ckpt, output, device, seed, quiet, candidates_file, normalize, batch_size, dtype, prefix_cache_mib,
          device_map, shard):
    """Score close-ended candidates for prompt records.

    INPUT is a records file, - for stdin, or webdataset shards (data/{000..009}.tar).
    Adds `scores` {candidate: log-likelihood of " candidate<|endofchunk|>" after the
    prompt} and `prediction` (the best). Each prompt runs once (prompts with the same
    demonstrations run them once: --prefix-cache); its candidates are then scored against
    its states in batched forwards, several records at a time when they share candidates.
    Under torchrun or srun, these groups are dealt to the ranks (one per GPU) and rank 0
    writes the output in input order, the same bytes as one process; --shard I/N splits
    the work across independent jobs instead.
    """
    from ..formats.artifacts import ArtifactError
    from ..inference.media import load_for_inference
    from ..inference.scoring import score_groups, score_records

    place = placed(shard, device_map)
    quiet = quiet or not place.leader
    setup(seed, quiet)
    fixed = None
    if candidates_file:
        try:
            fixed = [line.strip() for line in open(candidates_file, encoding="utf-8") if line.strip()]
        except OSError as e:
            raise ArtifactError(f"{candidates_file}: {e.strerror}") from None
        if not fixed:
            raise ArtifactError(f"{candidates_file}: no candidates")
    units = None
    if place.leader:
        units = score_groups(place.records(input_records(input)), candidates=fixed, batch_size=batch_size)
    device = place.device(device)
    model, media = load_for_inference(checkpoint_dir(ckpt, quiet=quiet), device, dtype=dtype, device_map=device_map)
    cache = prefix_cache(model, prefix_cache_mib)

    def work(group):
        yield list(score_records(model, group, media, candidates=fixed, normalize=normalize, batch_size=batch_size,
                                  prefix_cache=cache))

    with placed_run(place, output, units, work, quiet=quiet, desc="score") as (results, write):
        for outputs in results:
            write(outputs)
