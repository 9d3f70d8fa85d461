"""Golden values for two evaluation metrics, computed by the reference implementations.

Writes one JSON file (tests/golden/metrics.json) against which our own pure-Python VQA accuracy
and CIDEr-D can be tested. Nothing from the references is copied here: this script builds the
cases, imports the reference code and calls it.

Environment (the OpenFlamingo venv that tests/golden/README.md describes, plus pycocoevalcap):

    /tmp/ofvenv/bin/pip install pycocoevalcap        # gave pycocoevalcap 1.2 (+ pycocotools 2.0.11)
    /tmp/ofvenv/bin/python tests/golden/make_metric_golden.py tests/golden/metrics.json [--workdir DIR]

No network, no Java, no GPU. The output is deterministic.

VQA accuracy
    Reference: OpenFlamingo 2.0.1, open_flamingo/eval/vqa_metric.py (its copy of the VQA
    evaluator). It is imported the way open_flamingo/eval/evaluate.py imports it
    (`from vqa_metric import compute_vqa_accuracy`, with open_flamingo/eval on sys.path).
    The script writes the three files that evaluate.py hands over (questions JSON, annotations
    JSON, results JSON: a list of {"answer", "question_id"}) into --workdir (default
    /tmp/metricgold) and calls `vqa_metric.compute_vqa_accuracy(results, questions, annotations)`,
    exactly as evaluate.py does: VQA(...), VQA.loadRes(...), VQAEval(vqa, vqaRes, n=2).evaluate().
    Predictions are written as given: evaluate.py's postprocess_vqa_generation (which cuts model
    output at "Question"/"Answer"/"Short"/", ") is applied to raw generations before that point
    and is not part of the metric, so it is not applied here.

    Monkeypatching (the only one): VQAEval keeps per-question accuracies only as
    round(100 * acc, n) (evalQA, evalQuesType, evalAnsType) and the overall only as
    round(100 * mean, n). For the duration of the call, two VQAEval methods are wrapped; each
    wrapper records its arguments and then calls the original method unchanged, so what the
    evaluator computes and returns is untouched:
      * VQAEval.setEvalQA(quesId, acc): `acc` is the evaluator's own unrounded per-question
        accuracy (avgGTAcc, a fraction in [0, 1]) -> "accuracy" of each case. The evaluator's
        rounded value (evalQA[quesId], percent, 2 dp) -> "accuracy_percent_rounded".
      * VQAEval.setAccuracy(accQA, ...): records the evaluator's accQA list and also evaluates the
        original setAccuracy once more on a throwaway copy with n=400, for which Python's round()
        returns its argument unchanged -> "overall_percent_unrounded" is the evaluator's own
        expression 100*float(sum(accQA))/len(accQA) without rounding.
    "overall" is float(sum(accQA)) / len(accQA) over that recorded list (the evaluator's
    expression without the factor 100 and the round); "overall_percent_rounded" is the value
    compute_vqa_accuracy returns, i.e. the number OpenFlamingo reports.

CIDEr-D
    Reference: pycocoevalcap 1.2, `pycocoevalcap.cider.cider.Cider().compute_score(gts, res)`
    (n=4, sigma=6.0), with gts: image id -> list of reference strings and res: image id -> [the
    candidate], all already tokenised (lowercase, tokens joined by single spaces, no
    punctuation). Its PTBTokenizer (Java) is not used. "score" of an image is its entry of the
    scores array compute_score returns (same order as the dict's keys); "mean" is the first
    value it returns. OpenFlamingo's compute_cider goes through COCOEvalCap, which first runs
    the PTB tokenizer and reports 100 * that mean; neither step is part of these numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

# --------------------------------------------------------------------------------------------
# VQA cases: (name, 10 human answers, prediction, note). Notes describe what the case probes.
# --------------------------------------------------------------------------------------------
VQA_CASES = [
    # exact-match predictions, k of the 10 humans agree
    ("agree_0", ["red"] * 6 + ["green"] * 4, "blue", "no human agrees"),
    ("agree_1", ["blue"] + ["red"] * 9, "blue", "1 human agrees"),
    ("agree_2", ["blue"] * 2 + ["red"] * 8, "blue", "2 humans agree"),
    ("agree_3", ["blue"] * 3 + ["red"] * 7, "blue", "3 humans agree"),
    ("agree_4", ["blue"] * 4 + ["red"] * 6, "blue", "4 humans agree"),
    ("agree_5", ["blue"] * 5 + ["red"] * 5, "blue", "5 humans agree"),
    ("agree_10", ["blue"] * 10, "blue", "all 10 agree"),
    # punctuation
    ("pred_trailing_period", ["yes"] * 2 + ["no"] * 8, "yes.", "period not followed by a digit is stripped"),
    ("pred_exclamation", ["no"] * 3 + ["yes"] * 7, "no!", "'!' glued to a word becomes a space"),
    ("thousands_comma", ["2000"] * 2 + ["2,000"] * 1 + ["two thousand"] * 7, "2,000",
     "digit,digit: punctuation removed (not spaced), in prediction and human answers"),
    ("comma_digit_removes_hyphen", ["10000 20000"] * 7 + ["10,000-20,000"] * 3, "10,000-20,000",
     "a digit,digit anywhere makes every punctuation mark be removed, so '-' is not spaced"),
    ("punct_next_to_space_removed", ["black tshirt"] * 3 + ["black t shirt"] * 7, "black - t-shirt",
     "'-' occurs next to a space, so every '-' is removed rather than spaced"),
    ("slash", ["red white"] * 1 + ["red/white"] * 1 + ["red and white"] * 8, "red/white",
     "'/' glued to words becomes a space"),
    ("hyphen_tshirt", ["t shirt"] * 1 + ["t-shirt"] * 2 + ["tshirt"] * 7, "t-shirt",
     "'-' becomes a space; 'tshirt' stays different"),
    ("decimal_kept", ["3.5"] * 2 + ["35"] * 8, "3.5", "period followed by a digit is kept"),
    ("decimal_trailing_period", ["3.5"] * 3 + ["4"] * 7, "3.5.", "only the final period is stripped"),
    ("periods_inside_word", ["usa"] * 3 + ["america"] * 7, "u.s.a.", "all periods not before a digit go"),
    ("period_strip_count_32", ["yes"] * 10, "yes" + "." * 40,
     "periodStrip.sub gets re.UNICODE (=32) as its count argument: only 32 periods are removed"),
    ("dollar_not_punct", ["$5"] * 1 + ["5"] * 9, "$5", "'$' is not in the punctuation list"),
    ("colon_not_punct", ["12:30"] * 2 + ["1230"] * 8, "12:30", "':' is not in the punctuation list"),
    ("its_vs_it_s", ["it's"] * 2 + ["its"] * 8, "it's", "apostrophe kept; 'its' is not a contraction key"),
    # articles
    ("article_the", ["cat"] * 2 + ["the cat"] * 1 + ["dog"] * 7, "the cat", "articles dropped on both sides"),
    ("article_a", ["dog"] * 2 + ["puppy"] * 8, "a dog", "article dropped"),
    # whitespace and case
    ("pred_surrounding_spaces", ["yes"] * 2 + ["no"] * 8, "  yes  ", "leading/trailing spaces"),
    ("pred_tab", ["blue sky"] * 3 + ["sky"] * 7, "\tblue\tsky", "tabs become spaces"),
    ("pred_newline", ["yes"] * 3 + ["no"] * 7, "yes\n", "newline becomes a space, then stripped"),
    ("pred_inner_newline", ["blue sky"] * 2 + ["sky"] * 8, "blue\nsky", "inner newline becomes a space"),
    ("human_whitespace", [" yes", "yes ", "\tyes"] + ["no"] * 7, "yes", "human answers are stripped too"),
    ("uppercase", ["yes", "Yes", "YES"] + ["no"] * 7, "Yes", "lowercased on both sides"),
    # number words
    ("number_word_two", ["2"] * 2 + ["two"] * 1 + ["3"] * 7, "two", "number words map to digits"),
    ("number_word_ten", ["10"] * 4 + ["11"] * 6, "ten", "'ten' -> '10'"),
    ("none_vs_0", ["0"] * 2 + ["zero"] * 1 + ["1"] * 7, "none", "'none' -> '0'"),
    ("zero_vs_none", ["none"] * 2 + ["1"] * 8, "zero", "'zero' and 'none' both -> '0'"),
    ("number_word_in_phrase", ["2 dogs"] * 3 + ["dogs"] * 7, "two dogs", "mapping is per word"),
    # contractions
    ("contraction_isnt", ["isn't"] * 3 + ["no"] * 7, "isnt", "'isnt' -> \"isn't\""),
    ("contraction_whats", ["what's"] * 1 + ["whats"] * 1 + ["nothing"] * 8, "whats",
     "'whats' -> \"what's\" on both sides"),
    ("contraction_dont", ["don't"] * 2 + ["dont"] * 1 + ["no"] * 7, "dont", "'dont' -> \"don't\" on both sides"),
    # unanimous human answers (the GT-Vision-Lab original skips human-answer punctuation
    # processing when all 10 are identical; this copy does not -- see the report)
    ("unanimous_yes_period", ["yes."] * 10, "yes", "all ten 'yes.'"),
    ("unanimous_tshirt_spaced", ["t-shirt"] * 10, "t shirt", "all ten 't-shirt', prediction 't shirt'"),
    ("unanimous_tshirt_joined", ["t-shirt"] * 10, "tshirt", "all ten 't-shirt', prediction 'tshirt'"),
    ("unanimous_number_word", ["two"] * 10, "2", "all ten 'two', prediction '2'"),
    # mixed human answers with punctuation
    ("mixed_punct_humans", ["yes.", "yes", "Yes", "yes!", "no", "no.", "No!", "maybe", "yes ", "yes?"], "no.",
     "human answers normalised one by one"),
]

# --------------------------------------------------------------------------------------------
# CIDEr-D corpora: (name, [(image id, [refs], candidate)]). Pre-tokenised lowercase text.
# --------------------------------------------------------------------------------------------
SURF_REFS = [
    "a man riding a wave on top of a surfboard",
    "a surfer riding a large wave in the ocean",
    "a person on a surfboard riding a wave",
    "man surfing on a big blue wave",
]
CIDER_CORPORA = [
    ("main", [
        ("surf", SURF_REFS, SURF_REFS[0]),  # identical to a reference
        ("dogs", [
            "two dogs playing with a frisbee in the grass",
            "a pair of dogs chase a frisbee on a lawn",
            "two brown dogs running in a grassy field",
        ], "grass playing frisbee dogs two the"),  # shares unigrams only, no bigram
        ("cat", [
            "a cat sitting on a wooden bench",
            "a black cat resting on a park bench",
            "a cat sits on a bench outside",
            "the black cat is lying on the bench",
            "a small cat on a bench in the sun",
        ], "cat"),  # one word
        ("plate", [
            "a plate of food with broccoli and rice",
            "a dinner plate with rice and vegetables",
            "broccoli and rice served on a white plate",
        ], "a white plate of food with broccoli and rice and chicken and some other vegetables "
           "on a wooden table next to a glass of water and a fork"),  # long: length penalty
        ("bus", [
            "a red double decker bus driving down a street",
            "a double decker bus on a city street",
            "a red bus is parked next to the sidewalk",
            "a tall red bus traveling down the road",
        ], "a red bus driving down the street"),  # partial overlap, similar length
        ("kitchen", [
            "a kitchen with white cabinets and a stove",
            "a small kitchen with a refrigerator and a sink",
            "an empty kitchen with wooden floors",
        ], "a red bus on a street"),  # unrelated
    ]),
    ("single_image", [
        ("surf", SURF_REFS, SURF_REFS[0]),  # one image: idf = log(1) - log(df) = 0 everywhere
    ]),
    ("edge_cases", [
        ("empty", ["a dog on a beach", "a brown dog running on sand", "dog at the beach"], ""),
        ("repeats", ["a cat on a mat", "a grey cat lying on a mat", "cat sleeping on a mat"],
         "a a a a a a cat"),  # clipping: min(hyp, ref) tf-idf
        ("duplicate_refs", ["a dog", "a dog", "a brown dog running in a field"], "a dog"),
        ("one_word_refs", ["bicycle", "bike", "a bicycle"], "bicycle"),
    ]),
]


def _reference_versions() -> dict:
    out = {}
    for dist in ("open-flamingo", "pycocoevalcap"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _import_vqa_metric():
    """Import open_flamingo/eval/vqa_metric.py as evaluate.py does (eval dir on sys.path)."""
    spec = importlib.util.find_spec("open_flamingo")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("open_flamingo is not installed in this interpreter; use /tmp/ofvenv/bin/python")
    eval_dir = Path(list(spec.submodule_search_locations)[0]) / "eval"
    sys.path.insert(0, str(eval_dir))
    import vqa_metric  # noqa: E402
    return vqa_metric, eval_dir / "vqa_metric.py"


def run_vqa(workdir: Path) -> dict:
    vqa_metric, path = _import_vqa_metric()
    workdir.mkdir(parents=True, exist_ok=True)

    questions = {"info": {"description": "golden cases"}, "task_type": "Open-Ended", "data_type": "mscoco",
                 "data_subtype": "golden", "license": {}, "questions": []}
    annotations = {"info": {}, "license": {}, "data_subtype": "golden", "annotations": []}
    results = []
    ids = []
    for i, (name, answers, prediction, _note) in enumerate(VQA_CASES):
        assert len(answers) == 10, name
        qid = 1000 + i
        ids.append(qid)
        questions["questions"].append({"image_id": i, "question": name, "question_id": qid})
        annotations["annotations"].append({
            "question_id": qid, "image_id": i, "question_type": "golden", "answer_type": "other",
            "multiple_choice_answer": answers[0],
            # distinct answer_id as in the VQA v2 files: VQAEval compares whole answer dicts
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                        for j, a in enumerate(answers)],
        })
        results.append({"answer": prediction, "question_id": qid})

    q_path, a_path, r_path = workdir / "questions.json", workdir / "annotations.json", workdir / "results.json"
    q_path.write_text(json.dumps(questions, indent=1))
    a_path.write_text(json.dumps(annotations, indent=1))
    r_path.write_text(json.dumps(results, indent=4))

    cls = vqa_metric.VQAEval
    orig_set_eval_qa, orig_set_accuracy = cls.setEvalQA, cls.setAccuracy
    captured = {"acc": {}, "accQA": None, "overall_unrounded": None, "evalQA": None}

    def set_eval_qa(self, quesId, acc):
        captured["acc"][quesId] = acc
        out = orig_set_eval_qa(self, quesId, acc)
        captured["evalQA"] = self.evalQA
        return out

    def set_accuracy(self, accQA, accQuesType, accAnsType):
        captured["accQA"] = list(accQA)
        probe = copy.copy(self)
        probe.accuracy, probe.n = {}, 400  # round(x, 400) returns x unchanged
        orig_set_accuracy(probe, accQA, accQuesType, accAnsType)
        captured["overall_unrounded"] = probe.accuracy["overall"]
        return orig_set_accuracy(self, accQA, accQuesType, accAnsType)

    cls.setEvalQA, cls.setAccuracy = set_eval_qa, set_accuracy
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the evaluator prints progress
            reported = vqa_metric.compute_vqa_accuracy(str(r_path), str(q_path), str(a_path))
    finally:
        cls.setEvalQA, cls.setAccuracy = orig_set_eval_qa, orig_set_accuracy

    assert sorted(captured["acc"]) == sorted(ids)
    cases = []
    for qid, (name, answers, prediction, note) in zip(ids, VQA_CASES):
        cases.append({"name": name, "answers": answers, "prediction": prediction,
                      "accuracy": captured["acc"][qid],
                      "accuracy_percent_rounded": captured["evalQA"][qid], "note": note})
    acc_qa = captured["accQA"]
    return {
        "source": (f"open-flamingo {_reference_versions()['open-flamingo']}: "
                   f"open_flamingo/eval/vqa_metric.py compute_vqa_accuracy() -> VQA, VQA.loadRes, "
                   f"VQAEval(n=2).evaluate(). 'accuracy' = the unrounded acc VQAEval passes to "
                   f"setEvalQA (captured by a pass-through wrapper); 'accuracy_percent_rounded' = "
                   f"VQAEval.evalQA (round(100*acc, 2)); 'overall' = float(sum(accQA))/len(accQA) "
                   f"over the accQA list VQAEval passes to setAccuracy; 'overall_percent_unrounded' "
                   f"= VQAEval.setAccuracy's own expression evaluated with n=400 (no rounding); "
                   f"'overall_percent_rounded' = compute_vqa_accuracy's return value (what "
                   f"OpenFlamingo reports). See tests/golden/make_metric_golden.py."),
        "cases": cases,
        "overall": float(sum(acc_qa)) / len(acc_qa),
        "overall_percent_unrounded": captured["overall_unrounded"],
        "overall_percent_rounded": reported,
    }


def run_cider() -> dict:
    from pycocoevalcap.cider.cider import Cider

    corpora = []
    for name, images in CIDER_CORPORA:
        gts = {img_id: list(refs) for img_id, refs, _ in images}
        res = {img_id: [cand] for img_id, _, cand in images}
        for img_id, refs, cand in images:  # inputs must already be tokenised
            for s in refs + [cand]:
                assert s == " ".join(s.split()) and s == s.lower() and s.replace(" ", "").isalnum() or s == "", s
        mean, scores = Cider().compute_score(gts, res)
        corpora.append({
            "name": name,
            "images": [{"id": img_id, "refs": list(refs), "candidate": cand, "score": float(s)}
                       for (img_id, refs, cand), s in zip(images, scores)],
            "mean": float(mean),
        })
    return {
        "source": (f"pycocoevalcap {_reference_versions()['pycocoevalcap']}: "
                   f"pycocoevalcap.cider.cider.Cider().compute_score(gts, res) (n=4, sigma=6.0; "
                   f"no PTBTokenizer). 'score' = the per-image entry of the returned scores array "
                   f"(order of the gts keys); 'mean' = the returned corpus score (numpy mean of the "
                   f"array). Not multiplied by 100."),
        "corpora": corpora,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output JSON, e.g. tests/golden/metrics.json")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/metricgold"),
                    help="scratch dir for the VQA question/annotation/result files")
    args = ap.parse_args()
    data = {"vqa": run_vqa(args.workdir), "cider": run_cider()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
