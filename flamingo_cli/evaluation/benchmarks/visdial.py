"""VisDial v1.0 (Das et al., "Visual Dialog", CVPR 2017; visualdialog.org/data): each round of a
dialogue about an image, its candidate answers ranked by likelihood (close-ended, `score`).

The dialogue so far is the round's context: the caption, then every earlier round with its
ground-truth answer (the paper's protocol), as one `dialogue` text that prompt templates use
whole (evaluation.dialogue renders it, as `flamingo chat` renders its history).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...formats.artifacts import ArtifactError
from ..dialogue import Round, dialogue_text
from .files import check_unique, expect, field, load_json, read_text

DENSE = "visdial_1.0_val_dense_annotations.json"
ROUNDS = ("dense", "all")
# The train split is COCO's train2014 and val2014 images, and its files do not say which folder
# holds an image: the first folder whose listing has the name wins. VisualDialog_train2018/ is
# the layout LAVIS and others re-publish (all train images in one folder).
TRAIN_IMAGES = (("VisualDialog_train2018", "VisualDialog_train2018_{:012d}.jpg"),
                ("train2014", "COCO_train2014_{:012d}.jpg"),
                ("val2014", "COCO_val2014_{:012d}.jpg"))
SPLIT_IMAGES = {"val": ("VisualDialog_val2018", "VisualDialog_val2018_{:012d}.jpg"),
                "test": ("VisualDialog_test2018", "VisualDialog_test2018_{:012d}.jpg")}


def read_visdial(root: Path, split: str, *, rounds: str = "dense") -> list[dict]:
    """VisDial v1.0, splits train, val and test: one record per (dialogue, round) that has answer
    options.

    root/visdial_1.0_{split}.json
        {"version": "1.0", "split", "data": {"questions": [str], "answers": [str],
         "dialogs": [{"image_id", "caption",
                      "dialog": [{"question": i, "answer": j, "answer_options": [100 answer indices],
                                  "gt_index": index of the answer among the options}, ... 10 rounds]}]}}
        (test: each dialogue stops at a random round, the only one with answer_options; it has no
        answer and no gt_index. Earlier test rounds have no answer_options and give no record.)
    root/visdial_1.0_val_dense_annotations.json   (val)
        [{"image_id", "round_id": 1-based, "gt_relevance": [one relevance in 0..1 per option]}]
        (one densely annotated round per val dialogue: NDCG's rounds)
    root/VisualDialog_val2018/VisualDialog_val2018_{image_id:012d}.jpg
    root/VisualDialog_test2018/VisualDialog_test2018_{image_id:012d}.jpg
    root/train2014/COCO_train2014_{image_id:012d}.jpg, root/val2014/COCO_val2014_{image_id:012d}.jpg
        (train; or all of them in root/VisualDialog_train2018/VisualDialog_train2018_{image_id:012d}.jpg;
        the folders are listed to find each image, and one found in none is an error)

    Records: id "visdial-{image_id}-{round}", image, split, caption, history (the earlier rounds,
    [{"question", "answer"}], ground truth), question, dialogue (caption and history and question
    as text ending "Answer:"), candidates (the round's answer options, in order), round (1-based),
    image_id; where known, label (the answer) and gt_index (its position in candidates); the
    densely annotated round adds relevance (one per candidate).

    val: rounds="dense" (the default) keeps each dialogue's densely annotated round, one record
    per dialogue as in test (2,064 records; NDCG is over these, and so are MRR and R@k, as on the
    test server); rounds="all" keeps all ten (20,640; the val leaderboard's MRR and R@k are over
    these), the dense one still carrying its relevance. Other splits keep every round: train's
    1.23M records take a few GB of memory to read, whatever `sample` then keeps.
    """
    if rounds not in ROUNDS:
        raise ArtifactError(f"visdial: rounds must be one of {', '.join(ROUNDS)}, got {rounds!r}")
    path = root / f"visdial_1.0_{split}.json"
    data = field(_load_shared_ints(path), "data", dict, path, "top-level object")
    file = _Dialogues(path, _strings(data, "questions", path), _strings(data, "answers", path))
    only_dense = split == "val" and rounds == "dense"
    dense = _read_dense(root / DENSE) if only_dense or (split == "val" and (root / DENSE).exists()) else {}
    image = _train_images(root) if split == "train" else _split_images(root, split)
    records: list[dict] = []
    seen: set[int] = set()
    for i, dialog in enumerate(field(data, "dialogs", list, path, "'data'")):
        image_id = field(dialog, "image_id", int, path, f"dialogue {i}")
        if image_id in seen:
            raise ArtifactError(f"{path}: image {image_id} has two dialogues")
        seen.add(image_id)
        if only_dense and image_id not in dense:
            raise ArtifactError(f"{root / DENSE}: dialogue {image_id} of {path} has no densely annotated round")
        records += file.records(dialog, image_id, {"image": image(image_id), "split": split},
                                dense.get(image_id), only_dense)
    if set(dense) - seen:
        raise ArtifactError(f"{root / DENSE}: image {min(set(dense) - seen)} has no dialogue in {path}")
    return check_unique(records, path)


def _load_shared_ints(path: Path) -> Any:
    """files.load_json, each distinct integer parsed as one object: train's 123M answer-option
    indices take about 4 GB as separate ints, and next to nothing shared."""
    ints: dict[str, int] = {}
    try:
        return json.loads(read_text(path), parse_int=lambda text: ints.setdefault(text, int(text)))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})") from None


def _strings(data: dict, key: str, path: Path) -> list[str]:
    items = field(data, key, list, path, "'data'")
    for j, item in enumerate(items):
        expect(item, str, path, f"{key}[{j}]")
    return items


@dataclass(frozen=True)
class _Dialogues:
    """A split's file: dialogues whose questions and answers are indices into its two lists."""
    path: Path
    questions: list[str]
    answers: list[str]

    def lookup(self, index: Any, table: list[str], where: str, what: str) -> str:
        expect(index, int, self.path, f"{where} {what}")
        if not 0 <= index < len(table):
            raise ArtifactError(f"{self.path}: {where}: {what} {index} is out of range (0..{len(table) - 1})")
        return table[index]

    def records(self, dialog: dict, image_id: int, base: dict[str, str], dense: tuple[int, list[float]] | None,
                only_dense: bool) -> list[dict]:
        """The records of one dialogue's rounds (only_dense: of its densely annotated one); `base`
        holds its image and split, `dense` its densely annotated round (round_id, relevances)."""
        path, where = self.path, f"dialogue {image_id}"
        caption = field(dialog, "caption", str, path, where)
        turns = field(dialog, "dialog", list, path, where)
        if dense is not None and not 1 <= dense[0] <= len(turns):
            raise ArtifactError(f"{path.parent / DENSE}: image {image_id}: round_id {dense[0]} is not one of its "
                                f"{len(turns)} rounds")
        # Each earlier round's {"question", "answer"} is the same object in every later round's
        # history: a dialogue's ten records share them.
        history: list[dict[str, str]] = []
        records = []
        for number, turn in enumerate(turns, start=1):
            at = f"{where}, round {number}"
            question = self.lookup(field(turn, "question", int, path, at), self.questions, at, "question")
            answer = self.lookup(turn["answer"], self.answers, at, "answer") if "answer" in turn else None
            is_dense = dense is not None and dense[0] == number
            if "answer_options" in turn and (is_dense or not only_dense):
                record = {"id": f"visdial-{image_id}-{number}", **base, "caption": caption, "history": history[:],
                          "question": question, "dialogue": self.dialogue(question, history, caption, at),
                          **self.options(turn, answer, at), "round": number, "image_id": image_id}
                if is_dense:
                    if len(dense[1]) != len(record["candidates"]):
                        raise ArtifactError(f"{path.parent / DENSE}: image {image_id}: {len(dense[1])} relevances "
                                            f"for the {len(record['candidates'])} answer options of round {number}")
                    record["relevance"] = dense[1]
                records.append(record)
            elif is_dense and "answer_options" not in turn:
                raise ArtifactError(f"{path}: {at} is densely annotated but has no answer_options")
            if answer is None:
                if number != len(turns):
                    raise ArtifactError(f"{path}: {at} has no answer, yet later rounds follow it")
                break
            history.append({"question": question, "answer": answer})
        return records

    def options(self, turn: dict, answer: str | None, at: str) -> dict[str, Any]:
        """candidates, and where the round is answered, label and gt_index."""
        options = field(turn, "answer_options", list, self.path, at)
        if not options:
            raise ArtifactError(f"{self.path}: {at} has no answer options")
        candidates = [self.lookup(o, self.answers, at, "answer option") for o in options]
        if answer is None:
            return {"candidates": candidates}
        gt_index = field(turn, "gt_index", int, self.path, at)
        if not 0 <= gt_index < len(candidates):
            raise ArtifactError(f"{self.path}: {at}: gt_index {gt_index} is out of range (0..{len(candidates) - 1})")
        if candidates[gt_index] != answer:
            raise ArtifactError(f"{self.path}: {at}: gt_index {gt_index} is option {candidates[gt_index]!r}, "
                                f"not the answer {answer!r}")
        return {"candidates": candidates, "label": answer, "gt_index": gt_index}

    def dialogue(self, question: str, history: list[dict[str, str]], caption: str, at: str) -> str:
        try:
            return dialogue_text(question, [Round(h["question"], h["answer"]) for h in history], caption)
        except ArtifactError as e:
            raise ArtifactError(f"{self.path}: {at}: {e}") from None


def _read_dense(path: Path) -> dict[int, tuple[int, list[float]]]:
    """image_id -> (round_id, relevances) from the dense annotations."""
    items = expect(load_json(path), list, path, "top level")
    dense = {}
    for j, item in enumerate(items):
        image_id = field(item, "image_id", int, path, f"item {j}")
        where = f"image {image_id}"
        if image_id in dense:
            raise ArtifactError(f"{path}: {where} is annotated twice")
        relevance = field(item, "gt_relevance", list, path, where)
        for value in relevance:
            expect(value, (int, float), path, f"{where} relevance")
            if not math.isfinite(value) or value < 0:
                raise ArtifactError(f"{path}: {where}: relevance {value} is not a non-negative number")
        dense[image_id] = (field(item, "round_id", int, path, where), [float(v) for v in relevance])
    return dense


def _split_images(root: Path, split: str):
    folder, name = SPLIT_IMAGES[split]
    return lambda image_id: str(root / folder / name.format(image_id))


def _train_images(root: Path):
    listed = [(folder, name, _listing(root / folder)) for folder, name in TRAIN_IMAGES]
    folders = ", ".join(f"{folder}/" for folder, _ in TRAIN_IMAGES)
    if not any(names for _, _, names in listed):
        raise ArtifactError(f"{root}: no VisDial train images (expected COCO's train2014/ and val2014/, or "
                            "VisualDialog_train2018/)")

    def image(image_id: int) -> str:
        for folder, name, names in listed:
            if name.format(image_id) in names:
                return str(root / folder / name.format(image_id))
        raise ArtifactError(f"{root}: the image of train dialogue {image_id} is in none of {folders}")

    return image


def _listing(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return set()
    except OSError as e:
        raise ArtifactError(f"{folder}: {e.strerror}") from None
