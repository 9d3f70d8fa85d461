"""The captioning benchmarks: COCO and Flickr30K in Karpathy's splits."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...formats.artifacts import ArtifactError
from .files import ID_TYPES, check_unique, field, load_json, top_list

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
