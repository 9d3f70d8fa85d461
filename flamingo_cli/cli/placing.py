"""Where a stage's process stands: alone, one rank of torchrun/srun, or one --shard part; and
the loop that reads units on the process that writes, while the other ranks work."""
from __future__ import annotations

import contextlib

import click

from .core import progress


def single_process(stage: str) -> None:
    from ..inference.sharding import launched

    if launched() is not None:
        raise click.UsageError(f"flamingo {stage} runs as one process; under torchrun or srun, run it once "
                               "(encode, resample, generate and score are the stages that shard)")


shard_option = click.option(
    "--shard", metavar="I/N",
    help="Do the I-th of N parts of the input (0-based: 0/4 .. 3/4), for SLURM job arrays and make -j. Each "
         "output record carries its input_index; `flamingo merge` puts the parts back in input order, the "
         "same bytes as one process. Under torchrun or srun, the ranks share the input without it.")


def placed(shard: str | None):
    """This process's place in the run (alone, a rank of torchrun/srun, or --shard I/N)."""
    from ..inference.sharding import Shard, placement

    return placement(Shard.parse(shard) if shard else None)


@contextlib.contextmanager
def placed_run(place, output: str, units, work, *, quiet: bool, desc: str, unit: str = "rec"):
    """(results, write): the pieces of each unit's work(unit), in input order (Placement.run), and
    a function that writes records and counts them, on the process that writes the output;
    elsewhere no results (the rank does the units dealt to it meanwhile) and units is None: only
    the leader reads the input."""
    from ..formats.artifacts import open_output
    from ..formats.records import write_records

    if not place.leader:
        with contextlib.closing(place.run(None, work)) as results:
            yield results, None
        return
    with progress(quiet, unit=unit, desc=desc) as bar, open_output(output) as out, \
            contextlib.closing(place.run(units, work)) as results:
        def write(records):
            write_records(out, records)
            bar.update(len(records))
        yield results, write
