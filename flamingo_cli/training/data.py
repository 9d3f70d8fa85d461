"""Training data: webdataset shards -> the paper's samples -> per-dataset global batches.

Order is deterministic and independent of the number of processes: every rank reads the
same sample stream (shards in a seeded order per epoch, read by webdataset's own tar
iterators), forms the same global batch of B usable examples, and keeps its slice. Each
sample's randomness (window, p_next, leading space) comes from an RNG seeded by
(seed, dataset, sample index), so resuming at a data position reproduces the samples
bitwise without saving generator state.
"""
from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import FlamingoError
from ..formats.artifacts import ArtifactError, VideoBytes, read_sample
from ..formats.shards import shard_urls
from .sampling import SamplingConfig, collate, interleaved_example, pair_example


@dataclass
class DatasetSpec:
    name: str
    pattern: str  # shard paths, brace patterns allowed
    weight: float = 1.0  # lambda_m: this dataset's share of the loss
    batch: int = 8  # global batch size, over all processes


@dataclass
class DataStats:
    position: int = 0  # raw samples consumed from the stream: the resume point
    bad: int = 0  # unreadable samples, logged and skipped
    empty: int = 0  # windows without an image, skipped


def parse_specs(data: list[str], weights: list[str], batches: list[str]) -> list[DatasetSpec]:
    """--data NAME=PATTERN, --weight NAME=L, --batch NAME=B into specs."""
    def pairs(items, what):
        out = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                raise FlamingoError(f"--{what} {item!r}: expected NAME=VALUE")
            out[name] = value
        return out

    patterns, lambdas, sizes = pairs(data, "data"), pairs(weights, "weight"), pairs(batches, "batch")
    if not patterns:
        raise FlamingoError("no training data: give --data NAME=SHARDS (or a --config preset)")
    for what, named in (("weight", lambdas), ("batch", sizes)):
        unknown = sorted(set(named) - set(patterns))
        if unknown:
            raise FlamingoError(f"--{what} names unknown dataset(s) {', '.join(unknown)}")
    try:
        return [DatasetSpec(name, pattern, float(lambdas.get(name, 1.0)), int(sizes.get(name, 8)))
                for name, pattern in patterns.items()]
    except ValueError as e:
        raise FlamingoError(f"bad --weight or --batch value: {e}") from None


def check_shards(specs: list[DatasetSpec]) -> None:
    """What a run can check before it creates anything: every dataset's local shards exist, and
    its first is a tar archive with something in it. (Later bad data is skipped and counted.)"""
    import tarfile

    for spec in specs:
        local = [u for u in shard_urls(spec.pattern) if "://" not in u]
        if not local:
            continue
        try:
            with tarfile.open(local[0]) as tar:
                empty = tar.next() is None
        except tarfile.TarError:
            raise FlamingoError(f"{local[0]}: not a readable shard (not a tar archive)") from None
        except OSError as e:
            raise FlamingoError(f"{local[0]}: {e.strerror}") from None
        if empty:
            raise FlamingoError(f"{local[0]}: not a readable shard (an empty archive)")


def _raw_samples(urls: list[str], seed: int, log) -> Iterator[dict]:
    """Samples forever: epoch e reads the shards in an order seeded by (seed, e)."""
    from webdataset.tariterators import shardlist, tarfile_samples

    def warn(exc) -> bool:
        log(f"flamingo pretrain: skipping unreadable shard data: {exc}")
        return True

    epoch = 0
    while True:
        order = list(urls)
        random.Random(f"{seed}\0epoch\0{epoch}").shuffle(order)
        count = 0
        for sample in tarfile_samples(shardlist(order), handler=warn):
            count += 1
            yield sample
        if count == 0:  # a whole pass yielded nothing: looping again would never end
            raise FlamingoError(f"{urls[0]}: no readable samples in {len(urls)} shard(s)")
        epoch += 1


BAD_SAMPLE = (ArtifactError, ValueError, KeyError, TypeError)


