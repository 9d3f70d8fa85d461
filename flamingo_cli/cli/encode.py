"""`flamingo encode`: image and video files or records into feature references (and feature shards)."""
from __future__ import annotations

import click

from .core import autocast_dtype, checkpoint_dir, dtype_option, input_records, peeked, progress, setup, stage_options
from .placing import placed, placed_run, shard_option


@click.command(short_help="Encode images and videos into feature references.")
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
@click.option("--frames", type=click.IntRange(min=1), default=30, show_default=True,
              help="Frames per video clip (the paper: 30 at evaluation, 8 in training; -c train-video).")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=3.0, show_default=True,
              help="Frames per second within a clip (the paper: 3 at evaluation, 1 in training).")
@click.option("--clip", type=click.Choice(["center", "random", "uniform"]), default="center", show_default=True,
              help="Where a video's clip is: the window centred in it, a window at a random start (seeded by "
              "--seed and the video's content), or frames spread uniformly over the whole video.")
@click.option("--embedding", "embedding_name", metavar="NAME|FILE",
              help="Also add `embedding`, a CLIP image embedding for prompt --select rices, by a timm CLIP tower "
              "run as OpenFlamingo's RICES runs open_clip's (vit_large_patch14_clip_224.openai is its ViT-L-14 "
              "openai), or by the `encoder:` of a YAML FILE (an init preset, a checkpoint's config.yaml).")
@click.option("--embedding-weights", metavar="FILE|REPO",
              help="Weights for the --embedding tower (open_clip's or timm's layout, or a hub repo of them) "
              "instead of timm's pretrained ones.")
