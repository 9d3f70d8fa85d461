"""VisDial v1.0: native files -> round records, the prompt template, the official metrics, and
data | prompt | score on the bundled model, then the metrics."""
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_cli.evaluation.benchmarks import BENCHMARKS, TASKS, read_benchmark
from flamingo_cli.evaluation.benchmarks.visdial import read_visdial
from flamingo_cli.evaluation.retrieval import ndcg, option_scores, ranks, visdial_metrics
from flamingo_cli.formats.artifacts import ArtifactError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "visdial"
BIN = Path(sys.executable).parent
VAL_IMAGES = FIXTURE / "VisualDialog_val2018"
TEST_IMAGES = FIXTURE / "VisualDialog_test2018"


def copy_fixture(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "visdial"))


def edit(root: Path, name: str, change) -> None:
    data = json.loads((root / name).read_text())
    change(data)
    (root / name).write_text(json.dumps(data))


# -- the adapter -------------------------------------------------------------------------

def test_registered_as_a_dialogue_benchmark():
    bench = BENCHMARKS["visdial"]
    assert bench.task == "dialogue" and bench.task in TASKS
    assert bench.splits == ("train", "val", "test")


def test_val_is_each_dialogues_densely_annotated_round():
    assert read_benchmark("visdial", FIXTURE, "val") == [
        {"id": "visdial-101-3", "image": str(VAL_IMAGES / "VisualDialog_val2018_000000000101.jpg"), "split": "val",
         "caption": "a red circle",
         "history": [{"question": "what colour is the shape", "answer": "red"},
                     {"question": "what shape is it", "answer": "a circle"}],
         "question": "is it red",
         "dialogue": "a red circle. Question: what colour is the shape? Answer: red "
                     "Question: what shape is it? Answer: a circle Question: is it red? Answer:",
         # answers 0 and 8 of the file are both "red": the options hold the string twice
         "candidates": ["no", "yes", "red", "red"], "label": "yes", "gt_index": 1, "round": 3, "image_id": 101,
         "relevance": [0.0, 1.0, 0.5, 0.5]},
        {"id": "visdial-102-1", "image": str(VAL_IMAGES / "VisualDialog_val2018_000000000102.jpg"), "split": "val",
         "caption": "a blue square", "history": [], "question": "what colour is it",
         "dialogue": "a blue square. Question: what colour is it? Answer:",
         "candidates": ["blue", "red", "green", "yellow"], "label": "blue", "gt_index": 0, "round": 1,
         "image_id": 102, "relevance": [1.0, 0.0, 0.25, 0.0]},
    ]


def test_val_all_rounds_history_is_the_ground_truth_and_only_the_dense_round_has_relevance():
    records = read_visdial(FIXTURE, "val", rounds="all")
    assert [r["id"] for r in records] == ["visdial-101-1", "visdial-101-2", "visdial-101-3", "visdial-102-1",
                                          "visdial-102-2"]
    assert [r["id"] for r in records if "relevance" in r] == ["visdial-101-3", "visdial-102-1"]
    assert [len(r["history"]) for r in records] == [0, 1, 2, 0, 1]
    assert records[1]["history"] == [{"question": "what colour is the shape", "answer": "red"}]
    assert records[1]["dialogue"] == ("a red circle. Question: what colour is the shape? Answer: red "
                                      "Question: what shape is it? Answer:")
    assert records[4]["candidates"] == ["a circle", "a square"] and records[4]["label"] == "a square"
    assert records[2] == read_benchmark("visdial", FIXTURE, "val")[0]
    json.dumps(records)


def test_val_all_rounds_without_dense_annotations(tmp_path):
    root = copy_fixture(tmp_path)
    (root / "visdial_1.0_val_dense_annotations.json").unlink()
    records = read_visdial(root, "val", rounds="all")
    assert len(records) == 5 and not any("relevance" in r for r in records)


def test_train_finds_each_image_in_its_coco_folder():
    records = read_benchmark("visdial", FIXTURE, "train")
    assert [r["id"] for r in records] == ["visdial-9-1", "visdial-9-2", "visdial-9-3", "visdial-42-1", "visdial-42-2"]
    assert {r["image"] for r in records} == {str(FIXTURE / "train2014" / "COCO_train2014_000000000009.jpg"),
                                            str(FIXTURE / "val2014" / "COCO_val2014_000000000042.jpg")}
    assert records[2]["label"] == "yes" and records[2]["gt_index"] == 1
    assert records[2]["history"] == [{"question": "what colour is the shape", "answer": "green"},
                                     {"question": "what shape is it", "answer": "a triangle"}]
    assert not any("relevance" in r for r in records) and all(r["split"] == "train" for r in records)


