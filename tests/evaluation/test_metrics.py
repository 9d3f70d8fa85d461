"""The metrics against their reference implementations and hand-computed cases.

tests/golden/metrics.json was written by tests/golden/make_metric_golden.py, which calls
OpenFlamingo's copy of the VQA evaluator and pycocoevalcap's CIDEr-D scorer.
"""
from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from flamingo_cli.evaluation.metrics import (
    cider_d,
    cut_at,
    normalize_vqa_answer,
    ptb_tokenize,
    roc_auc,
    strip_quotes,
    top1,
    vqa_accuracy,
)

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "golden" / "metrics.json").read_text())
VQA_CASES = {c["name"]: c for c in GOLDEN["vqa"]["cases"]}
# Where the official evaluator and OpenFlamingo's copy disagree: the official one leaves human
# answers as they are (only punctuation, and only when they are not unanimous). Hand-computed:
# the number of human answers equal to the normalised prediction k gives 0, .3, .6, .9, 1.
OFFICIAL_DIFFERS = {
    "article_the": 0.6,  # "cat" matches the two "cat", not "the cat"
    "uppercase": 0.3,  # "yes" matches "yes" only, not "Yes" or "YES"
    "number_word_two": 0.6,  # "2" matches the two "2", not "two"
    "none_vs_0": 0.6,  # "0": the two "0", not "zero"
    "zero_vs_none": 0.0,  # "0" against humans' "none"
    "contraction_whats": 0.3,  # "what's" matches "what's"; "whats" stays as written
    "contraction_dont": 0.6,
    "unanimous_yes_period": 0.0,  # ten "yes." are unanimous, so their period stays
    "unanimous_tshirt_spaced": 0.0,
    "unanimous_number_word": 0.0,
    "mixed_punct_humans": 0.6,  # "no" and "no." -> "no"; "No!" -> "No " (not lowercased)
}


@pytest.mark.parametrize("name", sorted(VQA_CASES))
def test_vqa_accuracy_matches_openflamingos_evaluator(name):
    case = VQA_CASES[name]
    assert vqa_accuracy(case["prediction"], case["answers"], "openflamingo") == pytest.approx(case["accuracy"], abs=1e-12)


@pytest.mark.parametrize("name", sorted(VQA_CASES))
def test_vqa_accuracy_official(name):
    case = VQA_CASES[name]
    expected = OFFICIAL_DIFFERS.get(name, case["accuracy"])
    assert vqa_accuracy(case["prediction"], case["answers"]) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_for_each_agreement_count():
    for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]:
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
        # The definition itself: the mean over leave-one-out subsets of min(1, matches / 3).
        direct = sum(min(1, sum(a == "cat" for j, a in enumerate(answers) if j != i) / 3) for i in range(10)) / 10
        assert vqa_accuracy("cat", answers) == pytest.approx(direct, abs=1e-12)


def test_vqa_normalisation_traps():
    assert normalize_vqa_answer("yes.") == "yes"
    assert normalize_vqa_answer("2,000") == "2000"  # digit,digit: commas deleted, not spaced
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("the cat") == "cat"
    assert normalize_vqa_answer("Two Dogs") == "2 dogs"
    assert normalize_vqa_answer("red/white") == "red white"
    assert normalize_vqa_answer("3.5") == "3.5"
    assert normalize_vqa_answer(" none\t") == "0"


def test_cider_d_matches_pycocoevalcap():
    for corpus in GOLDEN["cider"]["corpora"]:
        candidates = {im["id"]: im["candidate"] for im in corpus["images"]}
        references = {im["id"]: im["refs"] for im in corpus["images"]}
        mean, per_image = cider_d(candidates, references, tokenize=str.split)
        assert mean == pytest.approx(corpus["mean"], abs=1e-6), corpus["name"]
        for im in corpus["images"]:
            assert per_image[im["id"]] == pytest.approx(im["score"], abs=1e-6), (corpus["name"], im["id"])


def test_cider_d_tokenises_like_ptb_before_scoring():
    main = next(c for c in GOLDEN["cider"]["corpora"] if c["name"] == "main")
    # Capitals and punctuation the PTB tokenizer strips leave the scores unchanged.
    candidates = {im["id"]: im["candidate"].capitalize() + "." for im in main["images"]}
    references = {im["id"]: [r.upper() + " ." for r in im["refs"]] for im in main["images"]}
    mean, _ = cider_d(candidates, references)
    assert mean == pytest.approx(main["mean"], abs=1e-6)


def test_ptb_tokenizer_approximation():
    assert ptb_tokenize("A man's dog, isn't it?") == ["a", "man", "'s", "dog", "is", "n't", "it"]
    assert ptb_tokenize('He wore a T-shirt (2,000 "dollars")...') == ["he", "wore", "a", "t-shirt", "2,000", "dollars"]
    assert ptb_tokenize("can't stop; 3.5 inches!") == ["ca", "n't", "stop", "3.5", "inches"]


def test_roc_auc_matches_the_pairwise_definition():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(4, 40)
        labels = [rng.randint(0, 1) for _ in range(n)]
        labels[0], labels[1] = 0, 1
        scores = [round(rng.random(), 1) for _ in range(n)]  # coarse: many ties
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        direct = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg)) / (len(pos) * len(neg))
        assert roc_auc(labels, scores) == pytest.approx(direct, abs=1e-12)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.2, 0.3])


