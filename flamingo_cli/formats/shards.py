"""webdataset shards as a stage's input: each sample becomes the record a JSON Lines file would
hold, its media unpacked into files the record names.

A sample is either what `encode --wds` writes (the record as KEY.json, its media's features as
KEY.features.safetensors) or raw media as img2dataset writes them (KEY.jpg, KEY.txt the caption,
KEY.json its metadata; KEY.<i>.<ext> for a document's media). Stages work on files, so each
medium lands once, content-addressed, under ROOT (features as a tensor file with `features` and
`encoder` in the record; raw media as `image`, `video` or `images` paths): reading the same shard
twice writes nothing new. Samples are read as the stage consumes them, one at a time.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from .artifacts import (FEATURES, POOLED, SHARD_FEATURES, SHARD_VIDEOS, ArtifactError, atomic_path, digest_bytes,
                        make_ref, read_sample, save_tensors, shard_media, tensor_path)

_SHARD = re.compile(r"\.(tar|tar\.gz|tgz)$")


def is_shards(source: str) -> bool:
    """Whether a stage's input names webdataset shards (`data/{000..009}.tar`) rather than records."""
    return bool(_SHARD.search(source))


def shard_urls(pattern: str) -> list[str]:
    """A brace pattern's shards; a local one that does not exist is an error, before any is read."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(pattern)
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ArtifactError(f"{missing[0]}: no such shard{more}")
    return urls


def shard_records(pattern: str, root: Path) -> Iterator[dict]:
    """The records of the shards `pattern` names, in order, their media unpacked under root. A
    record without an `id` is named by its sample's key. An unreadable shard or sample is an
    error naming it."""
    from webdataset.tariterators import tarfile_samples

    urls = shard_urls(pattern)

    def failed(exc: Exception) -> bool:
        # webdataset appends the shard's url to the exception's args
        url = next((a for a in reversed(exc.args) if isinstance(a, str) and a in urls), urls[0])
        reason = str(exc.args[0]).splitlines()[0] if exc.args and str(exc.args[0]) else type(exc).__name__
        raise ArtifactError(f"{url}: not a readable shard ({reason})") from None

    for sample in tarfile_samples(({"url": u} for u in urls), handler=failed):
        yield _record(sample, f"{sample['__url__']}:{sample['__key__']}", root)


def _record(sample: dict, name: str, root: Path) -> dict:
    try:
        record, media, encoder = read_sample(sample)
    except ArtifactError as e:
        raise ArtifactError(f"{name}: {str(e).partition(': ')[2] or e}") from None
    record = {"id": sample["__key__"], **record}
    if encoder is not None:
        content = digest_bytes(sample[SHARD_FEATURES])
        refs = []
        for i, features in enumerate(media):
            path = tensor_path(root, f"{content}#{i}", encoder)
            if not path.exists():
                save_tensors(path, {FEATURES: features, POOLED: features.float().mean(dim=(0, 1))},
                             {"encoder": encoder, "source": f"{name}#{i}"})
            refs.append(make_ref(path, FEATURES))
        if not refs:
            raise ArtifactError(f"{name}: features file holds no tensors")
        return {**record, "features": refs if "images" in record or len(refs) > 1 else refs[0], "encoder": encoder}
    files = shard_media(sample)
    if not files:
        raise ArtifactError(f"{name}: no media (expected KEY.jpg, KEY.mp4, ... or KEY.{SHARD_FEATURES})")
    paths = [str(_unpack(root, data, suffix)) for suffix, data in files]
    if "segments" in record or len(paths) > 1:
        return {**record, "images": paths}
    kind = "video" if files[0][0] in SHARD_VIDEOS else "image"
    return {**record, kind: paths[0]}


def _unpack(root: Path, data: bytes, suffix: str) -> Path:
    digest = digest_bytes(data)
    path = root / "media" / digest[:2] / f"{digest}{suffix}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
    return path