def test_train_images_all_in_one_folder(tmp_path):
    root = copy_fixture(tmp_path)
    (root / "VisualDialog_train2018").mkdir()
    for folder, prefix, image_id in (("train2014", "COCO_train2014", 9), ("val2014", "COCO_val2014", 42)):
        (root / folder / f"{prefix}_{image_id:012d}.jpg").rename(
            root / "VisualDialog_train2018" / f"VisualDialog_train2018_{image_id:012d}.jpg")
    assert [r["image"] for r in read_benchmark("visdial", root, "train")][::2] == [
        str(root / "VisualDialog_train2018" / "VisualDialog_train2018_000000000009.jpg"),
        str(root / "VisualDialog_train2018" / "VisualDialog_train2018_000000000009.jpg"),
        str(root / "VisualDialog_train2018" / "VisualDialog_train2018_000000000042.jpg")]


def test_test_split_is_the_last_round_without_ground_truth():
    records = read_benchmark("visdial", FIXTURE, "test")
    assert records == [
        {"id": "visdial-201-1", "image": str(TEST_IMAGES / "VisualDialog_test2018_000000000201.jpg"),
         "split": "test", "caption": "a purple cross", "history": [], "question": "what colour is the shape",
         "dialogue": "a purple cross. Question: what colour is the shape? Answer:",
         "candidates": ["blue", "purple", "yes"], "round": 1, "image_id": 201},
        {"id": "visdial-202-3", "image": str(TEST_IMAGES / "VisualDialog_test2018_000000000202.jpg"),
         "split": "test", "caption": "a blue diamond",
         "history": [{"question": "what colour is the shape", "answer": "blue"},
                     {"question": "what shape is it", "answer": "a diamond"}],
         "question": "is it blue",
         "dialogue": "a blue diamond. Question: what colour is the shape? Answer: blue "
                     "Question: what shape is it? Answer: a diamond Question: is it blue? Answer:",
         "candidates": ["no", "yes"], "round": 3, "image_id": 202},
    ]


VAL, DENSE = "visdial_1.0_val.json", "visdial_1.0_val_dense_annotations.json"


def _set(path, value):
    def change(data):
        *keys, last = path
        for key in keys:
            data = data[key]
        data[last] = value
    return change


def _round(dialogue, number, key, value):
    return _set(["data", "dialogs", dialogue, "dialog", number, key], value)


@pytest.mark.parametrize("name,change,needle", [
    (VAL, "{not json", "visdial_1.0_val.json: malformed JSON at line 1 column 2"),
    (VAL, b"\xff\xfe", "visdial_1.0_val.json: not UTF-8 text"),
    (VAL, None, "visdial_1.0_val.json: no such file"),
    (DENSE, None, "visdial_1.0_val_dense_annotations.json: no such file"),
    (VAL, lambda d: d.pop("data"), "top-level object lacks required field 'data'"),
    (VAL, _set(["data", "answers", 1], 7), "answers[1] should be a str, got int"),
    (VAL, _round(0, 2, "question", 99), "dialogue 101, round 3: question 99 is out of range (0..3)"),
    (VAL, _round(0, 2, "answer_options", [7, "6", 0, 8]), "dialogue 101, round 3 answer option should be an int"),
    (VAL, _round(0, 2, "gt_index", 0), "dialogue 101, round 3: gt_index 0 is option 'no', not the answer 'yes'"),
    (VAL, _round(0, 2, "gt_index", 4), "dialogue 101, round 3: gt_index 4 is out of range (0..3)"),
    (VAL, _round(0, 2, "answer_options", []), "dialogue 101, round 3 has no answer options"),
    (VAL, lambda d: d["data"]["dialogs"][0]["dialog"][0].pop("answer"),
     "dialogue 101, round 1 has no answer, yet later rounds follow it"),
    (VAL, lambda d: d["data"]["dialogs"].append(d["data"]["dialogs"][0]), "image 101 has two dialogues"),
    (VAL, _set(["data", "questions", 2], "  "), "dialogue 101, round 3: a dialogue round needs a question"),
    (VAL, lambda d: d["data"]["dialogs"].pop(), "image 102 has no dialogue in"),
    (DENSE, lambda d: d.pop(), "dialogue 102 of "),
    (DENSE, _set([0, "gt_relevance"], [0.0, 1.0, 0.5]), "image 101: 3 relevances for the 4 answer options of round 3"),
    (DENSE, _set([0, "gt_relevance"], [0.0, -1.0, 0.5, 0.5]), "image 101: relevance -1.0 is not a non-negative"),
    (DENSE, _set([0, "round_id"], 11), "image 101: round_id 11 is not one of its 3 rounds"),
    (DENSE, lambda d: d.append(d[0]), "image 101 is annotated twice"),
])
def test_bad_files_are_one_line_errors_naming_file_and_place(tmp_path, name, change, needle):
    root = copy_fixture(tmp_path)
    if change is None:
        (root / name).unlink()
    elif isinstance(change, str):
        (root / name).write_text(change)
    elif isinstance(change, bytes):
        (root / name).write_bytes(change)
    else:
        edit(root, name, change)
    with pytest.raises(ArtifactError) as e:
        read_benchmark("visdial", root, "val")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_train_images_must_be_found(tmp_path):
    root = copy_fixture(tmp_path)
    shutil.rmtree(root / "val2014")
    with pytest.raises(ArtifactError, match="image of train dialogue 42 is in none of VisualDialog_train2018/, "
                                            "train2014/, val2014/"):
        read_benchmark("visdial", root, "train")
    shutil.rmtree(root / "train2014")
    with pytest.raises(ArtifactError, match="no VisDial train images"):
        read_benchmark("visdial", root, "train")
    with pytest.raises(ArtifactError, match="rounds must be one of dense, all"):
        read_visdial(root, "val", rounds="some")


