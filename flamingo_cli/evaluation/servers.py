"""Evaluation-server result files: predictions on a test split whose answers are not public -> the
JSON file the benchmark's server scores.

  vqav2    EvalAI, VQA Challenge (phases Test-Dev, Test-Standard, Test-Challenge):
           [{"question_id": int, "answer": str}, ...] (visualqa.org/evaluation.html). The server's
           evaluator asserts that the file answers exactly the questions of test2015, whatever the
           phase, so predictions on test-dev list the rest of test2015 with empty answers, as
           OpenFlamingo's and LLaVA's submission scripts do; only test-dev's are scored there.
  vizwiz   EvalAI, VizWiz VQA: [{"image": "VizWiz_test_00000000.jpg", "answer": str}, ...], every
           test image (the evaluator looks each one up).
  textvqa  EvalAI, TextVQA: [{"question_id": int, "answer": str}, ...], every test question.

Answers are post-processed exactly as `evaluate` post-processes them for scoring (the same
PostProcess: cut, quotes, stem); the servers then apply the VQA evaluator's own normalisation
(case, punctuation, number words, articles), as evaluate's vqa metric does, so it is not applied
here. The predictions must name the benchmark's own question ids (`question_id`, which `flamingo
data` writes: VQAv2's and TextVQA's integers, VizWiz's image file names), each once, all of the
split the records say they come from (`split`); questions they leave out get empty answers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..formats.artifacts import ArtifactError
from .benchmarks import read_benchmark
from .evaluate import PostProcess, answer


@dataclass(frozen=True)
class Server:
    benchmark: str
    listed: dict[str, str]  # split of the predictions -> the split whose questions the file lists
    key: str  # the field naming a result's question
    kind: type  # its type in the file


SERVERS = {
    "vqav2": Server("vqav2", {"test-dev": "test", "test": "test"}, "question_id", int),
    "vizwiz": Server("vizwiz", {"test": "test"}, "image", str),
    "textvqa": Server("textvqa", {"test": "test"}, "question_id", int),
}


@dataclass(frozen=True)
class Coverage:
    """How much of its split a results file answers."""
    server: str
    split: str  # the predictions'
    answered: int
    questions: int  # in the predictions' split
    listed_split: str
    listed: int  # entries in the file

    def __str__(self) -> str:
        share = f"{self.answered} of the" if self.answered < self.questions else "all"
        text = f"answers {share} {self.questions} questions of {self.server} {self.split}"
        if self.listed > self.answered:
            text += (f"; it lists the other {self.listed - self.answered} questions of {self.server} "
                     f"{self.listed_split} with empty answers, as the server wants every one")
        return text


def _split(records: list[dict], server: str, spec: Server) -> str:
    splits = {r.get("split") for r in records}
    if len(splits) > 1:
        raise ArtifactError(f"{server}: the records come from several splits ({', '.join(sorted(map(str, splits)))})")
    (split,) = splits
    if split is None:
        raise ArtifactError(f"{records[0]['id']}: no 'split' (the records of flamingo data {server} carry it)")
    if split not in spec.listed:
        raise ArtifactError(f"{server}'s evaluation server scores split {' or '.join(spec.listed)}, "
                            f"not {split} (its answers are public: score them with --metric vqa)")
    return split


def _answers(records: list[dict], server: str, spec: Server, post: PostProcess) -> dict[Any, str]:
    """question id -> answer, each question answered once."""
    answers: dict[Any, str] = {}
    by: dict[Any, Any] = {}
    for r in records:
        qid = r.get("question_id")
        if qid is None:
            raise ArtifactError(f"{r['id']}: no 'question_id' (the benchmark's own id, from flamingo data {server})")
        if isinstance(qid, bool) or not isinstance(qid, spec.kind):
            raise ArtifactError(f"{r['id']}: 'question_id' should be {'an integer' if spec.kind is int else 'a string'}"
                                f" for {server}, got {qid!r}")
        if qid in answers:
            raise ArtifactError(f"question {qid!r} is answered twice, by records {by[qid]} and {r['id']}")
        answers[qid], by[qid] = answer(r, post), r["id"]
    return answers


def server_results(records: list[dict], server: str, root: str | Path,
                   post: PostProcess | None = None) -> tuple[list[dict], Coverage]:
    """(the results file's entries, in the question file's order; its coverage) for predictions on
    `server`'s test split, checked against that split's question file under `root` (the
    benchmark's download, as `flamingo data` reads it)."""
    spec = SERVERS.get(server)
    if spec is None:
        raise ArtifactError(f"unknown evaluation server {server!r} (known: {', '.join(SERVERS)})")
    if not records:
        raise ArtifactError("no prediction records")
    split = _split(records, server, spec)
    answers = _answers(records, server, spec, post or PostProcess())
    questions = [q["question_id"] for q in read_benchmark(spec.benchmark, root, split)]
    asked = set(questions)
    for qid in answers:
        if qid not in asked:
            raise ArtifactError(f"question {qid!r} is not one of the {len(questions)} questions of "
                                f"{server} {split} under {root}")
    listed_split = spec.listed[split]
    listed = (questions if listed_split == split
              else [q["question_id"] for q in read_benchmark(spec.benchmark, root, listed_split)])
    if not asked <= set(listed):
        raise ArtifactError(f"{root}: {server} {split} has questions that {listed_split} lacks")
    results = [{spec.key: qid, "answer": answers.get(qid, "")} for qid in listed]
    return results, Coverage(server, split, len(answers), len(questions), listed_split, len(listed))
