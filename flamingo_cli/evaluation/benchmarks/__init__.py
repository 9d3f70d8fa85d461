"""Readers for standard benchmarks' native annotation files.

Each reader turns a benchmark's files, exactly as they are distributed, into a list of
JSON-able record dicts for one split. Images are never opened or checked: a record's
`image` is `str(Path(root) / <relative path>)`.

Every record has
  id      a string unique in the benchmark and split, prefixed by the benchmark name
  image   the image path (video benchmarks: video, the video path)
  split   the split asked for
and, by task,
  vqa             question, answers (all human answers, in file order), answer (the one
                  shown when the record is a demonstration), question_id (native id),
                  question_type and answer_type where annotated; test splits: question only
  videoqa         question, answer, and label (the one answer, for top-1: MSVD-QA,
                  MSRVTT-QA) or answers (iVQA's five; NExT-QA's one or two, with type,
                  its question type); STAR: candidates (its choices), label
  captioning      (VATEX, YouCook2) as for images; YouCook2's segments add start, end
  captioning      caption (first reference, stripped), captions (all, stripped),
                  image_id (native id)
  hatefulmemes    text, and where the split is labelled: label ("yes"/"no"), label_id (1/0)
  classification  label (class name), synset
  dialogue        (VisDial) caption, history, question, dialogue (the prompt text), candidates,
                  round, image_id; where known label, gt_index; the dense round's relevance

Native layouts under `root` (see each reader's docstring for details):
  vqav2        v2_OpenEnded_mscoco_{split}2014_questions.json, v2_mscoco_{split}2014_annotations.json;
               test-dev, test: v2_OpenEnded_mscoco_{test-dev,test}2015_questions.json, test2015/
  okvqa        OpenEnded_mscoco_{split}2014_questions.json, mscoco_{split}2014_annotations.json
  vizwiz       Annotations/{split}.json
  textvqa      TextVQA_0.5.1_{split}.json
  coco         dataset_coco.json (Karpathy split)
  flickr30k    dataset_flickr30k.json (Karpathy split)
  hatefulmemes {split}.jsonl
  imagenet     LOC_synset_mapping.txt, LOC_val_solution.csv, ILSVRC/Data/CLS-LOC/{train,val}/
  msvdqa       {split}_qa.json, youtube_mapping.txt, YouTubeClips/
  msrvttqa     {split}_qa.json, TrainValVideo/, TestVideo/
  ivqa         {split}.csv, videos/
  nextqa       {split}.csv, add_reference_answer_{split}.json, map_vid_vidorID.json, NExTVideo/
  star         STAR_{split}.json, Charades_v1_480/
  vatex        vatex_{training,validation}_v1.0.json, vatex_public_test_english_v1.1.json, videos/
  youcook2     youcookii_annotations_trainval.json, raw_videos/
  rareact      rareact.csv, videos/
  visdial      visdial_1.0_{split}.json, visdial_1.0_val_dense_annotations.json, VisualDialog_{val,test}2018/,
               train2014/ and val2014/ (or VisualDialog_train2018/)

Anything wrong with the files (missing, malformed, a required field absent) and any
unknown benchmark or split raises ArtifactError with a one-line message.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...formats.artifacts import ArtifactError
from .captioning import read_coco, read_flickr30k, read_vatex, read_youcook2
from .classification import imagenet_classnames, rareact_classnames, read_hatefulmemes, read_imagenet, read_rareact
from .videoqa import read_ivqa, read_msrvttqa, read_msvdqa, read_nextqa, read_star
from .visdial import read_visdial
from .vqa import read_okvqa, read_textvqa, read_vizwiz, read_vqav2

__all__ = ["BENCHMARKS", "TASKS", "Benchmark", "imagenet_classnames", "rareact_classnames", "read_benchmark",
           "sample"]

TASKS = ("vqa", "captioning", "classification", "hatefulmemes", "videoqa", "dialogue")


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    splits: tuple[str, ...]
    reader: Callable[[Path, str], list[dict[str, Any]]]  # (root, split) -> records
    description: str


# -- registry ---------------------------------------------------------------------------

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vqav2", "vqa", ("train", "val", "test-dev", "test"), read_vqav2,
              "VQAv2 open-ended questions on COCO 2014 images"),
    Benchmark("okvqa", "vqa", ("train", "val"), read_okvqa,
              "OK-VQA outside-knowledge questions on COCO 2014 images"),
    Benchmark("vizwiz", "vqa", ("train", "val", "test"), read_vizwiz,
              "VizWiz-VQA questions from blind photographers"),
    Benchmark("textvqa", "vqa", ("train", "val", "test"), read_textvqa,
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
    Benchmark("msvdqa", "videoqa", ("train", "val", "test"), read_msvdqa,
              "MSVD-QA open-ended questions on MSVD clips"),
    Benchmark("msrvttqa", "videoqa", ("train", "val", "test"), read_msrvttqa,
              "MSRVTT-QA open-ended questions on MSR-VTT clips"),
    Benchmark("ivqa", "videoqa", ("train", "val", "test"), read_ivqa,
              "iVQA questions on instructional clips, five answers each"),
    Benchmark("nextqa", "videoqa", ("train", "val", "test"), read_nextqa,
              "NExT-QA open-ended causal, temporal and descriptive questions on VidOR videos"),
    Benchmark("star", "videoqa", ("train", "val", "test"), read_star,
              "STAR situated-reasoning multiple-choice questions on Charades videos"),
    Benchmark("vatex", "captioning", ("train", "val", "test"), read_vatex,
              "VATEX English video captions"),
    Benchmark("youcook2", "captioning", ("train", "val"), read_youcook2,
              "YouCook2 captions of cooking-video segments"),
    Benchmark("rareact", "classification", ("test",), read_rareact,
              "RareAct zero-shot ranking of unusual verb-noun interactions"),
    Benchmark("visdial", "dialogue", ("train", "val", "test"), read_visdial,
              "VisDial v1.0 dialogue rounds, 100 candidate answers each, ranked"),
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
