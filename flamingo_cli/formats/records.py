"""JSON Lines records: reading them (UTF-8, one object per line, every record an id), writing
them, and the media paths inside them, which are relative to the file that holds them.

The record half of the artifact contract (artifacts.py holds the tensor half; both are
documented for users in man/flamingo-artifacts.5). Readers are lazy: a stage holds one batch of
records, not its input.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .artifacts import FEATURES, VISUAL, ArtifactError, is_ref, make_ref, split_ref


def read_records(stream: IO[bytes] | IO[str], source: str, *,
                 on_derived_id: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Records from a JSON Lines stream, binary (decoded here, line by line) or text. Blank
    lines are skipped; a malformed line, or one that is not UTF-8, is an error naming
    `source` and the line number.

    Every record has an `id`, a string or an integer: it seeds the record's shots and joins
    its results. A record without one is named by its place, "SOURCE:LINE" ("stdin:3" for
    standard input), and on_derived_id hears of the first such id."""
    label = "stdin" if source == "<stdin>" else source
    told = False
    for lineno, line in enumerate(stream, start=1):
        try:
            if isinstance(line, bytes):
                line = line.decode("utf-8")
            else:
                line.encode("utf-8")  # a text stream decoded with surrogateescape lets bad bytes through
        except UnicodeError:
            raise ArtifactError(f"{source}: line {lineno}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{source}: line {lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise ArtifactError(f"{source}: line {lineno}: expected a JSON object, got {type(record).__name__}")
        rid = record.get("id")
        if rid is None:
            record = {"id": f"{label}:{lineno}", **record}
            if on_derived_id is not None and not told:
                on_derived_id(record["id"])
                told = True
        elif isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise ArtifactError(f"{source}: line {lineno}: 'id' must be a non-empty string or an integer, "
                                f"got {json.dumps(rid)}")
        yield record


def iter_records_file(path: str | Path, *, on_derived_id: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records of a file, read as they are consumed, their relative media paths made relative
    to the current directory (so `--shots /elsewhere/shots.jsonl` finds /elsewhere/shots/...)."""
    base = _file_dir(path)
    move = None if base is None else (lambda p: os.path.normpath(os.path.join(base, p)))
    try:
        with open(path, "rb") as f:
            for record in read_records(f, str(path), on_derived_id=on_derived_id):
                yield record if move is None else rebase_paths(record, move)
    except OSError as e:
        raise ArtifactError(f"{path}: {e.strerror}") from None


def read_records_file(path: str | Path, *, on_derived_id: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """All the records of a file (see iter_records_file)."""
    return list(iter_records_file(path, on_derived_id=on_derived_id))


# Fields whose strings (or lists of strings) are media paths or tensor references.
PATH_FIELDS = ("image", "images", "video", "videos", FEATURES, VISUAL, "media")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def rebase_paths(record: dict[str, Any], move: Callable[[str], str]) -> dict[str, Any]:
    """The record with `move` applied to every relative local path in its PATH_FIELDS (a
    reference's file part); absolute paths and URLs are left as they are."""
    def moved(value):
        if isinstance(value, list):
            return [moved(v) for v in value]
        if not isinstance(value, str) or not value or os.path.isabs(value) or _URL.match(value):
            return value
        if is_ref(value):
            path, key = split_ref(value)
            return make_ref(move(path), key)
        return move(value)

    changed = {f: moved(record[f]) for f in PATH_FIELDS if f in record}
    return {**record, **changed} if changed else record


def _file_dir(path: str | Path) -> str | None:
    """The directory a regular file's relative paths are relative to, or None where that is
    the current directory already, or where `path` is a pipe (stdin, `<(...)`, a FIFO)."""
    if not os.path.isfile(path):
        return None
    base = os.path.dirname(os.fspath(path))
    return None if os.path.abspath(base or ".") == os.getcwd() else base


def format_record(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def write_records(stream: IO[str], records: Iterable[dict[str, Any]]) -> None:
    """Write and flush, so a downstream `head -1` sees the first records as soon as they exist.
    Into a regular file (open_output's temp file beside the output), relative media paths are
    written relative to that file's directory, as read_records_file reads them back."""
    name = getattr(stream, "name", None)
    base = _file_dir(name) if isinstance(name, str) else None
    if base is not None:
        records = (rebase_paths(r, lambda p: os.path.relpath(p, base)) for r in records)
    for record in records:
        stream.write(format_record(record))
    stream.flush()
