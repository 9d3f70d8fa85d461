"""`flamingo merge`: the outputs of a stage run with --shard I/N, back in input order."""
from __future__ import annotations

import click


@click.command(short_help="Merge --shard outputs into one, in input order.")
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", default="-", show_default=True, help="Write records here (atomically); - is stdout.")
def merge(shards, output):
    """Merge the outputs of one stage run as --shard 0/N .. N-1/N into one output.

    Records are put back in input order by their input_index, which is then dropped with
    input_shard: the result is the same bytes as the stage's output run as one process. Give
    every part's output: the parts are checked first (each I/N once, of one N; a file with no
    records stands for a part that had no work), so a missing one is an error before anything
    is written (a part that failed left no file: rerun it). Reads the parts as streams, one
    record of each at a time.

        flamingo generate prompts.jsonl --shard 0/2 -o part0.jsonl &
        flamingo generate prompts.jsonl --shard 1/2 -o part1.jsonl &
        wait && flamingo merge part*.jsonl -o answers.jsonl
    """
    from ..formats.artifacts import open_output
    from ..formats.records import iter_records_file, write_records
    from ..inference.generation import batches
    from ..inference.sharding import merge_shards

    merged = merge_shards([(name, iter_records_file(name)) for name in shards])
    with open_output(output) as out:
        for records in batches(merged, 256):
            write_records(out, records)
