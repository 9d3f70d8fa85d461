"""The VQA benchmarks: VQAv2, OK-VQA, VizWiz and TextVQA.

The test splits (VQAv2 test-dev and test, VizWiz test, TextVQA test) have no public answers: their
records carry the question alone, and their answers go to the benchmark's evaluation server
(evaluation/servers.py writes the file it takes). Every other split must have answers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...formats.artifacts import ArtifactError
from .files import ID_TYPES, check_unique, expect, field, load_json, most_frequent, optional, top_list

# Splits whose answers only the evaluation servers hold.
UNANSWERED_SPLITS = ("test-dev", "test")

# -- VQAv2 and OK-VQA -------------------------------------------------------------------

# split -> (the subtype naming its question and annotation files, the image folder). test-dev's
# images are a subset of test2015's and live with them.
COCO_SPLITS = {"train": ("train2014", "train2014"), "val": ("val2014", "val2014"),
               "test-dev": ("test-dev2015", "test2015"), "test": ("test2015", "test2015")}


def _coco_references(ann: dict, apath: Path, qid: Any) -> tuple[dict, dict]:
    """(answers and answer, the question's types where the annotation has them) of one annotation."""
    where = f"annotation of question {qid}"
    answers = [
        field(a, "answer", str, apath, f"{where}, answer {j}")
        for j, a in enumerate(field(ann, "answers", list, apath, where))
    ]
    if not answers:
        raise ArtifactError(f"{apath}: {where} has no answers")
    references = {"answers": answers, "answer": field(ann, "multiple_choice_answer", str, apath, where)}
    types = {key: value for key in ("question_type", "answer_type")
             if (value := optional(ann, key, str, apath, where)) is not None}
    return references, types


def _read_coco_vqa(name: str, questions_file: str, annotations_file: str, root: Path, split: str) -> list[dict]:
    subtype, images = COCO_SPLITS[split]
    qpath = root / questions_file.format(subtype=subtype)
    questions = top_list(load_json(qpath), "questions", qpath)
    by_qid: dict[Any, dict] | None = None
    if split not in UNANSWERED_SPLITS:
        apath = root / annotations_file.format(subtype=subtype)
        by_qid = {}
        for i, ann in enumerate(top_list(load_json(apath), "annotations", apath)):
            by_qid[field(ann, "question_id", ID_TYPES, apath, f"annotation {i}")] = ann

    records = []
    for i, q in enumerate(questions):
        qid = field(q, "question_id", ID_TYPES, qpath, f"question {i}")
        image_id = field(q, "image_id", int, qpath, f"question {qid}")
        references, types = {}, {}
        if by_qid is not None:
            if qid not in by_qid:
                raise ArtifactError(f"{apath}: no annotation for question {qid}")
            references, types = _coco_references(by_qid[qid], apath, qid)
        records.append({
            "id": f"{name}-{qid}",
            "image": str(root / images / f"COCO_{images}_{image_id:012d}.jpg"),
            "split": split,
            "question": field(q, "question", str, qpath, f"question {qid}"),
            **references,
            "question_id": qid,
            **types,
        })
    return check_unique(records, qpath)


def read_vqav2(root: Path, split: str) -> list[dict]:
    """VQAv2 (visualqa.org), splits train, val, test-dev and test (test-standard: all of test2015).

    root/v2_OpenEnded_mscoco_{subtype}_questions.json
        subtype train2014, val2014, test-dev2015, test2015
        {"questions": [{"image_id", "question", "question_id"}, ...], ...}
    root/v2_mscoco_{subtype}_annotations.json   (train and val only)
        {"annotations": [{"question_id", "image_id", "multiple_choice_answer",
                          "answers": [{"answer", "answer_confidence", "answer_id"}, ...],
                          "question_type", "answer_type"}, ...], ...}
    root/train2014/COCO_train2014_{image_id:012d}.jpg, val2014/..., test2015/COCO_test2015_...jpg
        (test-dev's images are among test2015's)

    Questions and annotations are joined by question_id, in the questions file's order;
    `answer` is the annotation's multiple_choice_answer; question_type and answer_type ("yes/no",
    "number", "other") are kept for the evaluator's per-type accuracies. Test records have no
    answers.
    """
    return _read_coco_vqa("vqav2", "v2_OpenEnded_mscoco_{subtype}_questions.json",
                          "v2_mscoco_{subtype}_annotations.json", root, split)


def read_okvqa(root: Path, split: str) -> list[dict]:
    """OK-VQA (okvqa.allenai.org), splits train and val: VQAv2's structure and image naming.

    root/OpenEnded_mscoco_{split}2014_questions.json
    root/mscoco_{split}2014_annotations.json   (v1.1's answers are stemmed: see evaluation/okvqa.py)
    root/{split}2014/COCO_{split}2014_{image_id:012d}.jpg

    question_type is OK-VQA's knowledge category, answer_type its annotations' ("other").
    """
    return _read_coco_vqa("okvqa", "OpenEnded_mscoco_{subtype}_questions.json",
                          "mscoco_{subtype}_annotations.json", root, split)


# -- VizWiz and TextVQA -----------------------------------------------------------------

def read_vizwiz(root: Path, split: str) -> list[dict]:
    """VizWiz-VQA (vizwiz.org), splits train, val and test.

    root/Annotations/{split}.json
        [{"image": "VizWiz_val_00000000.jpg", "question",
          "answers": [{"answer", "answer_confidence"}, ...], "answer_type", "answerable"}, ...]
        (test: {"image", "question"} only)
    root/{split}/{image}

    id is "vizwiz-" plus the image file's stem; question_id is the image file name (what the
    evaluation server names a result by); `answer` is the most frequent answer (ties: the first to
    occur); answer_type ("yes/no", "number", "other", "unanswerable") is kept where given.
    """
    path = root / "Annotations" / f"{split}.json"
    items = expect(load_json(path), list, path, "top level")
    records = []
    for i, item in enumerate(items):
        image = field(item, "image", str, path, f"item {i}")
        where = f"item {i} ({image})"
        record = {
            "id": f"vizwiz-{Path(image).stem}",
            "image": str(root / split / image),
            "split": split,
            "question": field(item, "question", str, path, where),
        }
        if split not in UNANSWERED_SPLITS:
            answers = [
                field(a, "answer", str, path, f"{where}, answer {j}")
                for j, a in enumerate(field(item, "answers", list, path, where))
            ]
            if not answers:
                raise ArtifactError(f"{path}: {where} has no answers")
            record.update(answers=answers, answer=most_frequent(answers))
        record["question_id"] = image
        if (answer_type := optional(item, "answer_type", str, path, where)) is not None:
            record["answer_type"] = answer_type
        records.append(record)
    return check_unique(records, path)


def read_textvqa(root: Path, split: str) -> list[dict]:
    """TextVQA 0.5.1 (textvqa.org), splits train, val and test.

    root/TextVQA_0.5.1_{split}.json
        {"dataset_name", "dataset_version",
         "data": [{"question", "image_id", "question_id", "answers": [10 strings],
                   "image_classes", "set_name", ...}, ...]}   (test: no answers)
    root/train_images/{image_id}.jpg   (val images live in train_images too)
    root/test_images/{image_id}.jpg

    `answer` is the most frequent answer (ties: the first to occur).
    """
    path = root / f"TextVQA_0.5.1_{split}.json"
    data = top_list(load_json(path), "data", path)
    images = "test_images" if split == "test" else "train_images"
    records = []
    for i, item in enumerate(data):
        qid = field(item, "question_id", ID_TYPES, path, f"item {i}")
        where = f"question {qid}"
        image_id = field(item, "image_id", str, path, where)
        record = {
            "id": f"textvqa-{qid}",
            "image": str(root / images / f"{image_id}.jpg"),
            "split": split,
            "question": field(item, "question", str, path, where),
        }
        if split not in UNANSWERED_SPLITS:
            answers = field(item, "answers", list, path, where)
            for j, a in enumerate(answers):
                expect(a, str, path, f"{where}, answer {j}")
            if not answers:
                raise ArtifactError(f"{path}: {where} has no answers")
            record.update(answers=list(answers), answer=most_frequent(answers))
        record["question_id"] = qid
        records.append(record)
    return check_unique(records, path)
