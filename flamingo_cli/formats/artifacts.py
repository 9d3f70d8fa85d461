"""The artifact contract: safetensors tensor references, outputs written whole, the cache.

This module and records.py (JSON Lines records) are the only ones that know how records and
tensors are laid out on disk (man/flamingo-artifacts.5 documents the same, for users).

Tensors: safetensors files, referenced from records as "PATH#KEY". Each file's
metadata names what made it (`encoder`, and for visual tokens the `checkpoint`), so a
reference carries the identity of the encoder and a model refuses foreign features.
An image embedding (`encode --embedding`, the similarity vector of OpenFlamingo's RICES) lies in
a file of its own, (frames, dim) under EMBEDDING, its tower's identity in `embedding`.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..errors import FlamingoError

FORMAT = "flamingo/1"
FEATURES, POOLED, VISUAL = "features", "pooled", "visual"
EMBEDDING = "embedding"


class ArtifactError(FlamingoError):
    pass


# -- files ------------------------------------------------------------------------------

def read_file(path: str | Path) -> bytes:
    """A media file's bytes; a file that cannot be read is one ArtifactError naming it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except OSError as e:
        raise ArtifactError(f"{path}: {e.strerror}") from None



@contextlib.contextmanager
def open_output(path: str | None):
    """stdout for None or '-'; otherwise a temp file beside `path`, renamed into place only
    when the block completes, so an interrupted run never leaves a partial file. Storage that
    refuses the write (a full disk, a quota) is one ArtifactError naming the output."""
    if path in (None, "-"):
        with storage_errors("<stdout>"):
            yield sys.stdout
        return
    if Path(path).exists() and not Path(path).is_file():  # /dev/null, a FIFO: write through, never replace
        with storage_errors(path), open(path, "w", encoding="utf-8") as f:
            yield f
        return
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temp file name beside `path`; renamed onto `path` (with the usual umask mode) only if
    the block completes, removed otherwise."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ArtifactError(f"{path}: not a regular file; refusing to replace it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot write ({e.strerror})") from None
    os.close(fd)
    try:
        with storage_errors(path):
            yield tmp
            os.chmod(tmp, 0o666 & ~default_umask())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# Storage refusing a write: full, over quota, a file too large for a limit, read-only, failing.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def storage_failure(e: BaseException) -> str | None:
    """Why a write failed, when `e` says the storage refused it (also through safetensors,
    which reports the OS error inside its own); None for any other error."""
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        return os.strerror(e.errno)
    if type(e).__name__ == "SafetensorError":
        code = re.search(r"os error (\d+)", str(e))
        if code and int(code.group(1)) in STORAGE_ERRNOS:
            return os.strerror(int(code.group(1)))
    return None


@contextlib.contextmanager
def storage_errors(path: str | Path):
    """Turns storage refusing a write inside the block into one ArtifactError naming `path`."""
    try:
        yield
    except Exception as e:
        reason = storage_failure(e)
        if reason is None:
            raise
        raise ArtifactError(f"{path}: cannot write ({reason})") from None


@contextlib.contextmanager
def signals_deferred():
    """SIGINT and SIGTERM held back while a multi-step rename runs, and delivered right after.
    Handlers are swapped, not signals masked: a mask covers one thread, not torch's others."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


def default_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# -- tensors ----------------------------------------------------------------------------

def make_ref(path: str | Path, key: str) -> str:
    return f"{path}#{key}"


def split_ref(ref: str) -> tuple[str, str]:
    path, sep, key = str(ref).rpartition("#")
    if not sep or not path or not key:
        raise ArtifactError(f"{ref}: not a tensor reference (expected PATH.safetensors#KEY)")
    return path, key


def is_ref(value: Any) -> bool:
    return isinstance(value, str) and ".safetensors#" in value


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """Write a safetensors file atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={"format": FORMAT, **metadata})
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except Exception as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_short(e)})") from None


def load_ref(ref: str, *, encoder: str | None = None, checkpoint: str | None = None):
    """The tensor a reference points to. With `encoder` (and `checkpoint`), refuse tensors
    whose file says they were made by a different encoder (or model)."""
    from safetensors import safe_open

    path, key = split_ref(ref)
    meta = read_metadata(path)
    if encoder is not None and meta.get("encoder") != encoder:
        raise ArtifactError(
            f"{ref}: made by encoder {meta.get('encoder', 'unknown')}, but this checkpoint's encoder is {encoder}")
    if checkpoint is not None and meta.get("checkpoint") not in (None, checkpoint):
        raise ArtifactError(
            f"{ref}: visual tokens from checkpoint {meta['checkpoint']}, not from this one ({checkpoint}); "
            "resample the features again")
    try:
        with safe_open(path, framework="pt") as f:
            if key not in f.keys():
                raise ArtifactError(f"{ref}: no tensor {key!r} in {path} (has {', '.join(f.keys())})")
            return f.get_tensor(key), meta
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{path}: not a readable safetensors file ({_short(e)})") from None


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


