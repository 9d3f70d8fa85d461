"""The VQA benchmarks: VQAv2, OK-VQA, VizWiz and TextVQA."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ...formats.artifacts import ArtifactError
from .files import ID_TYPES, check_unique, expect, field, load_json, most_frequent, top_list

# -- VQAv2 and OK-VQA -------------------------------------------------------------------

def _read_coco_vqa(name: str, questions_file: str, annotations_file: str, root: Path, split: str) -> list[dict]:
    qpath = root / questions_file.format(split=split)
    apath = root / annotations_file.format(split=split)
    questions = top_list(load_json(qpath), "questions", qpath)
    annotations = top_list(load_json(apath), "annotations", apath)

    by_qid: dict[Any, dict] = {}
    for i, ann in enumerate(annotations):
        qid = field(ann, "question_id", ID_TYPES, apath, f"annotation {i}")
        by_qid[qid] = ann

    records = []
    for i, q in enumerate(questions):
        qid = field(q, "question_id", ID_TYPES, qpath, f"question {i}")
        image_id = field(q, "image_id", int, qpath, f"question {qid}")
        question = field(q, "question", str, qpath, f"question {qid}")
        ann = by_qid.get(qid)
        if ann is None:
            raise ArtifactError(f"{apath}: no annotation for question {qid}")
        where = f"annotation of question {qid}"
        answers = [
            field(a, "answer", str, apath, f"{where}, answer {j}")
            for j, a in enumerate(field(ann, "answers", list, apath, where))
        ]
        if not answers:
            raise ArtifactError(f"{apath}: {where} has no answers")
        answer = field(ann, "multiple_choice_answer", str, apath, where)
        records.append({
            "id": f"{name}-{qid}",
            "image": str(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg"),
            "split": split,
            "question": question,
            "answers": answers,
            "answer": answer,
            "question_id": qid,
        })
    return check_unique(records, qpath)


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
    items = expect(load_json(path), list, path, "top level")
    records = []
    for i, item in enumerate(items):
        image = field(item, "image", str, path, f"item {i}")
        where = f"item {i} ({image})"
        question = field(item, "question", str, path, where)
        answers = [
            field(a, "answer", str, path, f"{where}, answer {j}")
            for j, a in enumerate(field(item, "answers", list, path, where))
        ]
        if not answers:
            raise ArtifactError(f"{path}: {where} has no answers")
        records.append({
            "id": f"vizwiz-{Path(image).stem}",
            "image": str(root / split / image),
            "split": split,
            "question": question,
            "answers": answers,
            "answer": most_frequent(answers),
            "question_id": image,
        })
    return check_unique(records, path)


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
    data = top_list(load_json(path), "data", path)
    records = []
    for i, item in enumerate(data):
        qid = field(item, "question_id", ID_TYPES, path, f"item {i}")
        where = f"question {qid}"
        image_id = field(item, "image_id", str, path, where)
        question = field(item, "question", str, path, where)
        answers = field(item, "answers", list, path, where)
        for j, a in enumerate(answers):
            expect(a, str, path, f"{where}, answer {j}")
        if not answers:
            raise ArtifactError(f"{path}: {where} has no answers")
        records.append({
            "id": f"textvqa-{qid}",
            "image": str(root / "train_images" / f"{image_id}.jpg"),
            "split": split,
            "question": question,
            "answers": list(answers),
            "answer": most_frequent(answers),
            "question_id": qid,
        })
    return check_unique(records, path)
