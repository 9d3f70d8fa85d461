"""Write the toy world's training data, in the formats the flamingo stages read.

    python make_data.py OUT_DIR [--pairs N] [--docs N] [--videos N]

OUT_DIR/tokenizer/      the world's tokenizer (save_pretrained), for the LM and the text tower
OUT_DIR/images/         one PNG per training image
OUT_DIR/pairs.jsonl     {"id", "image", "caption"}: Flamingo's image-caption pairs
OUT_DIR/contrastive.jsonl
                        the same images for `flamingo contrastive`, captions saying where the
                        shape is ("a red circle at the top left")
OUT_DIR/docs.jsonl      {"id", "images", "segments"}: interleaved few-shot documents
OUT_DIR/videos/         one MP4 per training clip (10 s at 3 FPS)
OUT_DIR/vtp.jsonl       {"id", "video", "caption"}: video-text pairs, the text a caption or the
                        clip's question and answer

Only training colour-shape combinations and training label words appear. Seeds here are
the training seeds; evaluate.py draws from seeds of its own.

    python make_data.py --demo DIR

writes the demo's few held-out images (DIR/images/) and its support set (DIR/shots.jsonl
with DIR/shots/), the files `make demo` runs on.
"""
import argparse
import json
import multiprocessing
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world  # noqa: E402

TRAIN_SEED = 0


def write_image(item: world.Item, path: Path, records_dir: Path) -> str:
    """Save the image; its path as a record in records_dir names it (relative to that file)."""
    item.image().save(path)
    return os.path.relpath(path, records_dir)


def write_clip(args: tuple) -> None:
    clip, path = args
    clip.write(path)


def training_data(out: Path, pairs: int, docs: int, videos: int) -> None:
    world.build_tokenizer().save_pretrained(out / "tokenizer")
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(TRAIN_SEED)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f, \
            open(out / "contrastive.jsonl", "w", encoding="utf-8") as located:
        for i in range(pairs):
            item = world.random_item(rng)
            path = write_image(item, images / f"pair-{i:06d}.png", out)
            f.write(json.dumps({"id": f"pair-{i:06d}", "image": path, "caption": item.caption}) + "\n")
            located.write(json.dumps({"id": f"pair-{i:06d}", "image": path, "caption": item.located_caption}) + "\n")
    with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
        for i in range(docs):
            items, segments = world.document(rng)
            paths = [write_image(it, images / f"doc-{i:06d}-{j}.png", out) for j, it in enumerate(items)]
            f.write(json.dumps({"id": f"doc-{i:06d}", "images": paths, "segments": segments}) + "\n")
    # Clips from a seed of their own, so --videos leaves the images and documents as they were.
    rng = random.Random(TRAIN_SEED + 1)
    (out / "videos").mkdir(exist_ok=True)
    clips = [world.random_clip(rng) for _ in range(videos)]
    paths = [out / "videos" / f"clip-{i:06d}.mp4" for i in range(videos)]
    with multiprocessing.Pool(min(4, os.cpu_count() or 1)) as pool:
        pool.map(write_clip, zip(clips, paths), chunksize=16)
    with open(out / "vtp.jsonl", "w", encoding="utf-8") as f:
        for i, (clip, path) in enumerate(zip(clips, paths)):
            f.write(json.dumps({"id": f"clip-{i:06d}", "video": os.path.relpath(path, out),
                                "caption": world.clip_text(rng, clip)}) + "\n")


# The demo's video question: one held-out clip, and four shots of the same question.
DEMO_VIDEO_TASK = "direction"


def demo_files(out: Path) -> None:
    """Eight held-out images (three of them combinations never seen in training) and a support
    set of sixteen training-distribution images with captions, colours and shapes; one held-out
    clip (videos/) and four clips of the same question as its shots (video_shots.jsonl)."""
    rng = random.Random(777)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "shots").mkdir(parents=True, exist_ok=True)
    queries = [world.random_item(rng) for _ in range(5)] + [world.random_item(rng, world.TEST_COMBOS) for _ in range(3)]
    for item in queries:
        write_image(item, out / "images" / f"{item.colour}-{item.shape}.png", out)
    with open(out / "shots.jsonl", "w", encoding="utf-8") as f:
        for i in range(16):
            item = world.random_item(rng)
            path = write_image(item, out / "shots" / f"shot-{i:02d}.png", out)
            f.write(json.dumps({"id": f"shot-{i:02d}", "image": path, "caption": item.caption,
                                "colour": item.colour, "shape": item.shape}) + "\n")
    rng = random.Random(778)
    clips = []
    while len(clips) < 5:
        clip = world.random_clip(rng)
        if clip.task == DEMO_VIDEO_TASK:
            clips.append(clip)
    (out / "videos").mkdir(exist_ok=True)
    (out / "video_shots").mkdir(exist_ok=True)
    query = clips[0]
    query.write(out / "videos" / f"{query.colour}-{query.shape}-{query.caption.split()[-2]}-{query.answer(query.task)}.mp4")
    with open(out / "video_shots.jsonl", "w", encoding="utf-8") as f:
        for i, clip in enumerate(clips[1:]):
            path = out / "video_shots" / f"clip-{i}.mp4"
            clip.write(path)
            f.write(json.dumps({"id": f"clip-{i}", "video": os.path.relpath(path, out),
                                DEMO_VIDEO_TASK: clip.answer(DEMO_VIDEO_TASK)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--pairs", type=int, default=12000)
    parser.add_argument("--docs", type=int, default=8000)
    parser.add_argument("--videos", type=int, default=4000)
    parser.add_argument("--demo", action="store_true", help="write the demo's images and shots instead")
    args = parser.parse_args()
    if args.demo:
        demo_files(Path(args.out))
    else:
        training_data(Path(args.out), args.pairs, args.docs, args.videos)


if __name__ == "__main__":
    main()
