"""Readers for standard benchmarks' native annotation files.

Each reader turns a benchmark's files, exactly as they are distributed, into a list of
JSON-able record dicts for one split. Images are never opened or checked: a record's
`image` is `str(Path(root) / <relative path>)`.

Every record has
  id      a string unique in the benchmark and split, prefixed by the benchmark name
  image   the image path
  split   the split asked for
and, by task,
  vqa             question, answers (all human answers, in file order), answer (the one
                  shown when the record is a demonstration), question_id (native id)
  captioning      caption (first reference, stripped), captions (all, stripped),
                  image_id (native id)
  hatefulmemes    text, and where the split is labelled: label ("yes"/"no"), label_id (1/0)
  classification  label (class name), synset

Native layouts under `root` (see each reader's docstring for details):
  vqav2        v2_OpenEnded_mscoco_{split}2014_questions.json, v2_mscoco_{split}2014_annotations.json
  okvqa        OpenEnded_mscoco_{split}2014_questions.json, mscoco_{split}2014_annotations.json
  vizwiz       Annotations/{split}.json
  textvqa      TextVQA_0.5.1_{split}.json
  coco         dataset_coco.json (Karpathy split)
  flickr30k    dataset_flickr30k.json (Karpathy split)
  hatefulmemes {split}.jsonl
  imagenet     LOC_synset_mapping.txt, LOC_val_solution.csv, ILSVRC/Data/CLS-LOC/{train,val}/

Anything wrong with the files (missing, malformed, a required field absent) and any
unknown benchmark or split raises ArtifactError with a one-line message.
"""
from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.artifacts import ArtifactError

TASKS = ("vqa", "captioning", "classification", "hatefulmemes")


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    splits: tuple[str, ...]
    reader: Callable[[Path, str], list[dict[str, Any]]]  # (root, split) -> records
    description: str


# -- helpers ----------------------------------------------------------------------------

def _read_text(path: Path) -> str:
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


def _load_json(path: Path) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None