@dtype_option
@shard_option
def encode(inputs, ckpt, output, device, seed, quiet, out_dir, batch_size, workers, skip_bad, wds_pattern,
           max_pixels, shard_size, frames, fps, clip, embedding_name, embedding_weights, dtype, shard):
    """Encode images and videos with the checkpoint's frozen vision encoder.

    INPUTS are image or video files, directories (searched recursively, in sorted order),
    records files (*.jsonl: JSON Lines records with an `image` or `video` field, its path
    relative to the file), webdataset shards (*.tar, brace patterns: img2dataset's KEY.jpg
    with KEY.txt and KEY.json, or what --wds writes; their media are unpacked once into the
    cache, by content) or - for records on stdin; with no INPUTS, records are read from
    stdin. A video (mp4, webm, mkv, avi, mov, an animated GIF, ...) becomes a clip of
    --frames frames --fps apart, each encoded on its own; a clip always has --frames frames
    (past a short video's end, its last frame), from the record's `start`..`end` segment
    (seconds) when it has one. Each output record passes its input fields
    through and adds `features` (PATH.safetensors#features, shaped frames x tokens x dim)
    and `encoder`. Features are cached by content, frame sampling and encoder, so
    re-encoding is free. Records are read as they arrive and written as each batch
    finishes. With --wds, it also writes feature shards for `flamingo pretrain` (a
    document's `features` is a list, one reference per entry of its `images`).
    With --embedding, each record also gets `embedding` (PATH.safetensors#embedding,
    frames x dim): the tower's projected CLS token after its final norm, as open_clip's
    encode_image gives it, from open_clip's preprocessing (the short side resized to the
    input size, bicubic, a centre crop), in float32; cached by content and tower, so a
    support set is embedded once.
    Under torchrun or srun, windows of records are dealt to the ranks and rank 0 writes
    the output in input order; --shard I/N splits the work across independent jobs.
    """
    from pathlib import Path

    from ..formats.artifacts import cache_dir, open_output
    from ..formats.checkpoint import load_checkpoint_encoder
    from ..formats.records import write_records
    from ..formats.shards import is_shards
    from ..inference.encoding import WINDOW, encode_records
    from ..inference.generation import batches
    from ..inference.media import find_media, media_record
    from ..inference.video import FrameSampling

    place = placed(shard)
    if wds_pattern and (place.size > 1 or place.shard):
        raise click.UsageError("--wds packs shards as one process: encode the records sharded first, then run "
                               "encode --wds once with the same --out (the features are found, not recomputed)")
    if embedding_name and wds_pattern:
        raise click.UsageError("--embedding is for prompt --select rices: encode the records with it, not --wds")
    if embedding_weights and not embedding_name:
        raise click.UsageError("--embedding-weights needs --embedding NAME")
    quiet = quiet or not place.leader
    setup(seed, quiet)

    def media_inputs():
        for item in inputs or ("-",):
            if item == "-" or item.endswith(".jsonl") or is_shards(item):
                yield from input_records(item)
            elif Path(item).is_dir():
                yield from (media_record(str(p)) for p in find_media(Path(item)))
            else:
                yield media_record(item)

    records = None
    if place.leader:
        records = peeked(media_inputs())
        if records is None:
            raise click.UsageError(f"no images or videos found in {' '.join(inputs)}")
    encoder, identity = load_checkpoint_encoder(checkpoint_dir(ckpt, quiet=quiet))
    device = place.device(device)
    encoder = encoder.to(device)
    embedder = _embedder(embedding_name, embedding_weights).to(device) if embedding_name else None
    skipped = []
    root = Path(out_dir) if out_dir else cache_dir()
    options = dict(root=root, batch_size=batch_size, workers=workers, skip_bad=skip_bad, device=device,
                   dtype=autocast_dtype(dtype), max_pixels=max_pixels,
                   sampling=FrameSampling(frames=frames, fps=fps, clip=clip, seed=seed))
    if wds_pattern:
        from ..inference.encoding import write_feature_shards

        if "%" not in wds_pattern:
            raise click.BadParameter("needs a %d-style shard number, e.g. out/shard-%06d.tar", param_hint="--wds")
        with progress(quiet, unit="file", desc="encode") as bar, open_output(output) as out:
            write_feature_shards(encoder, identity, records, wds_pattern, maxcount=shard_size, on_batch=bar.update,
                                 on_record=lambda record: write_records(out, [record]), on_skip=skipped.append,
                                 **options)
    else:
        def work(window):  # a window is what one DataLoader decodes: the unit dealt to a rank
            bad = []
            for batch in encode_records(encoder, identity, window, on_skip=bad.append, embedder=embedder, **options):
                yield batch, [*bad]
                bad.clear()

        units = batches(place.records(records), batch_size * WINDOW) if place.leader else None
        with placed_run(place, output, units, work, quiet=quiet, desc="encode", unit="file") as (results, write):
            for outputs, bad in results:
                skipped += bad
                write(outputs)
    if skipped:
        click.echo(f"flamingo encode: skipped {len(skipped)} unreadable file(s); first: {skipped[0]}", err=True)


def _embedder(name: str, weights: str | None):
    """The --embedding tower: a timm name run as OpenFlamingo would, or a YAML file's encoder."""
    from pathlib import Path

    from ..importers.clip_towers import embedding_config, load_clip_embedding

    if Path(name).suffix in (".yaml", ".yml"):
        config, base = _yaml_encoder(Path(name)), Path(name).parent
        config.weights = weights or config.weights
    else:
        config, base = embedding_config(name, weights), None
    return load_clip_embedding(config, base)


def _yaml_encoder(path):
    """The `encoder:` of a YAML file (an init preset, a checkpoint's config.yaml)."""
    import yaml

    from ..errors import ConfigError
    from ..model.config import FlamingoConfig

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise click.ClickException(f"{path}: invalid YAML ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("encoder"), dict):
        raise click.ClickException(f"{path}: no `encoder:` mapping to take the --embedding tower from")
    try:
        return FlamingoConfig.from_dict({"encoder": data["encoder"]}).encoder
    except ConfigError as e:
        raise click.ClickException(f"{path}: {e}") from None
