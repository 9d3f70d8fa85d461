"""Reading a benchmark's files with one-line errors that name the file and what is wrong in it."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from ...formats.artifacts import ArtifactError


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ArtifactError(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise ArtifactError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not UTF-8 text") from None


def load_json(path: Path) -> Any:
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None


def expect(value: Any, kind: type | tuple[type, ...], path: Path, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ArtifactError(f"{path}: {what} should be {article(names)}, got {type(value).__name__}")
    return value


def article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def field(item: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """item[key], checked to be of `kind`; `where` names the item in messages."""
    if not isinstance(item, dict):
        raise ArtifactError(f"{path}: {where} should be a JSON object, got {type(item).__name__}")
    if key not in item:
        raise ArtifactError(f"{path}: {where} lacks required field '{key}'")
    return expect(item[key], kind, path, f"{where} field '{key}'")


def optional(item: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """item[key] checked as field() checks it, or None where the item has no such key."""
    if isinstance(item, dict) and key not in item:
        return None
    return field(item, key, kind, path, where)


def top_list(data: Any, key: str, path: Path) -> list:
    """data[key] for a top-level JSON object holding a list under `key`."""
    return field(data, key, list, path, "top-level object")


def most_frequent(answers: list[str]) -> str:
    """The most frequent answer; ties go to the one that occurs first."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def check_unique(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for r in records:
        if r["id"] in seen:
            raise ArtifactError(f"{path}: duplicate id {r['id']!r}")
        seen.add(r["id"])
    return records


ID_TYPES = (int, str)
