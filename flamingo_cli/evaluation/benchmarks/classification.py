"""The classification benchmarks: Hateful Memes, ImageNet, and for video RareAct."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ...formats.artifacts import ArtifactError
from .files import ID_TYPES, check_unique, field, read_text

# -- Hateful Memes ----------------------------------------------------------------------

def read_hatefulmemes(root: Path, split: str) -> list[dict]:
    """Hateful Memes (Facebook AI), splits train, dev_seen, dev_unseen, test_seen, test_unseen.

    root/{split}.jsonl
        one object a line: {"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}
        ("label" may be absent in unlabelled test files)
    root/{img}

    label is "yes" for hateful (1), "no" otherwise; an unlabelled line gets no label fields.
    """
    path = root / f"{split}.jsonl"
    records = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
        where = f"line {lineno}"
        native_id = field(item, "id", ID_TYPES, path, where)
        record = {
            "id": f"hatefulmemes-{native_id}",
            "image": str(root / field(item, "img", str, path, where)),
            "split": split,
            "text": field(item, "text", str, path, where),
        }
        if "label" in item:
            label = item["label"]
            if isinstance(label, bool) or label not in (0, 1):
                raise ArtifactError(f"{path}: {where}: label should be 0 or 1, got {label!r}")
            record["label"] = "yes" if label == 1 else "no"
            record["label_id"] = int(label)
        records.append(record)
    return check_unique(records, path)


# -- ImageNet ---------------------------------------------------------------------------

def _synsets(root: Path) -> dict[str, str]:
    """synset -> class name (the first comma-separated name), in file order."""
    path = Path(root) / "LOC_synset_mapping.txt"
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        synset, _, names = line.strip().partition(" ")
        name = names.split(",")[0].strip()
        if not name:
            raise ArtifactError(f"{path}: line {lineno}: expected 'SYNSET name, ...', got {line.strip()!r}")
        if synset in mapping:
            raise ArtifactError(f"{path}: line {lineno}: synset {synset} listed twice")
        mapping[synset] = name
    if not mapping:
        raise ArtifactError(f"{path}: no synsets")
    return mapping


def imagenet_classnames(root: str | Path) -> list[str]:
    """The class names, one per line of root/LOC_synset_mapping.txt, in file order."""
    return list(_synsets(Path(root)).values())


def read_imagenet(root: Path, split: str) -> list[dict]:
    """ImageNet-1k (ILSVRC 2012) in Kaggle's layout, splits train and val.

    root/LOC_synset_mapping.txt     lines "n01440764 tench, Tinca tinca"; a class's name is
                                    the first comma-separated name
    val:   root/LOC_val_solution.csv
               header "ImageId,PredictionString"; rows like
               "ILSVRC2012_val_00008726,n02119789 255 142 454 329 n02119789 44 21 322 295"
               (the label is PredictionString's first token), in file order
           root/ILSVRC/Data/CLS-LOC/val/{ImageId}.JPEG
    train: root/ILSVRC/Data/CLS-LOC/train/{synset}/*.JPEG, the label taken from the folder,
           files listed sorted by path

    id is "imagenet-" plus the ImageId (val) or the file's stem (train).
    """
    synsets = _synsets(root)
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    records = []
    if split == "val":
        path = root / "LOC_val_solution.csv"
        rows = list(csv.reader(read_text(path).splitlines()))
        if not rows or [c.strip() for c in rows[0]] != ["ImageId", "PredictionString"]:
            raise ArtifactError(f"{path}: expected header 'ImageId,PredictionString'")
        for lineno, row in enumerate(rows[1:], start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].split():
                raise ArtifactError(f"{path}: line {lineno}: expected 'ImageId,SYNSET ...', got {','.join(row)!r}")
            image_id, synset = row[0].strip(), row[1].split()[0]
            if synset not in synsets:
                raise ArtifactError(f"{path}: line {lineno}: synset {synset} is not in LOC_synset_mapping.txt")
            records.append(_imagenet_record(image_id, data / "val" / f"{image_id}.JPEG", split, synset, synsets))
        return check_unique(records, path)

    train = data / "train"
    if not train.is_dir():
        raise ArtifactError(f"{train}: no such directory")
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        if folder.name not in synsets:
            raise ArtifactError(f"{folder}: synset {folder.name} is not in LOC_synset_mapping.txt")
        for image in sorted(folder.glob("*.JPEG")):
            records.append(_imagenet_record(image.stem, image, split, folder.name, synsets))
    return check_unique(records, train)


def _imagenet_record(image_id: str, image: Path, split: str, synset: str, synsets: dict[str, str]) -> dict:
    return {
        "id": f"imagenet-{image_id}",
        "image": str(image),
        "split": split,
        "label": synsets[synset],
        "synset": synset,
    }


# -- RareAct (Miech et al., "RareAct: A video dataset of unusual interactions", 2020;
# github.com/antoine77340/RareAct)

RAREACT_COLUMNS = ("id", "video_id", "start", "end", "class_id", "verb", "noun", "annotation")


def _rareact_rows(root: Path) -> tuple[Path, list[dict]]:
    path = Path(root) / "rareact.csv"
    rows = list(csv.DictReader(io.StringIO(read_text(path))))
    missing = [c for c in RAREACT_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ArtifactError(f"{path}: no column {', '.join(missing)} (expected {', '.join(RAREACT_COLUMNS)})")
    for i, row in enumerate(rows):
        for column in ("id", "class_id", "annotation", "start", "end"):
            try:
                row[column] = float(row[column]) if column in ("start", "end") else int(row[column])
            except ValueError:
                raise ArtifactError(f"{path}: row {i + 2}: {column} should be a number, got {row[column]!r}") from None
        if not 0 <= row["annotation"] <= 4:
            raise ArtifactError(f"{path}: row {i + 2}: annotation should be 0 to 4, got {row['annotation']}")
    return path, rows


def rareact_classnames(root: str | Path) -> list[str]:
    """The (verb, noun) classes as the text `score` ranks ("cut laptop"), in class_id order."""
    _, rows = _rareact_rows(Path(root))
    names = {row["class_id"]: f"{row['verb']} {row['noun']}" for row in rows}
    return [names[c] for c in sorted(names)]


def read_rareact(root: Path, split: str) -> list[dict]:
    """RareAct, split test (all of it: a zero-shot benchmark).

    root/rareact.csv
        a header, then one row per (clip, class) annotation: id, video_id, start, end (seconds),
        class_id, verb, noun, annotation (1 positive; 2, 3, 4 hard negatives: only the verb
        right, only the noun right, both right but the verb not applied to the noun; 0 negative)
    root/videos/{video_id}.mp4   (the release's videos are named by YouTube id)

    Close-ended: `score` ranks every class (`flamingo data rareact ROOT --classes`) for each
    clip; the metric is mWAP (evaluation.metrics.rareact_mwap) over `verb`, `noun`,
    `annotation` and `video_id`. `label` is the row's class.
    """
    path, rows = _rareact_rows(root)
    records = [{
        "id": f"rareact-{row['id']}",
        "video": str(root / "videos" / f"{row['video_id']}.mp4"),
        "split": split,
        "start": row["start"], "end": row["end"],
        "verb": row["verb"], "noun": row["noun"], "label": f"{row['verb']} {row['noun']}",
        "class_id": row["class_id"], "annotation": row["annotation"], "video_id": row["video_id"],
    } for row in rows]
    return check_unique(records, path)
