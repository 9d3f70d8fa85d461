"""Where a stage's process stands: alone, one rank of torchrun/srun, or one --shard part; and
the loop that reads units on the process that writes, while the other ranks work."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

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
         "output record carries its input_index and input_shard (I/N); `flamingo merge` puts the parts back in "
         "input order, the same bytes as one process, and refuses a missing part. Under torchrun or srun, the ranks share the input without it.")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(ctx, param, value):
    if value is None or value in DEVICE_MAPS:
        return value
    try:
        mapping = json.loads(Path(value).read_text(encoding="utf-8"))
    except OSError as e:
        raise click.BadParameter(f"{value}: cannot read it ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.BadParameter(f"{value}: not a JSON file ({e})") from None
    if not isinstance(mapping, dict) or not mapping or not all(
            isinstance(k, str) and isinstance(v, (int, str)) and not isinstance(v, bool) for k, v in mapping.items()):
        raise click.BadParameter(f"{value}: a device map is a JSON object of LM module names and devices "
                                 '(a GPU index, "cuda:1", "cpu", or "disk")')
    return mapping


device_map_option = click.option(
    "--device-map", metavar="MAP", callback=_device_map,
    help=f"Spread an LM too large for one device across several, as transformers places it (needs accelerate): "
         f"{', '.join(DEVICE_MAPS)}, or a JSON file of {{LM module name: device}} (a GPU index, \"cpu\", or \"disk\" "
         "to offload). Each cross-attention block runs on its LM layer's device; inputs go to the embedding's. "
         "One process per model: not under torchrun or srun.")


def placed(shard: str | None, device_map=None):
    """This process's place in the run (alone, a rank of torchrun/srun, or --shard I/N)."""
    from ..inference.sharding import Shard, placement

    place = placement(Shard.parse(shard) if shard else None)
    if device_map is not None and place.size > 1:
        raise click.UsageError("--device-map spreads one model over this machine's devices; under torchrun or srun "
                               "each rank holds a model of its own: run one process, or split the input with --shard")
    return place


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