def test_top1_and_post_processing():
    assert top1(["tench", "goldfish "], ["tench", "shark"]) == 0.5
    assert cut_at("a red bus Question: what", ["Question", "Answer"]) == "a red bus "
    assert cut_at("2, 3 Answer", ["Answer", ", "]) == "2"
    assert cut_at("no marker", ["Question"]) == "no marker"
    assert strip_quotes('a "quoted" word') == "a quoted word"


def test_exact_match_forgives_only_surface_form():
    from flamingo_cli.evaluation.metrics import exact_match

    assert exact_match("A man.", "man") == 1.0 and exact_match("Two", "2") == 1.0
    assert exact_match("a woman", "man") == 0.0 and exact_match("men", "man") == 0.0


def test_ivqa_accuracy_by_hand():
    from flamingo_cli.evaluation.metrics import ivqa_accuracy

    answers = ["onion", "onion", "red onion", "garlic", "onion"]
    assert ivqa_accuracy("onion", answers) == 1.0  # three annotators: capped at 1
    assert ivqa_accuracy("red onion", answers) == 0.5  # one of five: 1/2
    assert ivqa_accuracy("Garlic.", answers) == 0.5  # normalised like VQA answers
    assert ivqa_accuracy("leek", answers) == 0.0
    assert ivqa_accuracy("knife", ["knife", "scissors", "knife", "saw", "saw"]) == 1.0  # two: min(2/2, 1)


def test_rareact_mwap_by_hand():
    """tests/fixtures/benchmarks/rareact: for "cut laptop", row 1 is the positive; rows 2 and 6
    (annotated 0) and row 4 (blow leaf's positive, sharing no word) are negatives, row 3 (annotated
    2) a hard negative; rows 4 and 6 share video vC, so each weighs 1/2 among the negatives. Ranked
    6 (0.99), 2 (0.95), 1 (0.9), ...: the positive comes after 1.5 weight of negatives, so
    AP = 1 / 2.5 = 0.4 (unweighted: 1/3). "blow leaf" ranks its positive first: AP 1. "cut leaf"
    has no positive and is left out. mWAP = 0.7."""
    from flamingo_cli.evaluation.benchmarks import read_benchmark
    from flamingo_cli.evaluation.metrics import rareact_mwap, weighted_average_precision

    rows = read_benchmark("rareact", Path(__file__).resolve().parents[1] / "fixtures/benchmarks/rareact", "test")
    cut_laptop = {"rareact-1": 0.9, "rareact-2": 0.95, "rareact-3": 0.1, "rareact-4": 0.5, "rareact-5": 0.3,
                  "rareact-6": 0.99}
    blow_leaf = {"rareact-1": 0.1, "rareact-4": 0.2}
    for r in rows:
        r["scores"] = {"cut laptop": cut_laptop[r["id"]], "blow leaf": blow_leaf.get(r["id"], 0.0), "cut leaf": 0.0}
    mean, aps = rareact_mwap(rows)
    assert aps == pytest.approx({"cut laptop": 0.4, "blow leaf": 1.0}) and mean == pytest.approx(0.7)

    # Ties share a threshold, as scikit-learn's average_precision_score treats them.
    assert weighted_average_precision([1, 0, 1], [0.5, 0.5, 0.1], [1, 1, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_vqa_accuracy_by_answer_type_averages_each_questions_accuracy():
    from flamingo_cli.evaluation.metrics import vqa_accuracy_by_type

    # Accuracies 1, 0.6 (yes/no), 0.9 (number), 0: per type the mean of the questions' own
    # (leave-one-out averaged) accuracies, in percent, with the count; sorted by type.
    table = vqa_accuracy_by_type(["yes/no", "number", "yes/no", "other"], [1.0, 0.9, 0.6, 0.0])
    assert table == {"number": {"accuracy": pytest.approx(90.0), "n": 1}, "other": {"accuracy": 0.0, "n": 1},
                     "yes/no": {"accuracy": pytest.approx(80.0), "n": 2}}
    assert list(table) == ["number", "other", "yes/no"]
    # Not the last leave-one-out subset's accuracy (an early vqaEval.py's slip): k = 2 matches of
    # ten gives 0.6 for the question, though the subset leaving out the last ("no") answer gives 1/3.
    answers = ["yes"] * 8 + ["no"] * 2
    assert vqa_accuracy("no", answers) == pytest.approx(0.6)
    assert vqa_accuracy_by_type(["yes/no"], [vqa_accuracy("no", answers)])["yes/no"]["accuracy"] == pytest.approx(60.0)


def test_top_k_keeps_candidate_order_among_equal_scores():
    from flamingo_cli.evaluation.metrics import top_k

    scores = {"a": -3.0, "b": -1.0, "c": -3.0, "d": -2.0, "e": -3.0, "f": -3.0, "g": -4.0}
    assert top_k(scores, 5) == ["b", "d", "a", "c", "e"]  # f ties with a, c, e but comes after them
    assert top_k(scores, 1) == [max(scores, key=scores.get)]  # top-1's tie rule: the first maximum
    assert top_k({"x": 0.0, "y": 0.0}, 1) == ["x"]
    assert top_k(scores, 10) == ["b", "d", "a", "c", "e", "f", "g"]
