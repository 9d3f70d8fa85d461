"""Golden draws from OpenFlamingo 2.0.1's own evaluation code, for tests/evaluation/test_openflamingo_protocol.py.

Runs in the separate virtual environment of tests/golden/README.md, plus the packages its
evaluate.py imports (scikit-learn, pycocoevalcap, pycocotools, nltk, inflection), offline, on the CPU:

    /tmp/ofvenv/bin/python tests/golden/make_openflamingo_eval_golden.py \
        tests/fixtures/openflamingo tests/golden/openflamingo_eval

It runs open_flamingo/eval/evaluate.py's evaluate_vqa, evaluate_captioning and
evaluate_classification themselves, unchanged, on the tiny benchmarks of tests/fixtures/openflamingo/
(their annotation files converted to the layouts OpenFlamingo reads, with 2x2 images where it opens
them), in one process or as two gloo ranks (two processes). What stands in for the model is an EvalModel that only
records: each prompt text it is asked to complete or score, the query it belongs to (from the batch
the loader yielded) and its demonstrations' ids at that moment (from the lists
utils.sample_batch_demos_from_query_set returned, which prompt ensembling shuffles in place). The
query set is recorded from utils.get_query_set's return. Metrics are skipped (compute_vqa_accuracy
and compute_cider are replaced, and OK-VQA's stemming by the plain VQA post-processing: they see the
predictions only, and pycocoevalcap needs Java, the stemmer NLTK's data).

The prompt methods below are OpenFlamingo's, copied verbatim from open_flamingo/eval/models/open_flamingo.py
at 2.0.1: the wheel on PyPI does not ship open_flamingo/eval/models/, so they cannot be imported.

Writes <bench>.json per benchmark: {"bench", "cases": [{"seed", "shots", "world_size", "num_samples",
"query_set_size", "batch_size", "ensembling", "query_set": [ids], "prompts": [{"rank", "query",
"demos": [[ids] per order], "texts": [prompt per order]}, ...]}]}, prompts rank by rank in the
order each rank ran them. Ids are OpenFlamingo's own: question_id (VizWiz: its index in the file,
as OpenFlamingo's converted files number them), image_id, or the meme's id.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

import open_flamingo

EVAL_DIR = Path(open_flamingo.__file__).parent / "eval"
sys.path.insert(0, str(EVAL_DIR))  # evaluate.py imports its siblings as top-level modules
import evaluate  # noqa: E402
import utils  # noqa: E402
from eval_model import BaseEvalModel  # noqa: E402

# (seed, shots, world_size, num_samples, batch_size, ensembling); query set 16 of the train split.
CASES = [(42, 0, 1, -1, 4, False), (42, 2, 1, -1, 4, False), (42, 4, 2, -1, 4, False),
         (7, 2, 1, 5, 4, False), (7, 4, 2, 5, 3, False)]
ENSEMBLE_CASES = [(42, 0, 1, -1, 4, True), (42, 2, 2, -1, 4, True), (7, 3, 2, 5, 2, True)]
QUERY_SET_SIZE = 16
VQA = {"vqav2": "vqav2", "okvqa": "ok_vqa", "vizwiz": "vizwiz", "textvqa": "textvqa"}


class RecordingModel(BaseEvalModel):
    """Completes nothing; records what it is asked."""

    def __init__(self, key, query_field):
        self.key, self.query_field, self.device = key, query_field, "cpu"
        self.rows, self.batch, self.demos, self.fresh = [], None, None, False

    def _record(self, batch_text):
        if self.fresh:  # the first prompts of a batch; prompt ensembling asks again for each order
            self.rows += [{"query": q, "demos": [], "texts": []} for q in self.batch[self.query_field]]
            self.fresh = False
        for row, demos, text in zip(self.rows[-len(batch_text):], self.demos, batch_text):
            row["demos"].append([self.key(x) for x in demos])
            row["texts"].append(text)

    def get_outputs(self, batch_text, batch_images, **kwargs):
        self._record(batch_text)
        return [""] * len(batch_text)

    def get_rank_classifications(self, batch_text, batch_images, all_class_names, use_cache, normalize_length):
        self._record(batch_text)
        return torch.zeros(len(batch_text), len(all_class_names))

    # open_flamingo/eval/models/open_flamingo.py at 2.0.1, verbatim
    def get_vqa_prompt(self, question, answer=None) -> str:
        return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{'<|endofchunk|>' if answer is not None else ''}"  # noqa: E501

    def get_caption_prompt(self, caption=None) -> str:
        return f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"  # noqa: E501

    def get_imagenet_prompt(self, label=None) -> str:
        return f"<image>Output:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"

    def get_hateful_memes_prompt(self, text, label=None) -> str:
        return f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label if label is not None else ''}{'<|endofchunk|>' if label is not None else ''}"  # noqa: E501


def image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        Image.new("RGB", (2, 2), (len(path.name) * 7 % 256, 40, 90)).save(path, format="PNG")


def layouts(fixtures: Path, work: Path) -> dict:
    """Each benchmark as OpenFlamingo's command line would name it: paths into `work`."""
    paths = {}
    for name, of in (("vqav2", "vqav2"), ("okvqa", "ok_vqa")):
        prefix = "v2_" if name == "vqav2" else ""
        for split, role in (("train", "train"), ("val", "test")):
            q = fixtures / name / f"{prefix}OpenEnded_mscoco_{split}2014_questions.json"
            a = fixtures / name / f"{prefix}mscoco_{split}2014_annotations.json"
            images = work / name / f"{split}2014"
            for item in json.loads(q.read_text())["questions"]:
                image(images / f"COCO_{split}2014_{item['image_id']:012d}.jpg")
            paths.update({f"{of}_{role}_image_dir_path": str(images), f"{of}_{role}_questions_json_path": str(q),
                          f"{of}_{role}_annotations_json_path": str(a)})
    # VizWiz and TextVQA: OpenFlamingo reads them converted to the VQAv2 layout (its
    # open_flamingo/eval/data/*_vqa_format.json), in file order.
    for split, role in (("train", "train"), ("val", "test")):
        items = json.loads((fixtures / "vizwiz" / "Annotations" / f"{split}.json").read_text())
        questions = [{"question": x["question"], "image_id": x["image"], "question_id": i} for i, x in enumerate(items)]
        annotations = [{"question_id": i, "answers": x["answers"]} for i, x in enumerate(items)]
        images = work / "vizwiz" / split
        for x in items:
            image(images / x["image"])
        paths.update(vqa_format(work / "vizwiz", "vizwiz", split, role, questions, annotations))
        paths[f"vizwiz_{role}_image_dir_path"] = str(images)

        data = json.loads((fixtures / "textvqa" / f"TextVQA_0.5.1_{split}.json").read_text())["data"]
        questions = [{"question": x["question"], "image_id": x["image_id"], "question_id": x["question_id"]}
                     for x in data]
        annotations = [{"question_id": x["question_id"], "answers": [{"answer": a} for a in x["answers"]]}
                       for x in data]
        for x in data:
            image(work / "textvqa" / "train_images" / f"{x['image_id']}.jpg")
        paths.update(vqa_format(work / "textvqa", "textvqa", split, role, questions, annotations))
    paths["textvqa_image_dir_path"] = str(work / "textvqa" / "train_images")

    coco = fixtures / "coco" / "dataset_coco.json"
    for item in json.loads(coco.read_text())["images"]:
        image(work / "coco" / item["filepath"] / item["filename"])
    paths.update(coco_train_image_dir_path=str(work / "coco" / "train2014"),
                 coco_val_image_dir_path=str(work / "coco" / "val2014"), coco_karpathy_json_path=str(coco),
                 coco_annotations_json_path=None)
    flickr = fixtures / "flickr30k" / "dataset_flickr30k.json"
    for item in json.loads(flickr.read_text())["images"]:
        image(work / "flickr30k" / "flickr30k-images" / item["filename"])
    paths.update(flickr_image_dir_path=str(work / "flickr30k" / "flickr30k-images"),
                 flickr_karpathy_json_path=str(flickr),
                 flickr_annotations_json_path=None)

    for split in ("train", "dev_seen"):
        for line in (fixtures / "hatefulmemes" / f"{split}.jsonl").read_text().splitlines():
            image(work / "hatefulmemes" / "img" / json.loads(line)["img"].split("/")[-1])
    paths.update(hateful_memes_image_dir_path=str(work / "hatefulmemes" / "img"),
                 hateful_memes_train_annotations_json_path=str(fixtures / "hatefulmemes" / "train.jsonl"),
                 hateful_memes_test_annotations_json_path=str(fixtures / "hatefulmemes" / "dev_seen.jsonl"))
    return paths


