"""The video QA benchmarks: MSVD-QA, MSRVTT-QA, iVQA and NExT-QA (open-ended), STAR (multiple choice).

Videos are not part of these releases (they come from MSVD, MSR-VTT and YouTube): each
reader names where it expects them under `root`, in the layout the video datasets ship in.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ...formats.artifacts import ArtifactError
from .files import ID_TYPES, check_unique, expect, field, load_json, most_frequent, read_text

# -- MSVD-QA and MSRVTT-QA (Xu et al., "Video Question Answering via Gradually Refined
# Attention over Appearance and Motion", ACM MM 2017; github.com/xudejing/video-question-answering)


def _read_xu_qa(name: str, root: Path, split: str, video_path) -> list[dict]:
    path = root / f"{split}_qa.json"
    items = expect(load_json(path), list, path, "top level")
    records = []
    for i, item in enumerate(items):
        qid = field(item, "id", ID_TYPES, path, f"item {i}")
        where = f"question {qid}"
        video_id = field(item, "video_id", int, path, where)
        answer = field(item, "answer", str, path, where)
        records.append({
            "id": f"{name}-{qid}",
            "video": str(video_path(video_id, path)),
            "split": split,
            "question": field(item, "question", str, path, where),
            "answer": answer,
            "label": answer,
            "question_id": qid,
            "video_id": video_id,
        })
    return check_unique(records, path)


def read_msvdqa(root: Path, split: str) -> list[dict]:
    """MSVD-QA, splits train, val and test.

    root/{split}_qa.json
        [{"answer": "man", "id": 0, "question": "who is ...?", "video_id": 1}, ...]
    root/youtube_mapping.txt
        one line per video: "CLIP vidN", CLIP the MSVD clip's name (YouTube id_start_end)
    root/YouTubeClips/{CLIP}.avi   (MSVD's own archive, YouTubeClips.tar)

    The metric is top-1: `label` is the one answer (after the VQA normalisation, see
    evaluation.metrics.exact_match).
    """
    mapping = root / "youtube_mapping.txt"
    clips = {}
    for lineno, line in enumerate(read_text(mapping).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("vid") or not parts[1][3:].isdigit():
            raise ArtifactError(f"{mapping}: line {lineno}: expected 'CLIP vidN', got {line.strip()!r}")
        clips[int(parts[1][3:])] = parts[0]

    def video(video_id: int, path: Path) -> Path:
        if video_id not in clips:
            raise ArtifactError(f"{path}: video_id {video_id} is not in {mapping}")
        return root / "YouTubeClips" / f"{clips[video_id]}.avi"

    return _read_xu_qa("msvdqa", root, split, video)


def read_msrvttqa(root: Path, split: str) -> list[dict]:
    """MSRVTT-QA, splits train, val and test.

    root/{split}_qa.json
        [{"answer": "cooking", "id": 0, "question": "what is ...?", "video_id": 0}, ...]
    root/TrainValVideo/video{N}.mp4   N < 7010 (MSR-VTT's train and val clips)
    root/TestVideo/video{N}.mp4       N >= 7010 (its test clips)

    The metric is top-1, as for MSVD-QA.
    """
    def video(video_id: int, path: Path) -> Path:
        return root / ("TrainValVideo" if video_id < 7010 else "TestVideo") / f"video{video_id}.mp4"

    return _read_xu_qa("msrvttqa", root, split, video)


# -- iVQA (Yang et al., "Just Ask: Learning to Answer Questions from Millions of Narrated
# Videos", ICCV 2021; github.com/antoyang/just-ask)

def read_ivqa(root: Path, split: str) -> list[dict]:
    """iVQA, splits train, val and test.

    root/{split}.csv
        a header, then one row per question, with at least the columns video_id, question,
        answer1 ... answer5 (five annotators' answers; start and end, the clip's bounds in
        seconds, are kept when present)
    root/videos/{video_id}.mp4   (the question's clip, cut to start..end)

    The metric is iVQA accuracy (evaluation.metrics.ivqa_accuracy) over `answers`, all five;
    `answer` is the most frequent (ties: the first).
    """
    path = root / f"{split}.csv"
    rows = list(csv.DictReader(io.StringIO(read_text(path))))
    needed = ["video_id", "question", *(f"answer{i}" for i in range(1, 6))]
    missing = [c for c in needed if rows and c not in rows[0]]
    if missing:
        raise ArtifactError(f"{path}: no column {', '.join(missing)} (expected {', '.join(needed)})")
    records = []
    for i, row in enumerate(rows):
        where = f"row {i + 2}"
        if any(not row[c] for c in needed):
            raise ArtifactError(f"{path}: {where}: empty {', '.join(c for c in needed if not row[c])}")
        answers = [row[f"answer{j}"] for j in range(1, 6)]
        record = {
            "id": f"ivqa-{split}-{i}",
            "video": str(root / "videos" / f"{row['video_id']}.mp4"),
            "split": split,
            "question": row["question"],
            "answers": answers,
            "answer": most_frequent(answers),
            "video_id": row["video_id"],
        }
        for bound in ("start", "end"):
            if row.get(bound):
                try:
                    record[bound] = float(row[bound])
                except ValueError:
                    raise ArtifactError(f"{path}: {where}: {bound} should be a number, got {row[bound]!r}") from None
        records.append(record)
    return check_unique(records, path)


# -- NExT-QA open-ended (Xiao et al., "NExT-QA: Next Phase of Question-Answering to Explaining
# Temporal Actions", CVPR 2021; github.com/doc-doc/NExT-OE, dataset/nextqa/)

NEXTQA_COLUMNS = ("video", "question", "answer", "qid", "type")


def read_nextqa(root: Path, split: str) -> list[dict]:
    """NExT-QA's open-ended questions (NExT-OE), splits train, val and test.

    root/{split}.csv
        video,frame_count,width,height,question,answer,qid,type   (a header, then one row per
        question; type is CW/CH causal, TN/TP/TC temporal, DB/DC/DL/DO descriptive)
    root/add_reference_answer_{split}.json   (optional; val and test)
        {"VIDEO": {"QID": "a second annotator's answer", ...}, ...}
    root/map_vid_vidorID.json
        {"VIDEO": "FOLDER/VIDORID", ...}   (NExT-QA's map from its ids to VidOR's video files)
    root/NExTVideo/{FOLDER/VIDORID}.mp4

    The metric is WUPS (evaluation.wups) over `answers`: the answer, then the second reference
    where the file has one; `type` picks WUPS or exact match (DB, DC).
    """
    path = root / f"{split}.csv"
    rows = list(csv.DictReader(io.StringIO(read_text(path))))
    missing = [c for c in NEXTQA_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ArtifactError(f"{path}: no column {', '.join(missing)} (expected {', '.join(NEXTQA_COLUMNS)})")
    extra_path = root / f"add_reference_answer_{split}.json"
    extra = expect(load_json(extra_path), dict, extra_path, "top level") if extra_path.exists() else {}
    mapping_path = root / "map_vid_vidorID.json"
    mapping = expect(load_json(mapping_path), dict, mapping_path, "top level")
    records = []
    for i, row in enumerate(rows):
        where = f"row {i + 2}"
        if any(not row[c] for c in NEXTQA_COLUMNS):
            raise ArtifactError(f"{path}: {where}: empty {', '.join(c for c in NEXTQA_COLUMNS if not row[c])}")
        video, qid = row["video"], row["qid"]
        if video not in mapping:
            raise ArtifactError(f"{path}: {where}: video {video} is not in {mapping_path}")
        answers = [row["answer"]]
        second = expect(extra.get(video, {}), dict, extra_path, f"video {video}").get(qid)
        if second is not None and expect(second, str, extra_path, f"video {video} question {qid}").strip():
            answers.append(second)
        records.append({
            "id": f"nextqa-{video}-{qid}",
            "video": str(root / "NExTVideo" / f"{field(mapping, video, str, mapping_path, 'top level')}.mp4"),
            "split": split,
            "question": row["question"],
            "answer": row["answer"],
            "answers": answers,
            "type": row["type"],
            "question_id": qid,
            "video_id": video,
        })
    return check_unique(records, path)


# -- STAR (Wu et al., "STAR: A Benchmark for Situated Reasoning in Real-World Videos",
# NeurIPS 2021 Datasets and Benchmarks; bobbywu.com/STAR)

def read_star(root: Path, split: str) -> list[dict]:
    """STAR multiple-choice questions, splits train, val and test.

    root/STAR_{split}.json
        [{"question_id": "Interaction_T1_13", "question", "video_id": "6H78U", "start", "end",
          "answer": "The closet/cabinet.",
          "choices": [{"choice_id": 0, "choice": "The closet/cabinet."}, ...], ...}, ...]
        (the test split has no "answer")
    root/Charades_v1_480/{video_id}.mp4   (Charades, whose videos STAR's situations come from)

    Close-ended: `candidates` are the four choices, in choice_id order, and `score` ranks them;
    the metric is top-1 over `label`, the answer. start and end (seconds) bound the situation.
    """
    path = root / f"STAR_{split}.json"
    items = expect(load_json(path), list, path, "top level")
    records = []
    for i, item in enumerate(items):
        qid = field(item, "question_id", ID_TYPES, path, f"item {i}")
        where = f"question {qid}"
        choices = sorted(field(item, "choices", list, path, where),
                         key=lambda c: field(c, "choice_id", int, path, f"{where}, a choice"))
        candidates = [field(c, "choice", str, path, f"{where}, choice {c['choice_id']}") for c in choices]
        if len(candidates) < 2:
            raise ArtifactError(f"{path}: {where} has {len(candidates)} choice(s), expected several")
        video_id = field(item, "video_id", str, path, where)
        record = {
            "id": f"star-{qid}",
            "video": str(root / "Charades_v1_480" / f"{video_id}.mp4"),
            "split": split,
            "question": field(item, "question", str, path, where),
            "candidates": candidates,
            "question_id": qid,
            "video_id": video_id,
            "start": float(field(item, "start", (int, float), path, where)),
            "end": float(field(item, "end", (int, float), path, where)),
        }
        if "answer" in item:
            answer = field(item, "answer", str, path, where)
            if answer not in candidates:
                raise ArtifactError(f"{path}: {where}: the answer {answer!r} is not one of its choices")
            record.update(answer=answer, label=answer)
        records.append(record)
    return check_unique(records, path)
