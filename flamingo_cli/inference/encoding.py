"""The `encode` and `resample` stages as library functions: media -> tensor files -> records.

Feature files are content-addressed (media bytes, a video's frame sampling, and the encoder
identity; features + checkpoint identity for visual tokens), so encoding the same image or
video twice is free.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ..formats.artifacts import EMBEDDING, FEATURES, POOLED, VISUAL, ArtifactError, digest_file, embedding_path, \
    load_ref, make_ref, save_tensors, split_ref, storage_errors, tensor_path
from .generation import batches
from .media import MAX_PIXELS, MediaFiles
from .video import EVAL_SAMPLING, FrameSampling


def media_item(record: dict) -> tuple[str, str]:
    """A record's one medium, ("image" | "video", path)."""
    kinds = [k for k in ("image", "video") if isinstance(record.get(k), str)]
    if len(kinds) != 1:
        problem = "both an 'image' and a 'video'" if kinds else "no media path (expected an 'image' or 'video' field)"
        raise ArtifactError(f"{record.get('id', '<record>')}: {problem}")
    return kinds[0], record[kinds[0]]


def clip_span(record: dict) -> tuple[float, float] | None:
    """A video record's segment, from its `start` and `end` (seconds), or None for all of it."""
    if "start" not in record and "end" not in record:
        return None
    start, end = record.get("start", 0.0), record.get("end", float("inf"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (start, end)) or not start < end:
        raise ArtifactError(f"{record.get('id', '<record>')}: 'start' and 'end' should be seconds with start < end, "
                            f"got {start!r} and {end!r}")
    return float(start), float(end)


def encode_records(encoder, identity: str, records: Iterable[dict], *, root: Path, batch_size: int = 16,
                   workers: int = 1, skip_bad: bool = False, device: str = "cpu", dtype: torch.dtype | None = None,
                   on_skip: Callable[[str], None] | None = None, max_pixels: int | None = MAX_PIXELS,
                   sampling: FrameSampling = EVAL_SAMPLING, embedder=None) -> Iterator[list[dict]]:
    """Encode each record's `image` or `video` (its frames sampled by `sampling`, from its
    `start`..`end` segment when it has one); yield the
    records of each batch of `batch_size` media, in input order, with `features` (a reference to
    (frames, tokens, d) features) and `encoder` added. Frames go through the encoder one by one,
    `batch_size` frames a forward, across the batch's videos and images. Media over
    `max_pixels` are refused undecoded (an error, or skipped with skip_bad). Records are read as
    they are consumed, WINDOW batches at a time: memory is bounded by that, not by the input.

    With an `embedder` (a module with `transform()` and `identity`, mapping pixels (n, 3, H, W)
    to (n, d): importers.clip_towers.ClipEmbedding), each record also gets `embedding`, a
    reference to its media's (frames, d) image embedding, in float32 whatever `dtype` (as
    OpenFlamingo's RICES computes it), cached by content, frame sampling and the tower's identity."""
    for window in batches(records, batch_size * WINDOW):
        yield from _encode_window(encoder, identity, window, root=root, batch_size=batch_size, workers=workers,
                                  skip_bad=skip_bad, device=device, dtype=dtype, on_skip=on_skip,
                                  max_pixels=max_pixels, sampling=sampling, embedder=embedder)


# Batches of records one DataLoader decodes ahead of the encoder: enough to keep its workers busy.
WINDOW = 8


def _encode_window(encoder, identity: str, records: list[dict], *, root: Path, batch_size: int, workers: int,
                   skip_bad: bool, device: str, dtype: torch.dtype | None, on_skip: Callable[[str], None] | None,
                   max_pixels: int | None, sampling: FrameSampling, embedder) -> Iterator[list[dict]]:
    items = [(kind, path, clip_span(r) if kind == "video" else None) for r in records
             for kind, path in [media_item(r)]]
    run = dict(items=items, batch_size=batch_size, workers=workers, device=device, max_pixels=max_pixels,
               sampling=sampling)
    embedded = _embed_window(embedder, root=root, **run) if embedder is not None else {}

    def target(key: str) -> Path:
        return tensor_path(root, key, identity)

    def save(item: dict, f: torch.Tensor) -> None:
        meta = _metadata(items[item["index"]], item, f, sampling, encoder=identity)
        save_tensors(target(item["digest"]), {FEATURES: f, POOLED: f.mean(dim=(0, 1))}, meta)

    features = _computed(lambda chunk: encoder(chunk)[:, 0], encoder.transform(), target, save, dtype=dtype, **run)
    for batch in features:
        out = []
        for item in batch:
            error = item.get("error") or embedded.get(item["index"], (None, None))[1]
            if error:
                if not skip_bad:
                    raise ArtifactError(error)
                if on_skip:
                    on_skip(error)
                continue
            record = {**records[item["index"]], "features": make_ref(target(item["digest"]), FEATURES),
                      "encoder": identity}
            if embedder is not None:
                record["embedding"] = embedded[item["index"]][0]
            out.append(record)
        yield out


def _embed_window(embedder, *, root: Path, items: list, sampling: FrameSampling, **run) -> dict[int, tuple]:
    """Item index -> (its embedding's reference, None) or (None, why its media could not be read),
    the embeddings not yet cached computed in float32."""
    def target(key: str) -> Path:
        return embedding_path(root, key, embedder.identity)

    def save(item: dict, e: torch.Tensor) -> None:
        meta = _metadata(items[item["index"]], item, e, sampling, embedding=embedder.identity)
        save_tensors(target(item["digest"]), {EMBEDDING: e}, meta)

    done = {}
    for batch in _computed(embedder, embedder.transform(), target, save, dtype=None, items=items, sampling=sampling,
                           **run):
        done.update((item["index"], (None, item["error"]) if "error" in item
                     else (make_ref(target(item["digest"]), EMBEDDING), None)) for item in batch)
    return done


def _computed(model, transform, target: Callable[[str], Path], save: Callable[[dict, torch.Tensor], None], *,
              items: list, batch_size: int, workers: int, device: str, dtype: torch.dtype | None,
              max_pixels: int | None, sampling: FrameSampling) -> Iterator[list[dict]]:
    """The DataLoader's batches of `items`, each medium not yet at its `target` decoded and run
    through `model` frame by frame (`batch_size` frames a forward, (frames, ...) per medium), and
    saved; the items carry `index`, and `digest` or `error`."""
    dataset = MediaFiles(items, transform, lambda key: target(key).exists(),
                         max_pixels=max_pixels, sampling=sampling)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_unshared)
    for batch in loader:
        fresh = [item for item in batch if item.get("pixels") is not None]
        if fresh:
            frames = torch.cat([torch.from_numpy(item["pixels"]) for item in fresh])
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
                outputs = torch.cat([model(chunk.to(device)).float() for chunk in frames.split(batch_size)])
            for item, output in zip(fresh, outputs.split([len(item["pixels"]) for item in fresh])):
                save(item, output)
        yield batch