def vqa_format(folder: Path, of: str, split: str, role: str, questions: list, annotations: list) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    q, a = folder / f"{split}_questions_vqa_format.json", folder / f"{split}_annotations_vqa_format.json"
    q.write_text(json.dumps({"questions": questions}))
    a.write_text(json.dumps({"annotations": annotations}))
    return {f"{of}_{role}_questions_json_path": str(q), f"{of}_{role}_annotations_json_path": str(a)}


def run_case(bench: str, case: tuple, paths: dict, rank: int, world_size: int) -> dict:
    seed, shots, _, num_samples, batch_size, ensembling = case
    args = argparse.Namespace(model="open_flamingo", num_samples=num_samples, query_set_size=QUERY_SET_SIZE,
                              batch_size=batch_size, rices=False, rank=rank, world_size=world_size, **paths)
    if bench in VQA:
        key, query_field = (lambda x: x["question_id"]), "question_id"
    elif bench in ("coco", "flickr30k"):
        key, query_field = (lambda x: x["image_id"]), "image_id"
    else:
        key, query_field = (lambda x: x["id"]), "id"
    model = RecordingModel(key, query_field)
    recorded = {}
    prepare, sample = utils.prepare_eval_samples, utils.sample_batch_demos_from_query_set
    query_set = utils.get_query_set

    def prepare_eval_samples(*a, **kw):
        loader = prepare(*a, **kw)

        class Recorded:
            def __iter__(self):
                for batch in loader:
                    model.batch, model.fresh = batch, True
                    yield batch
        return Recorded()

    def sample_batch_demos(*a, **kw):
        model.demos = sample(*a, **kw)
        return model.demos

    def get_query_set(*a, **kw):
        chosen = query_set(*a, **kw)
        recorded["query_set"] = [key(x) for x in chosen]
        return chosen

    utils.prepare_eval_samples, utils.sample_batch_demos_from_query_set = prepare_eval_samples, sample_batch_demos
    utils.get_query_set = get_query_set
    try:
        if bench in VQA:
            evaluate.evaluate_vqa(args, model, seed=seed, num_shots=shots, dataset_name=VQA[bench],
                                  max_generation_length=10 if bench == "textvqa" else 5)
        elif bench in ("coco", "flickr30k"):
            evaluate.evaluate_captioning(args, model, seed=seed, num_shots=shots,
                                         dataset_name="coco" if bench == "coco" else "flickr")
        else:
            evaluate.evaluate_classification(args, model, seed=seed, num_shots=shots, dataset_name="hateful_memes",
                                             use_prompt_ensembling=ensembling)
    finally:
        utils.prepare_eval_samples, utils.sample_batch_demos_from_query_set = prepare, sample
        utils.get_query_set = query_set
    rows = [{"rank": rank, "query": r["query"], "demos": r["demos"], "texts": r["texts"]} for r in model.rows]
    return {"query_set": recorded["query_set"], "prompts": rows}


