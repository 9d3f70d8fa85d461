"""The captioning benchmarks: COCO and Flickr30K in Karpathy's splits, and for video VATEX
and YouCook2."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...formats.artifacts import ArtifactError
from .files import ID_TYPES, check_unique, expect, field, load_json, top_list

# -- Karpathy captioning splits ---------------------------------------------------------

def _read_karpathy(name: str, root: Path, split: str, image_path: Callable[[dict, str], str],
                   image_id: Callable[[dict, str], Any]) -> list[dict]:
    path = root / f"dataset_{name}.json"
    images = top_list(load_json(path), "images", path)
    wanted = {"train", "restval"} if split == "train" else {split}
    records = []
    for i, item in enumerate(images):
        filename = field(item, "filename", str, path, f"image {i}")
        where = f"image {i} ({filename})"
        if field(item, "split", str, path, where) not in wanted:
            continue
        captions = [
            field(s, "raw", str, path, f"{where}, sentence {j}").strip()
            for j, s in enumerate(field(item, "sentences", list, path, where))
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
    return check_unique(records, path)


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
        lambda item, where: str(Path(field(item, "filepath", str, path, where)) / item["filename"]),
        lambda item, where: field(item, "cocoid", ID_TYPES, path, where),
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


# -- video captioning -------------------------------------------------------------------

def read_vatex(root: Path, split: str) -> list[dict]:
    """VATEX English captions (Wang et al., ICCV 2019; eric-xw.github.io/vatex-website), splits
    train, val and test (the public test set).

    root/vatex_training_v1.0.json, vatex_validation_v1.0.json, vatex_public_test_english_v1.1.json
        [{"videoID": "Ptf_2VRj-V0_000122_000132", "enCap": [10 English captions],
          "chCap": [...]}, ...]
        (videoID is the YouTube id, then the clip's start and end second)
    root/videos/{videoID}.mp4

    The metric is CIDEr-D over `captions` (enCap, stripped); `caption` is the first.
    """
    files = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json",
             "test": "vatex_public_test_english_v1.1.json"}
    path = root / files[split]
    items = expect(load_json(path), list, path, "top level")
    records = []
    for i, item in enumerate(items):
        video_id = field(item, "videoID", str, path, f"item {i}")
        where = f"video {video_id}"
        captions = [expect(c, str, path, f"{where}, caption {j}").strip()
                    for j, c in enumerate(field(item, "enCap", list, path, where))]
        if not captions:
            raise ArtifactError(f"{path}: {where} has no English captions")
        records.append({"id": f"vatex-{video_id}", "video": str(root / "videos" / f"{video_id}.mp4"),
                        "split": split, "caption": captions[0], "captions": captions, "video_id": video_id})
    return check_unique(records, path)


YOUCOOK2_CONTAINERS = (".mp4", ".mkv", ".webm")


def read_youcook2(root: Path, split: str) -> list[dict]:
    """YouCook2 segment captions (Zhou et al., AAAI 2018; youcook2.eecs.umich.edu), splits train
    and val (its test annotations are not public).

    root/youcookii_annotations_trainval.json
        {"database": {"GLGh_mDyWNI": {"subset": "training" | "validation", "recipe_type": "113",
                      "duration", "video_url",
                      "annotations": [{"id": 0, "segment": [90, 102], "sentence"}, ...]}, ...}}
    root/raw_videos/{training,validation}/{recipe_type}/{video_id}.{mp4,mkv,webm}
        (the dataset's download script keeps whichever container youtube-dl fetched; the first
        that exists, else .mp4)

    One record per annotated segment (start and end in seconds, which bound the clip), with its
    one sentence as `caption` and `captions`; the metric is CIDEr-D.
    """
    path = root / "youcookii_annotations_trainval.json"
    database = field(load_json(path), "database", dict, path, "top-level object")
    subset = {"train": "training", "val": "validation"}[split]
    records = []
    for video_id, video in database.items():
        where = f"video {video_id}"
        if field(video, "subset", str, path, where) != subset:
            continue
        recipe = field(video, "recipe_type", str, path, where)
        stem = root / "raw_videos" / subset / recipe / video_id
        file = next((f for f in (stem.with_suffix(s) for s in YOUCOOK2_CONTAINERS) if f.exists()),
                    stem.with_suffix(YOUCOOK2_CONTAINERS[0]))
        for j, segment in enumerate(field(video, "annotations", list, path, where)):
            at = f"{where}, annotation {j}"
            bounds = field(segment, "segment", list, path, at)
            if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
                raise ArtifactError(f"{path}: {at}: segment should be [start, end] in seconds, got {bounds!r}")
            sentence = field(segment, "sentence", str, path, at).strip()
            records.append({
                "id": f"youcook2-{video_id}-{field(segment, 'id', int, path, at)}",
                "video": str(file),
                "split": split, "caption": sentence, "captions": [sentence], "video_id": video_id,
                "start": float(bounds[0]), "end": float(bounds[1]),
            })
    return check_unique(records, path)