def _metadata(medium: tuple, item: dict, tensor: torch.Tensor, sampling: FrameSampling, **identity: str) -> dict:
    """A feature or embedding file's metadata: what made it, from which medium, its frames."""
    kind, path, span = medium
    meta = {**identity, "source": str(path), "frames": str(tensor.shape[0])}
    if kind == "video":
        meta.update(sampling=sampling.key(), times=",".join(f"{t:.3f}" for t in item["times"]))
        if span is not None:
            meta["span"] = f"{span[0]:g}-{span[1]:g}"
    return meta


def _unshared(batch: list[dict]) -> list[dict]:
    """A worker's batch with its pixels as numpy arrays, which are pickled through the worker's
    pipe. Tensors would be shared as file descriptors, served by a thread in the worker: a SIGTERM
    that ends the stage mid-transfer then shows that thread's traceback, or a failed receipt, rather
    than the one line a terminated stage prints."""
    return [{**item, "pixels": item["pixels"].numpy()} if item.get("pixels") is not None else item for item in batch]


def resample_records(model, records: list[dict], *, root: Path, device: str = "cpu") -> list[dict]:
    """Feature records -> the same records with `visual`, a reference to (latents, d) visual
    tokens of this checkpoint, stored content-addressed by features and checkpoint."""
    out = []
    for record in records:
        ref = record.get("features")
        if not isinstance(ref, str):
            raise ArtifactError(f"{record.get('id', '<record>')}: no 'features' reference (run flamingo encode first)")
        features, meta = load_ref(ref, encoder=model.encoder_id)
        if features.ndim != 3 or features.shape[-1] != model.config.resampler.dim:
            raise ArtifactError(f"{ref}: features must be (frames, tokens, {model.config.resampler.dim}), "
                                f"got {tuple(features.shape)}")
        content = digest_file(split_ref(ref)[0])
        path = tensor_path(root, f"{content}#{split_ref(ref)[1]}", model.checkpoint_id)
        if not path.exists():
            with torch.no_grad():
                visual = model.resample(features.unsqueeze(0).to(device))[0]
            save_tensors(path, {VISUAL: visual.float()},
                         {"encoder": model.encoder_id, "checkpoint": model.checkpoint_id,
                          "source": meta.get("source", ref)})
        out.append({**record, "visual": make_ref(path, VISUAL)})
    return out


