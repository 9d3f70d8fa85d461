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


# Accuracies by hand: all ten agree (1), two of ten (0.6), three of ten (0.9), none (0).
TYPED = [
    {"id": "a", "output": "yes", "answers": ["yes"] * 10, "answer_type": "yes/no", "question_type": "is the"},
    {"id": "b", "output": "no", "answers": ["yes"] * 8 + ["no"] * 2, "answer_type": "yes/no", "question_type": "is"},
    {"id": "c", "output": "Two", "answers": ["2"] * 3 + ["3"] * 7, "answer_type": "number",
     "question_type": "how many"},
    {"id": "d", "output": "red", "answers": ["blue"] * 10, "answer_type": "other", "question_type": "what color"},
]


def test_vqa_accuracy_by_answer_type():
    summary, rows = evaluate_records(TYPED, "vqa")
    assert summary["score"] == pytest.approx(100 * (1 + 0.6 + 0.9 + 0) / 4)
    assert summary["by_answer_type"] == {"number": {"accuracy": pytest.approx(90.0), "n": 1},
                                         "other": {"accuracy": 0.0, "n": 1},
                                         "yes/no": {"accuracy": pytest.approx(80.0), "n": 2}}
    assert rows[2] == {"id": "c", "prediction": "Two", "score": pytest.approx(0.9), "answer_type": "number",
                       "question_type": "how many"}
    assert "by_answer_type" not in evaluate_records(VQA, "vqa")[0]  # TextVQA-like records carry no type
    with pytest.raises(ArtifactError, match=r"d: no 'answer_type' string, while other records have one"):
        evaluate_records([*TYPED[:3], {k: v for k, v in TYPED[3].items() if k != "answer_type"}], "vqa")
    # Joined from --references with the answers.
    preds = [{"id": r["id"], "output": r["output"]} for r in TYPED]
    joined = join_references(preds, TYPED, "vqa")
    assert evaluate_records(joined, "vqa")[0]["by_answer_type"] == summary["by_answer_type"]


def test_cli_reports_by_answer_type_and_rows_carry_it(tmp_path):
    per = tmp_path / "per.jsonl"
    r = run("-c", "vqav2", "--per-example", str(per), stdin=lines(TYPED))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["by_answer_type"]["yes/no"] == {"accuracy": pytest.approx(80.0), "n": 2}
    assert summary["okvqa_stem"] is False
    assert [json.loads(line)["answer_type"] for line in per.read_text().splitlines()] == [
        "yes/no", "yes/no", "number", "other"]


def test_top5_over_the_scores_breaks_ties_as_top1():
    # Seven classes; a is best, then b; c, d, e and f tie at -3, so the top five are a b c d e.
    scores = {"a": -1.0, "b": -2.0, "c": -3.0, "d": -3.0, "e": -3.0, "f": -3.0, "g": -4.0}
    records = [{"id": i, "scores": scores, "prediction": "a", "label": label} for i, label in enumerate("fea")]
    summary, rows = evaluate_records(records, "top1")
    assert summary["score"] == pytest.approx(100 / 3)  # only the third is a
    assert summary["top5"] == pytest.approx(200 / 3)  # e and a are in the top five, f (tied, later) is not
    assert [(row["score"], row["top5"]) for row in rows] == [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    # Generations (no scores) and four choices (STAR: every label in the top five) report no top5.
    assert "top5" not in evaluate_records([{"id": 1, "output": "a", "label": "a"}], "top1")[0]
    four = [{"id": 1, "scores": {"a": -1.0, "b": -2.0, "c": -3.0, "d": -4.0}, "prediction": "a", "label": "d"}]
    assert "top5" not in evaluate_records(four, "top1")[0]


def test_top5_of_a_prompt_ensemble_ranks_the_averaged_scores():
    base = {c: -5.0 for c in "abcdefg"}
    records = [{"id": "q", "ensemble": 0, "scores": {**base, "g": -1.0}, "prediction": "g", "label": "f"},
               {"id": "q", "ensemble": 1, "scores": {**base, "f": 1.0}, "prediction": "f", "label": "f"}]
    # Means: f (-2), g (-3), the rest -5: f is first, so top-1 and top-5 both hit.
    summary, rows = evaluate_records(records, "top1")
    assert summary["score"] == 100.0 and summary["top5"] == 100.0


def test_the_caption_suite_scores_cider_as_cider_does_and_says_what_it_lacks():
    records = [{"id": "a", "output": "a red circle", "captions": ["a red circle", "a red ring"]},
               {"id": "b", "output": "a blue square", "captions": ["a green square", "a blue box"]},
               {"id": "c", "output": "two dogs", "captions": ["two dogs play", "dogs"]}]
    cider, cider_rows = evaluate_records(records, "cider")
    suite, rows = evaluate_records(records, "captions", caption_backend="python")
    assert suite["score"] == suite["cider"] == pytest.approx(cider["score"])
    assert [r["score"] for r in rows] == pytest.approx([100 * r["score"] for r in cider_rows])
    assert suite["backend"] == "python" and set(suite["missing"]) == {"meteor", "spice"}
    assert {"bleu1", "bleu4", "rouge_l"} <= set(suite) and {"bleu1", "rouge_l"} <= set(rows[0])