# -- identities and the cache -----------------------------------------------------------

# Files at least this large have their digests remembered (a 9B checkpoint's weights take seconds
# to hash, at every start of every stage); smaller ones are hashed again, which is cheaper than a lookup.
DIGEST_MEMO_BYTES = 32 << 20
_HEX = re.compile(r"[0-9a-f]{64}")


def digest_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes. A large file's is remembered in the cache under its path,
    size, modification time and inode, which any rewrite or atomic replacement changes; a cache
    that cannot be written only means hashing again next time."""
    path = Path(path)
    memo = None
    stat = path.stat()
    if stat.st_size >= DIGEST_MEMO_BYTES:
        key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\0{stat.st_dev}"
        memo = cache_dir() / "digests" / digest_bytes(key.encode())
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if _HEX.fullmatch(known := memo.read_text(encoding="ascii").strip()):
                return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        _remember(memo, digest)
    return digest


def _remember(memo: Path, digest: str) -> None:
    with contextlib.suppress(OSError, ArtifactError):  # a cache we cannot write: hash again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(memo) as tmp:
            Path(tmp).write_text(digest + "\n", encoding="ascii")


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_dir() -> Path:
    """Where encoded features go by default: $FLAMINGO_CACHE, else $XDG_CACHE_HOME/flamingo, else ~/.cache/flamingo."""
    if os.environ.get("FLAMINGO_CACHE"):
        return Path(os.environ["FLAMINGO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flamingo"


def tensor_path(root: Path, content: str, identity: str) -> Path:
    """Content-addressed: the same media under the same encoder (or model) maps to the same file."""
    key = digest_bytes(f"{content}\0{identity}".encode())
    return root / key[:2] / f"{key}.safetensors"


def embedding_path(root: Path, content: str, identity: str) -> Path:
    """Where the embedding of `content` by the tower `identity` lies: content-addressed like
    features, apart from them even when the tower is the checkpoint's own encoder."""
    return tensor_path(root, f"{content}\0{EMBEDDING}", identity)


# -- training shards ----------------------------------------------------------------------
# A webdataset sample is `KEY.json` (the record: `caption` for a pair, `segments` for an
# interleaved document, whose ints index its media) plus its media: raw images or videos as
# `KEY.jpg` / `KEY.mp4` (img2dataset's layout, medium 0) or `KEY.<i>.<ext>`, or precomputed features
# as `KEY.features.safetensors` holding one (frames, tokens, d) tensor per medium, keyed
# "0", "1", ..., with the encoder identity in its metadata.

SHARD_FEATURES = "features.safetensors"
SHARD_IMAGES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SHARD_VIDEOS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v"}


class VideoBytes(bytes):
    """A raw training video (`KEY.mp4`, ...): its bytes, told apart from a raw image's."""


def feature_sample(key: str, record: dict, features: list, encoder: str) -> dict:
    """A sample for webdataset's ShardWriter: the record plus its media's features."""
    from safetensors.torch import save

    tensors = {str(i): f.detach().contiguous().cpu() for i, f in enumerate(features)}
    return {"__key__": key, "json": json.dumps(record, ensure_ascii=False).encode(),
            SHARD_FEATURES: save(tensors, metadata={"format": FORMAT, "encoder": encoder})}


def read_sample(sample: dict) -> tuple[dict, list, str | None]:
    """(record, media, encoder) from a webdataset sample. media holds feature tensors when the
    sample has precomputed features (encoder names their encoder), else raw image bytes and
    VideoBytes."""
    key = sample.get("__key__", "<sample>")
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{key}: malformed json ({e})") from None
    elif "txt" in sample:
        record = {}
    else:
        raise ArtifactError(f"{key}: no json or txt")
    if "caption" not in record and "segments" not in record and "txt" in sample:
        record["caption"] = sample["txt"].decode("utf-8", errors="replace")
    if SHARD_FEATURES in sample:
        from safetensors.torch import load

        data = sample[SHARD_FEATURES]
        try:
            tensors = load(data)
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        except Exception as e:
            raise ArtifactError(f"{key}: unreadable features ({_short(e)})") from None
        return record, [tensors[str(i)] for i in range(len(tensors))], header.get("__metadata__", {}).get("encoder")
    return record, [VideoBytes(data) if suffix in SHARD_VIDEOS else data for suffix, data in shard_media(sample)], None


def shard_media(sample: dict) -> list[tuple[str, bytes]]:
    """A raw sample's media members, (suffix, bytes), in order: KEY.<ext> is medium 0, KEY.<i>.<ext> medium i."""
    media = {}
    for ext, data in sample.items():
        stem, _, suffix = ext.rpartition(".")
        suffix = f".{(suffix or ext).lower()}"
        if suffix in SHARD_IMAGES or suffix in SHARD_VIDEOS:
            media[int(stem) if stem.isdigit() else 0] = suffix, data
    return [media[i] for i in sorted(media)]