# -- the prompt template -----------------------------------------------------------------

def test_the_template_puts_other_dialogues_rounds_before_the_query():
    from flamingo_cli.inference.prompting import build_prompt, load_template

    template = load_template("visdial")
    shot = read_benchmark("visdial", FIXTURE, "train")[1]
    query = read_benchmark("visdial", FIXTURE, "val")[1]
    text, media = build_prompt(template, query, [shot])
    assert text == ("<image>a green triangle. Question: what colour is the shape? Answer: green "
                    "Question: what shape is it? Answer: a triangle<|endofchunk|>"
                    "<image>a blue square. Question: what colour is it? Answer:")
    assert media == [shot["image"], query["image"]]
    # A demonstration's answer reads as a scored candidate does: " {candidate}<|endofchunk|>".
    assert template.continuation.format(candidate=shot["label"]) == " a triangle<|endofchunk|>"
    text, media = build_prompt(template, query, [], zero_shot_examples=[shot])
    assert text.startswith("a green triangle.") and text.count("<image>") == 1 and media == [query["image"]]


# -- the metrics -------------------------------------------------------------------------

def test_ranks_are_by_descending_score_ties_to_the_earlier_option():
    assert ranks([-1.0, -0.5, -1.0, -3.0]) == [2, 1, 3, 4]
    assert ranks([0.0, 0.0, 0.0]) == [1, 2, 3]
    assert ranks([-math.inf, -2.0]) == [2, 1]


def test_ndcg_by_hand():
    # k = 3 options have non-zero relevance (1, 2, 4). Ranked: option 0 first, then 2, 4, 1, 3, so
    # the top 3 are options 0, 2, 4 with relevance 0, 0.5, 0.5 (option 1, relevance 1, ranks 4th and
    # does not count): DCG = 0/log2(2) + 0.5/log2(3) + 0.5/log2(4). Ideal: relevances sorted
    # 1, 0.5, 0.5: 1/log2(2) + 0.5/log2(3) + 0.5/log2(4).
    value = ndcg([1, 4, 2, 5, 3], [0.0, 1.0, 0.5, 0.0, 0.5])
    assert value == pytest.approx((0.5 / math.log2(3) + 0.25) / (1 + 0.5 / math.log2(3) + 0.25))
    assert value == pytest.approx(0.361213, abs=1e-6)
    assert ndcg([2, 1, 3], [0.5, 1.0, 0.0]) == pytest.approx(1.0)  # k = 2, the two relevant ranked best-first
    # k = 1: only the first-ranked option counts, and it has none.
    assert ndcg([1, 2], [0.0, 1.0]) == 0.0


def test_a_repeated_candidate_gets_its_one_score_at_every_place():
    record = {"id": "r", "candidates": ["no", "yes", "red", "red"], "scores": {"no": -2.0, "yes": -0.5, "red": -1.0}}
    assert option_scores(record) == [-2.0, -0.5, -1.0, -1.0]
    assert ranks(option_scores(record)) == [4, 1, 2, 3]