def make_example(sample: dict, tokenizer, sampling: SamplingConfig, rng: random.Random, seed: int = 0,
                 model_config=None):
    """(Example or None, media, encoder) for one webdataset sample; BAD_SAMPLE errors if unusable.
    Its tokens are written as `model_config` (the model's FlamingoConfig; None: the default) writes them.
    A raw video is decoded here, in the loader, into a Clip of sampling.video_frames frames
    sampling.video_fps apart, from a window seeded by `seed` and the video's bytes, within the
    record's start..end segment when KEY.json gives one."""
    record, media, encoder = read_sample(sample)
    if any(isinstance(m, VideoBytes) for m in media):
        from ..inference.encoding import clip_span

        span = clip_span({"id": sample.get("__key__", "<sample>"), **record})
        media = [_clip(m, f"{sample.get('__key__', '<sample>')}: video", sampling, seed, span)
                 if isinstance(m, VideoBytes) else m for m in media]
    if "segments" in record:
        segments = record["segments"]
        if not isinstance(segments, list) or any(isinstance(s, int) and not 0 <= s < len(media) for s in segments):
            raise ArtifactError(f"{sample.get('__key__')}: segments refer to media it does not have")
        example = interleaved_example(tokenizer, segments, rng, sampling, model_config)
    elif isinstance(record.get("caption"), str) and media:
        example = pair_example(tokenizer, record["caption"], rng, sampling, model_config)
    else:
        raise ArtifactError(f"{sample.get('__key__')}: neither a caption with an image nor segments")
    return example, media, encoder


def _clip(data: bytes, name: str, sampling: SamplingConfig, seed: int, span):
    from ..formats.artifacts import digest_bytes
    from ..inference.video import Clip, FrameSampling, read_video

    frames = FrameSampling(frames=sampling.video_frames, fps=sampling.video_fps, clip="random", seed=seed)
    return Clip(read_video(name, frames, data=data, content=digest_bytes(data), span=span)[0])


class ExampleStream:
    """One dataset's stream of (Example, media) in global order, resumable at a position.
    Every process reads every shard and returns the whole global batch (--split samples).
    model_config: the model's FlamingoConfig, which writes its tokens (make_example)."""

    local = False

    def __init__(self, spec: DatasetSpec, tokenizer, sampling: SamplingConfig, *, seed: int, position: int = 0,
                 log=None, model_config=None):
        self.spec, self.tokenizer, self.sampling, self.seed = spec, tokenizer, sampling, seed
        self.model_config = model_config
        self.stats = DataStats(position=position)
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self._samples = _raw_samples(shard_urls(spec.pattern), seed, self.log)
        for _ in range(position):
            next(self._samples)

    def next_batch(self) -> list[tuple]:
        """The next global batch: `batch` usable examples with their media."""
        out = []
        while len(out) < self.spec.batch:
            index = self.stats.position
            sample = next(self._samples)
            self.stats.position += 1
            try:
                rng = random.Random(f"{self.seed}\0{self.spec.name}\0{index}")
                example, media, encoder = make_example(sample, self.tokenizer, self.sampling, rng, self.seed,
                                                       self.model_config)
            except BAD_SAMPLE as e:
                self.stats.bad += 1
                self.log(f"flamingo pretrain: {self.spec.name}: skipping sample {index}: {e}")
                continue
            if example is None:
                self.stats.empty += 1
                continue
            out.append((example, [media[i] for i in example.media], encoder))
        return out


class _ShardWorkerSamples(torch.utils.data.IterableDataset):
    """Runs in each DataLoader worker: this process's and this worker's shards of every epoch,
    dealt by webdataset's split_by_node and split_by_worker, decoded into examples."""

    def __init__(self, spec: DatasetSpec, urls: list[str], tokenizer, sampling: SamplingConfig, seed: int,
                 model_config):
        self.spec, self.urls, self.tokenizer, self.sampling, self.seed = spec, urls, tokenizer, sampling, seed
        self.model_config = model_config

    def __iter__(self):
        from webdataset.shardlists import split_by_node, split_by_worker
        from webdataset.tariterators import shardlist, tarfile_samples

        epoch = 0
        while True:
            order = list(self.urls)
            random.Random(f"{self.seed}\0epoch\0{epoch}").shuffle(order)
            mine = list(split_by_worker(split_by_node(order)))
            count = 0
            for sample in tarfile_samples(shardlist(mine), handler=_skip_unreadable):
                count += 1
                key = f"{sample.get('__url__')}\0{sample.get('__key__')}\0{epoch}"
                try:
                    example, media, encoder = make_example(
                        sample, self.tokenizer, self.sampling, random.Random(f"{self.seed}\0{self.spec.name}\0{key}"),
                        self.seed, self.model_config)
                except BAD_SAMPLE as e:
                    yield ("bad", str(e))
                    continue
                yield ("empty", None) if example is None else (example, [media[i] for i in example.media], encoder)
            if count == 0:
                raise FlamingoError(f"dataset {self.spec.name}: no readable samples in shards {', '.join(mine)}")
            epoch += 1