def worker(rank: int, world_size: int, store: str, fixtures: Path, work: Path, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    # Metrics and post-processing see the predictions only; pycocoevalcap's tokenizer needs Java,
    # OK-VQA's stemmer NLTK's data.
    evaluate.compute_vqa_accuracy = lambda *a, **kw: 0.0
    evaluate.postprocess_ok_vqa_generation = evaluate.postprocess_vqa_generation
    evaluate.compute_cider = lambda *a, **kw: {"CIDEr": 0.0}
    cwd = os.getcwd()
    os.chdir(work)  # evaluate_vqa writes its predictions to the working directory
    try:
        paths = layouts(fixtures, work / f"rank{rank}")
        results = {}
        for bench in (*VQA, "coco", "flickr30k", "hatefulmemes"):
            cases = CASES + (ENSEMBLE_CASES if bench == "hatefulmemes" else [])
            results[bench] = [(case, run_case(bench, case, paths, rank, world_size))
                              for case in cases if case[2] == world_size]
        (out / f"part-{world_size}-{rank}.json").write_text(json.dumps(results))
    finally:
        os.chdir(cwd)
        dist.destroy_process_group()


def main() -> None:
    if sys.argv[1] == "--worker":  # one rank, started by main below
        rank, world_size, store, fixtures, work = sys.argv[2:7]
        worker(int(rank), int(world_size), store, Path(fixtures), Path(work), Path(work))
        return
    fixtures, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for world_size in (1, 2):
            ranks = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(world_size),
                                       str(tmp / f"store{world_size}"), str(fixtures), str(tmp)])
                     for rank in range(world_size)]
            if any(r.wait() for r in ranks):
                raise SystemExit(f"a rank of {world_size} failed")
        parts = {(w, r): json.loads((tmp / f"part-{w}-{r}.json").read_text()) for w in (1, 2) for r in range(w)}
    for bench in (*VQA, "coco", "flickr30k", "hatefulmemes"):
        cases = []
        for world_size in (1, 2):
            for i, (case, _) in enumerate(parts[(world_size, 0)][bench]):
                seed, shots, _, num_samples, batch_size, ensembling = case
                ranks = [parts[(world_size, r)][bench][i][1] for r in range(world_size)]
                assert all(r["query_set"] == ranks[0]["query_set"] for r in ranks)
                cases.append({"seed": seed, "shots": shots, "world_size": world_size, "num_samples": num_samples,
                              "query_set_size": QUERY_SET_SIZE, "batch_size": batch_size, "ensembling": ensembling,
                              "query_set": ranks[0]["query_set"],
                              "prompts": [p for r in ranks for p in r["prompts"]]})
        (out / f"{bench}.json").write_text(json.dumps({"bench": bench, "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