def media_items(record: dict) -> list[tuple[str, str]]:
    """A training record's media: the `images` of an interleaved document, or its one medium."""
    if "segments" in record or "images" in record:
        images = record.get("images")
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ArtifactError(f"{record.get('id', '<record>')}: an interleaved document needs an 'images' list")
        return [("image", p) for p in images]
    return [media_item(record)]


def write_feature_shards(encoder, identity: str, records: Iterable[dict], pattern: str, *, root: Path,
                         maxcount: int = 1000, on_batch=None, on_record: Callable[[dict], None] | None = None,
                         **encode_kw) -> int:
    """Encode every record's media (through the feature cache) and write webdataset shards of
    records plus features, for `flamingo pretrain`, reading the records as it goes. Each shard
    appears under its final name only once complete. on_record hears of each record as its
    sample is written, with `encoder` and `features`: a reference, or a list of them for a record
    with an `images` list. A record with a skipped (unreadable) image is left out. Returns how
    many records were written."""
    import os

    import webdataset as wds

    from ..formats.artifacts import feature_sample, signals_deferred

    pending: dict[int, tuple[dict, int, list[str]]] = {}  # record number -> (record, media, references so far)

    def media():
        for i, record in enumerate(records):
            items = media_items(record)
            pending[i] = (record, len(items), [])
            span = {k: record[k] for k in ("start", "end") if k in record}
            for kind, path in items:
                yield {kind: path, "owner": i, **(span if kind == "video" else {})}

    def finished(before: int | float) -> Iterator[tuple[int, dict, list[str]]]:
        # media are encoded in order, so every record before `before` has all it will get
        while pending and (i := next(iter(pending))) < before:
            record, count, refs = pending.pop(i)
            if len(refs) == count:
                yield i, record, refs

    Path(pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    failed = []

    def finish(name: str) -> None:
        # ShardWriter closes its last shard on the way out of an error too: that one is partial.
        if failed:
            os.unlink(name)
        else:
            os.replace(name, name[: -len(".tmp")])

    written = 0

    def write(sink, done) -> None:
        nonlocal written
        for i, record, refs in done:
            features = [load_ref(ref, encoder=identity)[0] for ref in refs]
            sample = feature_sample(f"{i:09d}", record, features, identity)
            with signals_deferred():  # a signal inside a write could meet a shard half renamed
                sink.write(sample)
            written += 1
            if on_record:
                on_record({**record, "features": refs if "images" in record else refs[0], "encoder": identity})

    with storage_errors(pattern), wds.ShardWriter(pattern + ".tmp", maxcount=maxcount, verbose=0, post=finish) as sink:
        try:
            for batch in encode_records(encoder, identity, media(), root=root, **encode_kw):
                for item in batch:
                    pending[item["owner"]][2].append(item["features"])
                if on_batch:
                    on_batch(len(batch))
                if batch:
                    write(sink, finished(batch[-1]["owner"]))
            write(sink, finished(float("inf")))
        except BaseException:
            failed.append(True)
            raise
    return written