def _expect(value: Any, kind: type | tuple[type, ...], path: Path, what: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ArtifactError(f"{path}: {what} should be {_article(names)}, got {type(value).__name__}")
    return value


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _field(item: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    """item[key], checked to be of `kind`; `where` names the item in messages."""
    if not isinstance(item, dict):
        raise ArtifactError(f"{path}: {where} should be a JSON object, got {type(item).__name__}")
    if key not in item:
        raise ArtifactError(f"{path}: {where} lacks required field '{key}'")
    return _expect(item[key], kind, path, f"{where} field '{key}'")


def _top_list(data: Any, key: str, path: Path) -> list:
    """data[key] for a top-level JSON object holding a list under `key`."""
    return _field(data, key, list, path, "top-level object")


def _most_frequent(answers: list[str]) -> str:
    """The most frequent answer; ties go to the one that occurs first."""
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def _check_unique(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    seen: set[str] = set()
    for r in records:
        if r["id"] in seen:
            raise ArtifactError(f"{path}: duplicate id {r['id']!r}")
        seen.add(r["id"])
    return records


_ID = (int, str)


# -- VQAv2 and OK-VQA -------------------------------------------------------------------

def _read_coco_vqa(name: str, questions_file: str, annotations_file: str, root: Path, split: str) -> list[dict]:
    qpath = root / questions_file.format(split=split)
    apath = root / annotations_file.format(split=split)
    questions = _top_list(_load_json(qpath), "questions", qpath)
    annotations = _top_list(_load_json(apath), "annotations", apath)

    by_qid: dict[Any, dict] = {}
    for i, ann in enumerate(annotations):
        qid = _field(ann, "question_id", _ID, apath, f"annotation {i}")
        by_qid[qid] = ann

    records = []
    for i, q in enumerate(questions):
        qid = _field(q, "question_id", _ID, qpath, f"question {i}")
        image_id = _field(q, "image_id", int, qpath, f"question {qid}")
        question = _field(q, "question", str, qpath, f"question {qid}")
        ann = by_qid.get(qid)
        if ann is None:
            raise ArtifactError(f"{apath}: no annotation for question {qid}")
        where = f"annotation of question {qid}"
        answers = [
            _field(a, "answer", str, apath, f"{where}, answer {j}")
            for j, a in enumerate(_field(ann, "answers", list, apath, where))
        ]
        if not answers:
            raise ArtifactError(f"{apath}: {where} has no answers")
        answer = _field(ann, "multiple_choice_answer", str, apath, where)
        records.append({
            "id": f"{name}-{qid}",
            "image": str(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg"),
            "split": split,
            "question": question,
            "answers": answers,
            "answer": answer,
            "question_id": qid,
        })
    return _check_unique(records, qpath)


def read_vqav2(root: Path, split: str) -> list[dict]:
    """VQAv2 (visualqa.org), splits train and val.

    root/v2_OpenEnded_mscoco_{split}2014_questions.json
        {"questions": [{"image_id", "question", "question_id"}, ...], ...}
    root/v2_mscoco_{split}2014_annotations.json
        {"annotations": [{"question_id", "image_id", "multiple_choice_answer",
                          "answers": [{"answer", "answer_confidence", "answer_id"}, ...],
                          "question_type", "answer_type"}, ...], ...}
    root/{split}2014/COCO_{split}2014_{image_id:012d}.jpg

    Questions and annotations are joined by question_id, in the questions file's order;
    `answer` is the annotation's multiple_choice_answer.
    """
    return _read_coco_vqa("vqav2", "v2_OpenEnded_mscoco_{split}2014_questions.json",
                          "v2_mscoco_{split}2014_annotations.json", root, split)


def read_okvqa(root: Path, split: str) -> list[dict]:
    """OK-VQA (okvqa.allenai.org), splits train and val: VQAv2's structure and image naming.

    root/OpenEnded_mscoco_{split}2014_questions.json
    root/mscoco_{split}2014_annotations.json
    root/{split}2014/COCO_{split}2014_{image_id:012d}.jpg
    """
    return _read_coco_vqa("okvqa", "OpenEnded_mscoco_{split}2014_questions.json",
                          "mscoco_{split}2014_annotations.json", root, split)


# -- VizWiz and TextVQA -----------------------------------------------------------------

def read_vizwiz(root: Path, split: str) -> list[dict]:
    """VizWiz-VQA (vizwiz.org), splits train and val.

    root/Annotations/{split}.json
        [{"image": "VizWiz_val_00000000.jpg", "question",
          "answers": [{"answer", "answer_confidence"}, ...], "answer_type", "answerable"}, ...]
    root/{split}/{image}

    id is "vizwiz-" plus the image file's stem; question_id is the image file name;
    `answer` is the most frequent answer (ties: the first to occur).
    """
    path = root / "Annotations" / f"{split}.json"
    items = _expect(_load_json(path), list, path, "top level")
    records = []
    for i, item in enumerate(items):
        image = _field(item, "image", str, path, f"item {i}")
        where = f"item {i} ({image})"
        question = _field(item, "question", str, path, where)
        answers = [
            _field(a, "answer", str, path, f"{where}, answer {j}")
            for j, a in enumerate(_field(item, "answers", list, path, where))
        ]
        if not answers:
            raise ArtifactError(f"{path}: {where} has no answers")
        records.append({
            "id": f"vizwiz-{Path(image).stem}",
            "image": str(root / split / image),
            "split": split,
            "question": question,
            "answers": answers,
            "answer": _most_frequent(answers),
            "question_id": image,
        })
    return _check_unique(records, path)


def read_textvqa(root: Path, split: str) -> list[dict]:
    """TextVQA 0.5.1 (textvqa.org), splits train and val.

    root/TextVQA_0.5.1_{split}.json
        {"dataset_name", "dataset_version",
         "data": [{"question", "image_id", "question_id", "answers": [10 strings],
                   "image_classes", "set_name", ...}, ...]}
    root/train_images/{image_id}.jpg   (val images live in train_images too)

    `answer` is the most frequent answer (ties: the first to occur).
    """
    path = root / f"TextVQA_0.5.1_{split}.json"
    data = _top_list(_load_json(path), "data", path)
    records = []
    for i, item in enumerate(data):
        qid = _field(item, "question_id", _ID, path, f"item {i}")
        where = f"question {qid}"
        image_id = _field(item, "image_id", str, path, where)
        question = _field(item, "question", str, path, where)
        answers = _field(item, "answers", list, path, where)
        for j, a in enumerate(answers):
            _expect(a, str, path, f"{where}, answer {j}")
        if not answers:
            raise ArtifactError(f"{path}: {where} has no answers")
        records.append({
            "id": f"textvqa-{qid}",
            "image": str(root / "train_images" / f"{image_id}.jpg"),
            "split": split,
            "question": question,
            "answers": list(answers),
            "answer": _most_frequent(answers),
            "question_id": qid,
        })
    return _check_unique(records, path)


# -- Karpathy captioning splits ---------------------------------------------------------

def _read_karpathy(name: str, root: Path, split: str, image_path: Callable[[dict, str], str],
                   image_id: Callable[[dict, str], Any]) -> list[dict]:
    path = root / f"dataset_{name}.json"
    images = _top_list(_load_json(path), "images", path)
    wanted = {"train", "restval"} if split == "train" else {split}
    records = []
    for i, item in enumerate(images):
        filename = _field(item, "filename", str, path, f"image {i}")
        where = f"image {i} ({filename})"
        if _field(item, "split", str, path, where) not in wanted:
            continue
        captions = [
            _field(s, "raw", str, path, f"{where}, sentence {j}").strip()
            for j, s in enumerate(_field(item, "sentences", list, path, where))
        ]
        if not captions:
            raise ArtifactError(f"{path}: {where} has no sentences")
        native_id = image_id(item, where)
        records.append({
            "id": f"{name}-{native_id}",
            "image": str(root / image_path(item, where)),
            "split": split,
            "caption": captions[0],
            "captions": captions,
            "image_id": native_id,
        })
    return _check_unique(records, path)


def read_coco(root: Path, split: str) -> list[dict]:
    """COCO captions, Karpathy split; splits train (Karpathy "train" plus "restval"), val, test.

    root/dataset_coco.json
        {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                     "imgid", "split": "train" | "restval" | "val" | "test",
                     "sentences": [{"raw", "tokens", "imgid", "sentid"}, ...],
                     "sentids", "cocoid"}, ...], "dataset": "coco"}
    root/{filepath}/{filename}

    image_id is the cocoid.
    """
    path = root / "dataset_coco.json"
    return _read_karpathy(
        "coco", root, split,
        lambda item, where: str(Path(_field(item, "filepath", str, path, where)) / item["filename"]),
        lambda item, where: _field(item, "cocoid", _ID, path, where),
    )


def read_flickr30k(root: Path, split: str) -> list[dict]:
    """Flickr30k captions, Karpathy split; splits train, val, test.

    root/dataset_flickr30k.json
        {"images": [{"filename": "1000092795.jpg", "imgid", "split": "train" | "val" | "test",
                     "sentences": [{"raw", "tokens", "imgid", "sentid"}, ...],
                     "sentids"}, ...], "dataset": "flickr30k"}
    root/flickr30k-images/{filename}

    image_id is the file name's stem (a string).
    """
    return _read_karpathy(
        "flickr30k", root, split,
        lambda item, where: str(Path("flickr30k-images") / item["filename"]),
        lambda item, where: Path(item["filename"]).stem,
    )


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
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
        where = f"line {lineno}"
        native_id = _field(item, "id", _ID, path, where)
        record = {
            "id": f"hatefulmemes-{native_id}",
            "image": str(root / _field(item, "img", str, path, where)),
            "split": split,
            "text": _field(item, "text", str, path, where),
        }
        if "label" in item:
            label = item["label"]
            if isinstance(label, bool) or label not in (0, 1):
                raise ArtifactError(f"{path}: {where}: label should be 0 or 1, got {label!r}")
            record["label"] = "yes" if label == 1 else "no"
            record["label_id"] = int(label)
        records.append(record)
    return _check_unique(records, path)


# -- ImageNet ---------------------------------------------------------------------------

def _synsets(root: Path) -> dict[str, str]:
    """synset -> class name (the first comma-separated name), in file order."""
    path = Path(root) / "LOC_synset_mapping.txt"
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
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
        rows = list(csv.reader(_read_text(path).splitlines()))
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
        return _check_unique(records, path)

    train = data / "train"
    if not train.is_dir():
        raise ArtifactError(f"{train}: no such directory")
    for folder in sorted(p for p in train.iterdir() if p.is_dir()):
        if folder.name not in synsets:
            raise ArtifactError(f"{folder}: synset {folder.name} is not in LOC_synset_mapping.txt")
        for image in sorted(folder.glob("*.JPEG")):
            records.append(_imagenet_record(image.stem, image, split, folder.name, synsets))
    return _check_unique(records, train)


def _imagenet_record(image_id: str, image: Path, split: str, synset: str, synsets: dict[str, str]) -> dict:
    return {
        "id": f"imagenet-{image_id}",
        "image": str(image),
        "split": split,
        "label": synsets[synset],
        "synset": synset,
    }


# -- registry ---------------------------------------------------------------------------

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vqav2", "vqa", ("train", "val"), read_vqav2,
              "VQAv2 open-ended questions on COCO 2014 images"),
    Benchmark("okvqa", "vqa", ("train", "val"), read_okvqa,
              "OK-VQA outside-knowledge questions on COCO 2014 images"),
    Benchmark("vizwiz", "vqa", ("train", "val"), read_vizwiz,
              "VizWiz-VQA questions from blind photographers"),
    Benchmark("textvqa", "vqa", ("train", "val"), read_textvqa,
              "TextVQA 0.5.1 questions that need reading text in images"),
    Benchmark("coco", "captioning", ("train", "val", "test"), read_coco,
              "COCO captions, Karpathy split (train includes restval)"),
    Benchmark("flickr30k", "captioning", ("train", "val", "test"), read_flickr30k,
              "Flickr30k captions, Karpathy split"),
    Benchmark("hatefulmemes", "hatefulmemes",
              ("train", "dev_seen", "dev_unseen", "test_seen", "test_unseen"), read_hatefulmemes,
              "Hateful Memes binary classification of meme image and text"),
    Benchmark("imagenet", "classification", ("train", "val"), read_imagenet,
              "ImageNet-1k (ILSVRC 2012) in Kaggle's layout"),
)}


def read_benchmark(name: str, root: str | Path, split: str) -> list[dict]:
    """The records of benchmark `name`'s `split`, read from its native files under `root`."""
    bench = BENCHMARKS.get(name)
    if bench is None:
        raise ArtifactError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    if split not in bench.splits:
        raise ArtifactError(f"benchmark {name} has no split {split!r} (splits: {', '.join(bench.splits)})")
    return bench.reader(Path(root), split)


def sample(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded random subset of `n` records, in their input order; all of them when n is
    None or at least len(records)."""
    if n is not None and n < 0:
        raise ArtifactError(f"sample size must be non-negative, got {n}")
    if n is None or n >= len(records):
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), n))
    return [records[i] for i in keep]