def _round_record(rid, candidates, scores, gt_index, relevance=None):
    record = {"id": rid, "candidates": candidates, "scores": dict(zip(candidates, scores)), "gt_index": gt_index,
              "label": candidates[gt_index]}
    if relevance is not None:
        record["relevance"] = relevance
    return record


def test_the_summary_by_hand():
    seven = [f"c{i}" for i in range(7)]
    records = [
        # scores fall with the index: the ground truth, option 5, ranks 6th
        _round_record("a", seven, [-1.0 - i for i in range(7)], 5),
        # duplicate "red" (options 2 and 3) tie at -1: option 2 ranks 2nd, option 3, the ground truth, 3rd.
        # Relevance: k = 2 (options 0 and 2); the top 2 ranked are options 1 and 2, relevance 0 and 1:
        # DCG = 0 + 1/log2(3); ideal = 1 + 0.5/log2(3).
        {"id": "b", "candidates": ["no", "yes", "red", "red"], "scores": {"no": -2.0, "yes": -0.5, "red": -1.0},
         "gt_index": 3, "label": "red", "relevance": [0.5, 0.0, 1.0, 0.0]},
        _round_record("c", ["x", "y"], [-0.1, -0.2], 0),
    ]
    summary, rows = visdial_metrics(records)
    dense = (1 / math.log2(3)) / (1 + 0.5 / math.log2(3))
    assert summary == {
        "metric": "visdial", "score": pytest.approx(100 * dense), "ndcg": pytest.approx(100 * dense),
        "mrr": pytest.approx(100 * (1 / 6 + 1 / 3 + 1) / 3), "r1": pytest.approx(100 / 3),
        "r5": pytest.approx(200 / 3), "r10": 100.0, "mean_rank": pytest.approx(10 / 3), "n": 3, "n_dense": 1}
    assert rows == [{"id": "a", "prediction": "c0", "label": "c5", "rank": 6},
                    {"id": "b", "prediction": "yes", "label": "red", "rank": 3, "ndcg": pytest.approx(dense)},
                    {"id": "c", "prediction": "x", "label": "x", "rank": 1}]


def _official(scores, gt, relevance):
    """visdialch/metrics.py's SparseGTMetrics and NDCG, re-expressed in torch for one batch of
    rounds (a stable sort, so equal scores, should there be any, order as ours do)."""
    import torch

    scores, relevance = torch.tensor(scores), torch.tensor(relevance)
    b, n = scores.shape
    ranked = scores.sort(dim=1, descending=True, stable=True).indices
    option_ranks = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(1, n + 1).expand(b, n))
    gt_ranks = option_ranks[torch.arange(b), torch.tensor(gt)].float()
    k = (relevance != 0).sum(-1)
    rankings = option_ranks.sort(dim=-1).indices
    best = relevance.sort(dim=-1, descending=True).indices
    discounts = torch.log2(torch.arange(n).float() + 2)
    ndcgs = [(relevance[i][rankings[i][:k[i]]] / discounts[:k[i]]).sum()
             / (relevance[i][best[i][:k[i]]] / discounts[:k[i]]).sum() for i in range(b)]
    return {"r1": (gt_ranks <= 1).float().mean().item(), "r5": (gt_ranks <= 5).float().mean().item(),
            "r10": (gt_ranks <= 10).float().mean().item(), "mean_rank": gt_ranks.mean().item(),
            "mrr": gt_ranks.reciprocal().mean().item(), "ndcg": torch.stack(ndcgs).mean().item()}


def test_the_official_evaluation_agrees_on_100_candidates():
    rng = random.Random(0)
    rounds, n = 60, 100
    scores = [[rng.gauss(-5, 2) for _ in range(n)] for _ in range(rounds)]
    gt = [rng.randrange(n) for _ in range(rounds)]
    relevance = [[rng.choice([0.0] * 6 + [0.2, 0.4, 0.6, 0.8, 1.0]) for _ in range(n)] for _ in range(rounds)]
    for rel in relevance:
        rel[rng.randrange(n)] = 1.0
    candidates = [f"answer {j}" for j in range(n)]
    records = [_round_record(f"r{i}", candidates, scores[i], gt[i], relevance[i]) for i in range(rounds)]
    summary, _ = visdial_metrics(records)
    official = _official(scores, gt, relevance)
    for key, value in official.items():
        assert summary[key] == pytest.approx(value if key == "mean_rank" else 100 * value, rel=1e-5), key
    assert summary["n"] == summary["n_dense"] == rounds


