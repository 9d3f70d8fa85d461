"""`flamingo encode`: media files or records into feature references (and feature shards)."""
from __future__ import annotations

import click

from .core import (autocast_dtype, checkpoint_dir, dtype_option, input_records, progress, setup, single_process,
                   stage_options)


@click.command(short_help="Encode images into feature references.")
@click.argument("inputs", nargs=-1, type=click.Path())
@stage_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Directory for feature files (default: the content-addressed cache, $FLAMINGO_CACHE).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="DataLoader processes that decode and resize images while the encoder runs.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted on stderr) instead of failing.")
@click.option("--wds", "wds_pattern", help="Also write webdataset feature shards for pretrain, e.g. "
              "OUT/shard-%06d.tar (records with `image`, or `segments` and `images`).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=89_478_485, show_default=True,
              help="Refuse images whose header claims more pixels than this, before decoding them "
              "(decompression bombs).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per shard with --wds.")
@dtype_option
def encode(inputs, ckpt, output, device, seed, quiet, out_dir, batch_size, workers, skip_bad, wds_pattern,
           max_pixels, shard_size, dtype):
    """Encode images with the checkpoint's frozen vision encoder.

    INPUTS are image files, directories (searched recursively, in sorted order),
    records files (*.jsonl: JSON Lines records with an `image` field, its path relative
    to the file) or - for records on stdin; with no INPUTS, records are read from stdin. Each output record passes its input fields through and adds
    `features` (PATH.safetensors#features, shaped frames x tokens x dim) and `encoder`.
    Features are cached by image content and encoder, so re-encoding is free.
    Records are written as each batch finishes. With --wds, it also writes feature
    shards for `flamingo pretrain` (records then come at the end; a document's
    `features` is a list, one reference per entry of its `images`).
    Runs as a single process.
    """
    from pathlib import Path

    from ..formats.artifacts import cache_dir, open_output, write_records
    from ..formats.checkpoint import load_checkpoint_encoder
    from ..inference.encoding import encode_records
    from ..inference.media import find_images

    single_process("encode")
    setup(seed, quiet)
    records = []
    for item in inputs or ("-",):
        if item == "-" or item.endswith(".jsonl"):
            records += input_records(item)
        elif Path(item).is_dir():
            records += [{"id": str(p), "image": str(p)} for p in find_images(Path(item))]
        else:
            records.append({"id": item, "image": item})
    if not records:
        raise click.UsageError(f"no images found in {' '.join(inputs)}")
    encoder, identity = load_checkpoint_encoder(checkpoint_dir(ckpt, quiet=quiet))
    encoder = encoder.to(device)
    skipped = []
    root = Path(out_dir) if out_dir else cache_dir()
    options = dict(root=root, batch_size=batch_size, workers=workers, skip_bad=skip_bad, device=device,
                   dtype=autocast_dtype(dtype), on_skip=skipped.append, max_pixels=max_pixels)
    if wds_pattern:
        from ..inference.encoding import media_paths, write_feature_shards

        if "%" not in wds_pattern:
            raise click.BadParameter("needs a %d-style shard number, e.g. out/shard-%06d.tar", param_hint="--wds")
        total = sum(len(media_paths(r)) for r in records)
        with progress(quiet, total=total, unit="img", desc="encode") as bar, open_output(output) as out:
            write_records(out, write_feature_shards(encoder, identity, records, wds_pattern, maxcount=shard_size,
                                                    on_batch=bar.update, **options))
    else:
        with progress(quiet, total=len(records), unit="img", desc="encode") as bar, open_output(output) as out:
            for batch in encode_records(encoder, identity, records, **options):
                write_records(out, batch)
                bar.update(len(batch))
    if skipped:
        click.echo(f"flamingo encode: skipped {len(skipped)} unreadable file(s); first: {skipped[0]}", err=True)