def _skip_unreadable(exc) -> bool:
    print(f"flamingo pretrain: skipping unreadable shard data: {exc}", file=sys.stderr)
    return True


def _as_is(item):
    return item


class ShardStream:
    """--split shards: each process reads only its shards and DataLoader workers decode them
    while the model trains. Batches are per process (B / processes), so which examples meet in
    a global batch depends on the process and worker counts: runs with different counts agree
    statistically, not exactly. Resuming with the same counts is exact. model_config: as ExampleStream's."""

    local = True

    def __init__(self, spec: DatasetSpec, tokenizer, sampling: SamplingConfig, *, seed: int, world: int,
                 workers: int, position: int = 0, log=None, model_config=None):
        urls = shard_urls(spec.pattern)
        readers = world * max(1, workers)
        if len(urls) < readers:
            raise FlamingoError(f"dataset {spec.name}: --split shards needs at least {readers} shards "
                                f"({world} processes x {max(1, workers)} workers), found {len(urls)}")
        if spec.batch % world:
            raise FlamingoError(f"dataset {spec.name}: global batch {spec.batch} does not divide over {world} processes")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenize
        self.spec, self.batch = spec, spec.batch // world
        self.stats = DataStats()
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        loader = torch.utils.data.DataLoader(_ShardWorkerSamples(spec, urls, tokenizer, sampling, seed, model_config),
                                             batch_size=None, num_workers=workers, collate_fn=_as_is)
        self._items = iter(loader)
        for _ in range(position):
            self._next()

    def _next(self):
        self.stats.position += 1
        return next(self._items)

    def next_batch(self) -> list[tuple]:
        """This process's share of the next global batch."""
        out = []
        while len(out) < self.batch:
            item = self._next()
            if item[0] == "bad":
                self.stats.bad += 1
                self.log(f"flamingo pretrain: {self.spec.name}: skipping a sample: {item[1]}")
            elif item[0] == "empty":
                self.stats.empty += 1
            else:
                out.append(item)
        return out


def to_tensors(batch: list[tuple], pad_id: int) -> dict:
    """Collated tokens plus the media of each example, in order."""
    tensors = collate([example for example, _, _ in batch], pad_id)
    tensors["media"] = [media for _, media, _ in batch]
    return tensors


class MediaEncoder:
    """Raw shard media (image bytes, decoded video Clips) -> features with a checkpoint's frozen
    encoder, loaded on first use (training from feature shards never loads it). Every frame of
    the batch goes through one batched encoder call."""

    def __init__(self, load, device: str = "cpu"):
        self.load, self.device = load, device
        self.encoder = self.transform = None

    def __call__(self, media: list) -> list[torch.Tensor]:
        from ..inference.media import read_image
        from ..inference.video import Clip

        if self.encoder is None:
            self.encoder = self.load().to(self.device)
            self.transform = self.encoder.transform()
        frames = [m if isinstance(m, Clip) else [read_image("<shard image>", m)] for m in media]
        pixels = torch.stack([self.transform(frame) for clip in frames for frame in clip])
        features = self.encoder(pixels.to(self.device))[:, 0]  # each frame on its own: (frames, tokens, d)
        return list(features.split([len(clip) for clip in frames]))


def batch_features(media: list[list], encode_images=None, device: str = "cpu") -> torch.Tensor | None:
    """Per-example media (feature tensors, or raw media run through `encode_images`)
    -> (b, max media, frames, tokens, d) on `device`, zero padded."""
    from ..inference.media import pad_media

    raw = [m for ms in media for m in ms if not isinstance(m, torch.Tensor)]
    encoded = iter(encode_images(raw) if raw else [])
    features = [[m.to(device) if isinstance(m, torch.Tensor) else next(encoded) for m in ms] for ms in media]
    shapes = {tuple(f.shape) for fs in features for f in fs}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise FlamingoError(f"one batch mixes media of shapes {sorted(shapes)}; keep videos of one length "
                            "and images in separate datasets")
    shape = shapes.pop()
    return pad_media([torch.stack(fs) if fs else torch.zeros(0, *shape, device=device) for fs in features])