@pytest.mark.parametrize("change,needle", [
    (lambda r: r.pop("gt_index"), "no 'gt_index' (VisDial's test split has no ground truth"),
    (lambda r: r.update(gt_index=9), "'gt_index' should be an option index in 0..3, got 9"),
    (lambda r: r.update(label="blue"), "'label' 'blue' is not candidate 3 ('red')"),
    (lambda r: r.pop("scores"), "no 'scores' over its candidates"),
    (lambda r: r["scores"].pop("yes"), "'scores' has no score for candidate 'yes'"),
    (lambda r: r["scores"].update(maybe=-1.0), "'scores' has a score for 'maybe', not a candidate"),
    (lambda r: r["scores"].update(no=float("nan")), "the score of 'no' should be a number, got nan"),
    (lambda r: r.update(candidates=[]), "'candidates' must be a non-empty list"),
    (lambda r: r.update(relevance=[1.0, 0.0]), "'relevance' should be 4 numbers, one per candidate"),
    (lambda r: r.update(relevance=[0, 0, 0, 0]), "'relevance' is zero for every candidate"),
    (lambda r: r.pop("relevance"), "none of the 1 rounds is densely annotated"),
])
def test_bad_score_records_are_one_line_errors(change, needle):
    record = {"id": "b", "candidates": ["no", "yes", "red", "red"], "scores": {"no": -2.0, "yes": -0.5, "red": -1.0},
              "gt_index": 3, "label": "red", "relevance": [0.5, 0.0, 1.0, 0.0]}
    change(record)
    with pytest.raises(ArtifactError) as e:
        visdial_metrics([record])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_one_record_per_round():
    with pytest.raises(ArtifactError, match="several records share this id"):
        visdial_metrics([_round_record("x", ["a", "b"], [0.0, 1.0], 0, [1, 0])] * 2)
    with pytest.raises(ArtifactError, match="no prediction records"):
        visdial_metrics([])


# -- end to end on the bundled model -----------------------------------------------------

def test_data_prompt_score_then_the_metrics_on_the_bundled_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLAMINGO_CKPT"}  # the bundled model
    env.update(PATH=f"{BIN}:{env['PATH']}", FLAMINGO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "-c", f"set -euo pipefail; flamingo data visdial {FIXTURE} --split train > support.jsonl; "
                        f"flamingo data visdial {FIXTURE} --split val | flamingo prompt --shots support.jsonl -k 2 "
                        "--seed 1 --template visdial | flamingo score -q | tee scored.jsonl "
                        "| flamingo evaluate -c visdial > summary.json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [o["id"] for o in out] == ["visdial-101-3", "visdial-102-1"]
    support = {s["id"]: s for s in read_benchmark("visdial", FIXTURE, "train")}
    for o in out:
        shots = [support[s] for s in o["shots"]]
        assert len(shots) == 2
        assert o["prompt"] == "".join(f"<image>{s['dialogue']} {s['label']}<|endofchunk|>" for s in shots) \
            + f"<image>{o['dialogue']}"
        assert o["media"] == [s["image"] for s in shots] + [o["image"]]
        assert sorted(o["scores"]) == sorted(set(o["candidates"]))
        assert o["prediction"] == max(o["scores"], key=o["scores"].get)
    assert len(out[0]["scores"]) == 3  # "red" twice among the four options, scored once

    summary, rows = visdial_metrics(out)
    cli = json.loads((tmp_path / "summary.json").read_text())  # flamingo evaluate -c visdial
    assert {k: cli[k] for k in summary} == summary
    assert summary["n"] == summary["n_dense"] == 2
    for o, row in zip(out, rows):
        option_ranks = ranks(option_scores(o))
        assert row["rank"] == option_ranks[o["gt_index"]] and row["label"] == o["label"]
        assert row["prediction"] == o["prediction"]
        assert row["ndcg"] == pytest.approx(ndcg(option_ranks, o["relevance"]))
    first = ranks(option_scores(out[0]))
    assert first[3] == first[2] + 1  # the two "red"s: one score, the later option right behind the earlier
    assert summary["score"] == pytest.approx(50 * (rows[0]["ndcg"] + rows[1]["ndcg"]))
    assert summary["mrr"] == pytest.approx(50 * (1 / rows[0]["rank"] + 1 / rows[1]["rank"]))
    assert 0 <= summary["score"] <= 100 and 1 <= summary["mean_rank"] <= 4
