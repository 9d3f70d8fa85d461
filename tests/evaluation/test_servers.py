"""Evaluation-server result files from test-split predictions (flamingo_cli.evaluation.servers, evaluate --server)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_cli.evaluation.benchmarks import read_benchmark
from flamingo_cli.evaluation.evaluate import PostProcess, evaluate_records
from flamingo_cli.evaluation.servers import server_results
from flamingo_cli.formats.artifacts import ArtifactError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks"
FLAMINGO = [sys.executable, "-c", "from flamingo_cli.cli import main; main()"]
CUT = PostProcess(cut=["Question", "Answer", "Short", "Output"])


def predictions(bench: str, split: str, outputs: list[str]) -> list[dict]:
    """The split's records as flamingo data writes them, with generate's `output` added."""
    records = read_benchmark(bench, FIXTURES / bench, split)
    return [{**r, "output": out} for r, out in zip(records, outputs)]


def test_vqav2_test_dev_lists_all_of_test2015_with_empty_answers_for_the_rest():
    # test-dev: 262144000 and 524291000; test2015 adds 262144001 and 131074000.
    records = predictions("vqav2", "test-dev", ["Yes Question: is the", " 2 Short answer: 3"])
    results, coverage = server_results(records, "vqav2", FIXTURES / "vqav2", CUT)
    assert results == [{"question_id": 262144000, "answer": "Yes"}, {"question_id": 262144001, "answer": ""},
                       {"question_id": 131074000, "answer": ""}, {"question_id": 524291000, "answer": "2"}]
    assert (coverage.answered, coverage.questions, coverage.listed) == (2, 2, 4)
    assert str(coverage) == ("answers all 2 questions of vqav2 test-dev; it lists the other 2 questions of vqav2 test "
                             "with empty answers, as the server wants every one")


def test_vqav2_test_standard_and_a_partial_run():
    records = predictions("vqav2", "test", ["yes", "bat", "hotel", "two"])
    results, coverage = server_results(records[:3], "vqav2", FIXTURES / "vqav2")
    assert [r["answer"] for r in results] == ["yes", "bat", "hotel", ""]
    assert str(coverage) == ("answers 3 of the 4 questions of vqav2 test; it lists the other 1 questions of vqav2 "
                             "test with empty answers, as the server wants every one")
    _, coverage = server_results(records, "vqav2", FIXTURES / "vqav2")
    assert str(coverage) == "answers all 4 questions of vqav2 test"


def test_vizwiz_names_results_by_image_and_textvqa_by_question_id():
    records = predictions("vizwiz", "test", ["a can of soup", "blue Answer: no", "unanswerable"])
    results, _ = server_results(records, "vizwiz", FIXTURES / "vizwiz", CUT)
    assert results == [{"image": "VizWiz_test_00000000.jpg", "answer": "a can of soup"},
                       {"image": "VizWiz_test_00000001.jpg", "answer": "blue"},
                       {"image": "VizWiz_test_00000002.jpg", "answer": "unanswerable"}]
    records = predictions("textvqa", "test", ["Starbucks", "1999"])
    results, coverage = server_results(records[::-1], "textvqa", FIXTURES / "textvqa")  # the file's order, not theirs
    assert results == [{"question_id": 39602, "answer": "Starbucks"}, {"question_id": 39603, "answer": "1999"}]
    assert str(coverage) == "answers all 2 questions of textvqa test"


def test_answers_are_post_processed_exactly_as_evaluate_scores_them():
    post = PostProcess(cut=["Question"], quotes=True, stem=str.upper)
    record = {"id": "q", "split": "test", "question_id": 39602, "output": ' "the store" Question: why'}
    (result, _), _ = server_results([record], "textvqa", FIXTURES / "textvqa", post)
    _, rows = evaluate_records([{**record, "answers": ["x"]}], "vqa", post=post)
    assert result["answer"] == rows[0]["prediction"] == "THE STORE"


@pytest.mark.parametrize("change, needle", [
    (lambda rs: [{k: v for k, v in rs[0].items() if k != "question_id"}, rs[1]],
     r"vqav2-262144000: no 'question_id' \(the benchmark's own id, from flamingo data vqav2\)"),
    (lambda rs: [rs[0], {**rs[1], "question_id": 262144000}],
     r"question 262144000 is answered twice, by records vqav2-262144000 and vqav2-524291000"),
    (lambda rs: [rs[0], {**rs[1], "question_id": 262148000}],  # a val question
     r"question 262148000 is not one of the 2 questions of vqav2 test-dev under"),
    (lambda rs: [{**rs[0], "question_id": "262144000"}], r"'question_id' should be an integer for vqav2"),
    (lambda rs: [{**r, "split": "val"} for r in rs], r"scores split test-dev or test, not val"),
    (lambda rs: [rs[0], {**rs[1], "split": "test"}], r"several splits \(test, test-dev\)"),
    (lambda rs: [{k: v for k, v in r.items() if k != "split"} for r in rs], r"vqav2-262144000: no 'split'"),
    (lambda rs: [{k: v for k, v in rs[0].items() if k != "output"}], r"no 'output' \(from generate\)"),
])
def test_bad_predictions_are_refused(change, needle):
    records = predictions("vqav2", "test-dev", ["yes", "two"])
    with pytest.raises(ArtifactError, match=needle):
        server_results(change(records), "vqav2", FIXTURES / "vqav2")


def test_a_missing_question_file_is_named(tmp_path):
    records = predictions("vizwiz", "test", ["x", "y", "z"])
    with pytest.raises(ArtifactError, match=r"Annotations/test\.json: no such file"):
        server_results(records, "vizwiz", tmp_path)


def run(*args, stdin="", cwd=None):
    return subprocess.run([*FLAMINGO, *args], input=stdin, capture_output=True, text=True, cwd=cwd)


def test_cli_from_flamingo_data_to_the_results_file(tmp_path):
    root = FIXTURES / "vqav2"
    r = run("data", "vqav2", str(root), "--split", "test-dev")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert all("answers" not in x for x in records)
    preds = "".join(json.dumps({**x, "output": out}) + "\n" for x, out in zip(records, ["No Question: what", "3"]))
    out = tmp_path / "results.json"
    r = run("evaluate", "-c", "vqav2", "--server", "vqav2", "--root", str(root), "-o", str(out), stdin=preds)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert json.loads(out.read_text()) == [{"question_id": 262144000, "answer": "No"},
                                           {"question_id": 262144001, "answer": ""},
                                           {"question_id": 131074000, "answer": ""},
                                           {"question_id": 524291000, "answer": "3"}]
    assert r.stderr == (f"flamingo: {out}: answers all 2 questions of vqav2 test-dev; it lists the other 2 questions "
                        "of vqav2 test with empty answers, as the server wants every one\n")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temp file left beside it
    r = run("evaluate", "--server", "vqav2", "--root", str(root), stdin=preds)  # - is stdout
    assert r.returncode == 0 and json.loads(r.stdout)[0] == {"question_id": 262144000, "answer": "No Question: what"}


def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path):
    root = FIXTURES / "textvqa"
    twice = "".join(json.dumps({"id": i, "split": "test", "question_id": 39602, "output": "a"}) + "\n" for i in "ab")
    out = tmp_path / "results.json"
    r = run("evaluate", "--server", "textvqa", "--root", str(root), "-o", str(out), stdin=twice)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["Error: question 39602 is answered twice, by records a and b"]
    assert list(tmp_path.iterdir()) == []
    r = run("evaluate", "--server", "textvqa", stdin=twice)
    assert r.returncode == 2 and "--server needs --root" in r.stderr
    r = run("evaluate", "--server", "textvqa", "--root", str(root), "--tag", "shots=0", stdin=twice)
    assert r.returncode == 2 and "are for scoring, not --server" in r.stderr


def test_scoring_a_test_split_points_at_the_server():
    records = predictions("vizwiz", "test", ["x", "y", "z"])
    with pytest.raises(ArtifactError, match=r"vizwiz-VizWiz_test_00000000: split test has no public answers; write "
                       r"the results file of its evaluation server instead \(evaluate --server\)"):
        evaluate_records(records, "vqa")
