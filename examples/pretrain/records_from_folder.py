"""Turn a folder of images with captions (X.jpg + X.txt) into training records.

    python records_from_folder.py IMAGES OUT_DIR

writes OUT_DIR/pairs.jsonl (one image-caption pair per image) and OUT_DIR/docs.jsonl
(interleaved documents: consecutive runs of 3 images, each followed by its caption,
like a web page), the record shapes `flamingo encode --wds` turns into training shards.
"""
import json
import os
import sys
from pathlib import Path

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def main(images: str, out: str) -> None:
    folder, out_dir = Path(images), Path(out)
    items = []
    for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES):
        caption = image.with_suffix(".txt")
        if caption.exists():
            items.append((os.path.relpath(image, out_dir), caption.read_text(encoding="utf-8").strip()))
    if not items:
        sys.exit(f"{folder}: no images with .txt captions")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "pairs.jsonl", "w", encoding="utf-8") as f:
        for image, caption in items:
            f.write(json.dumps({"id": Path(image).stem, "image": image, "caption": caption}) + "\n")
    with open(out_dir / "docs.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, len(items) - 2, 3):
            group = items[start:start + 3]
            segments = ["A page of pictures."]
            for i, (_, caption) in enumerate(group):
                segments += [i, f"This picture shows {caption}."]
            f.write(json.dumps({"id": f"doc-{start // 3}", "images": [image for image, _ in group],
                                "segments": segments}) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
