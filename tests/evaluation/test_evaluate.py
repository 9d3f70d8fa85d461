"""flamingo evaluate: prediction records + references -> a summary, ensembles merged, errors as one line."""
import json
import subprocess
import sys

import pytest

from flamingo_cli.formats.artifacts import ArtifactError
from flamingo_cli.evaluation.evaluate import PostProcess, evaluate_records, join_references, merge_ensembles

FLAMINGO = [sys.executable, "-c", "from flamingo_cli.cli import main; main()"]


def run(*args, stdin=""):
    return subprocess.run([*FLAMINGO, "evaluate", *args], input=stdin, capture_output=True, text=True)


def lines(records):
    return "".join(json.dumps(r) + "\n" for r in records)


VQA = [
    {"id": "q1", "output": "Two Question: how many", "answers": ["2"] * 10},
    {"id": "q2", "output": "red", "answers": ["red", "red", "blue"] + ["green"] * 7},
]


def test_vqa_summary_per_example_and_tags(tmp_path):
    per = tmp_path / "per.jsonl"
    r = run("--metric", "vqa", "--cut-at", "Question", "--per-example", str(per), "--tag", "shots=4",
            "--tag", "bench=vqav2", stdin=lines(VQA))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["metric"] == "vqa" and summary["n"] == 2 and summary["shots"] == 4 and summary["bench"] == "vqav2"
    assert summary["score"] == pytest.approx(100 * (1.0 + 0.6) / 2)
    rows = [json.loads(line) for line in per.read_text().splitlines()]
    assert rows == [{"id": "q1", "prediction": "Two", "score": 1.0},
                    {"id": "q2", "prediction": "red", "score": pytest.approx(0.6)}]


def test_presets_set_the_metric_and_post_processing():
    r = run("-c", "vqav2", stdin=lines(VQA))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["cut_at"] == ["Question", "Answer", "Short", "Output"]
    caption = [{"id": i, "output": '"a red bus" Output: a', "captions": ["a red bus", "a bus"]} for i in range(3)]
    assert json.loads(run("-c", "coco", stdin=lines(caption)).stdout)["strip_quotes"] is True


def test_prompt_ensembles_are_averaged_before_ranking():
    records = [{"id": "m", "ensemble": 0, "scores": {"yes": -1.0, "no": -2.0}, "prediction": "yes", "shots": ["a", "b"]},
               {"id": "m", "ensemble": 1, "scores": {"yes": -3.0, "no": -1.0}, "prediction": "no", "shots": ["b", "a"]}]
    (merged,) = merge_ensembles(records)
    assert merged["scores"] == {"yes": -2.0, "no": -1.5} and merged["prediction"] == "no"
    assert merged["ensemble_shots"] == [["a", "b"], ["b", "a"]] and "ensemble" not in merged
    with pytest.raises(ArtifactError, match="share this id"):
        merge_ensembles([{"id": 1, "output": "a"}, {"id": 1, "output": "b"}])


def test_roc_auc_from_the_yes_no_scores():
    records = [{"id": i, "label": label, "scores": {"yes": y, "no": n}}
               for i, (label, y, n) in enumerate([("yes", -1, -2), ("no", -2, -1), ("yes", -1, -1.5), ("no", -3, -1)])]
    summary, rows = evaluate_records(records, "roc_auc")
    assert summary["score"] == 100.0
    assert rows[0]["probability"] == pytest.approx(1 / (1 + 2.718281828459045 ** -1))
    with pytest.raises(ArtifactError, match="both labels"):
        evaluate_records([r for r in records if r["label"] == "yes"], "roc_auc")


def test_top1_and_cider_and_references_joined_by_id():
    preds = [{"id": 1, "prediction": "tench"}, {"id": 2, "prediction": "goldfish"}]
    refs = [{"id": 2, "label": "shark"}, {"id": 1, "label": "tench"}]
    summary, _ = evaluate_records(join_references(preds, refs, "top1"), "top1")
    assert summary["score"] == 50.0
    with pytest.raises(ArtifactError, match="3: not in the references"):
        join_references([{"id": 3, "prediction": "x"}], refs, "top1")
    captions = [{"id": i, "output": c, "captions": [c, "something else entirely"]}
                for i, c in enumerate(["a red bus", "two dogs play", "a cat on a mat"])]
    summary, rows = evaluate_records(captions, "cider", post=PostProcess())
    assert summary["metric"] == "cider" and summary["score"] > 0 and len(rows) == 3


@pytest.mark.parametrize("stdin, args, needle", [
    ('{"id": 1, "output": "x"\n', ["--metric", "vqa"], "line 1"),
    ('{"id": 1, "output": "x"}\n', ["--metric", "vqa"], "no reference for vqa"),
    ('{"id": 1, "answers": ["a"]}\n', ["--metric", "vqa"], "no 'output'"),
    ('{"id": 1, "output": "x", "answers": ["a"]}\n', ["--metric", "vqa", "--tag", "oops"], "KEY=VALUE"),
    ('{"id": 1, "output": "x"}\n', ["--metric", "top1", "--references", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
])
def test_bad_input_is_one_line_on_stderr(stdin, args, needle):
    r = run(*args, stdin=stdin)
    assert r.returncode != 0 and r.stdout == ""
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_video_qa_metrics_through_evaluate_records():
    from flamingo_cli.evaluation.evaluate import evaluate_records

    records = [{"id": "a", "output": "A dog. Question: what", "label": "dog"},
               {"id": "b", "output": "cat", "label": "dog"}]
    summary, rows = evaluate_records(records, "exact", post=PostProcess(cut=["Question"]))
    assert summary["score"] == 50.0 and [r["score"] for r in rows] == [1.0, 0.0]
    records = [{"id": "a", "output": "red onion", "answers": ["onion", "onion", "red onion", "garlic", "onion"]},
               {"id": "b", "output": "onion", "answers": ["onion", "onion", "red onion", "garlic", "onion"]}]
    summary, rows = evaluate_records(records, "ivqa")
    assert summary["score"] == 75.0 and [r["score"] for r in rows] == [0.5, 1.0]


def test_mwap_through_evaluate_records_needs_every_class_scored():
    from flamingo_cli.formats.artifacts import ArtifactError

    base = {"verb": "cut", "noun": "laptop", "video_id": "v", "label": "cut laptop"}
    records = [{"id": "a", **base, "annotation": 1, "scores": {"cut laptop": -1.0, "blow leaf": -3.0}},
               {"id": "b", **base, "annotation": 0, "scores": {"cut laptop": -2.0, "blow leaf": -0.5}}]
    summary, rows = evaluate_records(records, "mwap")
    assert summary["score"] == 100.0 and [r["prediction"] for r in rows] == ["cut laptop", "blow leaf"]
    del records[1]["scores"]["cut laptop"]
    with pytest.raises(ArtifactError, match="mwap: a record has no score for class 'cut laptop'"):
        evaluate_records(records, "mwap")
