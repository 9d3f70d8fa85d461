"""The `evaluate` stage as library functions: prediction records + references -> a score.

Predictions are the records `generate` writes (`output`) or `score` writes (`scores`,
`prediction`). References travel in the same records (the benchmark adapters put them in the
query records, and every stage passes them through), or come from a separate file joined by id.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..formats.artifacts import ArtifactError
from .captions import caption_metrics
from .metrics import (cider_d, cut_at, exact_match, ivqa_accuracy, rareact_mwap, roc_auc, strip_quotes, top1, top_k,
                      vqa_accuracy, vqa_accuracy_by_type)
from .retrieval import visdial_metrics

METRICS = ("vqa", "cider", "captions", "top1", "roc_auc", "exact", "ivqa", "mwap", "wups", "visdial")
# The fields each metric reads its references from.
REFERENCE_FIELDS = {"vqa": ("answers",), "cider": ("captions", "caption"), "captions": ("captions", "caption"),
                    "top1": ("label",),
                    "roc_auc": ("label", "label_id"), "exact": ("label",), "ivqa": ("answers",),
                    "mwap": ("annotation",), "wups": ("answers",),
                    "visdial": ("candidates", "gt_index", "label", "relevance")}
# What else --references joins for a metric: the fields its breakdowns read.
BREAKDOWN_FIELDS = {"vqa": ("answer_type", "question_type")}
# top5 is left out where every label is in the top five (STAR's four choices).
TOP5_MIN_CANDIDATES = 6


@dataclass
class PostProcess:
    """How a generated text becomes an answer, as the peers do it."""
    cut: Sequence[str] = ()  # cut the text at the first of these (e.g. "Question", "Output")
    quotes: bool = False  # delete double quotes
    stem: Callable[[str], str] | None = None  # last, e.g. okvqa.OkvqaStemmer (OpenFlamingo's OK-VQA)

    def __call__(self, text: str) -> str:
        text = cut_at(text, self.cut)
        if self.quotes:
            text = strip_quotes(text)
        text = text.strip()
        return self.stem(text) if self.stem is not None else text


def merge_ensembles(records: list[dict]) -> list[dict]:
    """One record per id. Records sharing an id are one query's prompt ensemble (`prompt
    --ensembles`): their candidate log-likelihoods are averaged and the prediction re-ranked."""
    groups: dict[str, list[dict]] = {}
    for record in records:
        if "id" not in record:
            raise ArtifactError("a prediction record has no 'id'")
        groups.setdefault(str(record["id"]), []).append(record)
    out = []
    for rid, group in groups.items():
        if len(group) == 1:
            out.append(group[0])
            continue
        if not all(isinstance(r.get("scores"), dict) for r in group):
            raise ArtifactError(f"{rid}: {len(group)} records share this id but not all have 'scores' to average")
        candidates = list(group[0]["scores"])
        if any(list(r["scores"]) != candidates for r in group):
            raise ArtifactError(f"{rid}: the records of its prompt ensemble score different candidates")
        mean = {c: sum(r["scores"][c] for r in group) / len(group) for c in candidates}
        best = max(mean, key=mean.__getitem__)
        merged = {k: v for k, v in group[0].items() if k not in ("ensemble", "shots", "prompt", "media")}
        merged.update(scores=mean, prediction=best, ensemble_shots=[r.get("shots") for r in group])
        out.append(merged)
    return out


def join_references(records: list[dict], references: list[dict], metric: str) -> list[dict]:
    """Add the metric's reference fields from `references` (matched by id) to each record."""
    by_id = {str(r.get("id")): r for r in references}
    out = []
    for record in records:
        ref = by_id.get(str(record["id"]))
        if ref is None:
            raise ArtifactError(f"{record['id']}: not in the references")
        fields = (*REFERENCE_FIELDS[metric], *BREAKDOWN_FIELDS.get(metric, ()))
        out.append({**record, **{f: ref[f] for f in fields if f in ref}})
    return out


def answer(record: dict, post: PostProcess) -> str:
    """A prediction record's answer: its generation (or score's best candidate), post-processed."""
    text = record.get("output", record.get("prediction"))
    if not isinstance(text, str):
        raise ArtifactError(f"{record['id']}: no 'output' (from generate) or 'prediction' (from score)")
    return post(text)


def _answer_types(records: list[dict], rows: list[dict]) -> dict | None:
    """The vqa summary's by_answer_type, where the records carry answer_type (VQAv2, OK-VQA,
    VizWiz); each row gets its record's answer_type and question_type."""
    if not any("answer_type" in r for r in records):
        return None
    for row, r in zip(rows, records):
        if not isinstance(r.get("answer_type"), str):
            raise ArtifactError(f"{r['id']}: no 'answer_type' string, while other records have one "
                                "(the per-answer-type accuracies need every record's)")
        row.update({k: r[k] for k in BREAKDOWN_FIELDS["vqa"] if k in r})
    return vqa_accuracy_by_type([r["answer_type"] for r in records], [row["score"] for row in rows])


def _top5(records: list[dict], labels: list[str], rows: list[dict]) -> float | None:
    """top5 in percent: the label among the five best-scored candidates (ties as top-1 breaks
    them), where every record has `scores` over more than five candidates; rows get theirs."""
    if not all(isinstance(r.get("scores"), dict) and len(r["scores"]) >= TOP5_MIN_CANDIDATES for r in records):
        return None
    for row, r, label in zip(rows, records, labels):
        row["top5"] = float(label.strip() in {c.strip() for c in top_k(r["scores"], 5)})
    return 100 * sum(row["top5"] for row in rows) / len(rows)


def _reference(record: dict, metric: str):
    for field in REFERENCE_FIELDS[metric]:
        if field in record:
            return record[field]
    raise ArtifactError(f"{record['id']}: no reference for {metric} (expected field "
                        f"{' or '.join(REFERENCE_FIELDS[metric])}; join them with --references FILE)")


def _positive_probability(record: dict, positive: str, negative: str) -> float:
    """P(positive) from the two candidates' log-likelihoods, normalised over the pair."""
    scores = record.get("scores")
    if not isinstance(scores, dict) or positive not in scores or negative not in scores:
        raise ArtifactError(f"{record['id']}: roc_auc needs 'scores' for {positive!r} and {negative!r} (from score)")
    return 1.0 / (1.0 + math.exp(scores[negative] - scores[positive]))


def evaluate_records(records: list[dict], metric: str, *, post: PostProcess | None = None,
                     positive: str = "yes", negative: str = "no",
                     vqa_evaluator: str = "official", caption_backend: str = "auto") -> tuple[dict, list[dict]]:
    """(summary, per-example rows). The summary's `score` is on the papers' scale: VQA accuracy,
    CIDEr-D (x100 of pycocoevalcap's mean), top-1, ROC-AUC and WUPS all in percent. vqa adds
    by_answer_type ({type: {"accuracy", "n"}}) where the records carry answer_type; top1 adds top5
    over score records' `scores` (more than five candidates); wups adds NExT-QA's table: wups9
    (WUPS@0.9), by_group (WUPS_C/T/D) and by_type. captions: evaluation.captions' suite on
    `caption_backend`, its CIDEr-D as the score, with bleu1..bleu4, meteor, rouge_l, cider, spice,
    backend, tokenizer and missing; rows get the per-image values and their CIDEr-D as score, all
    x100. visdial: NDCG x100 over the densely annotated rounds as the score, with mrr, r1, r5, r10,
    mean_rank and n_dense (evaluation.retrieval)."""
    if metric not in METRICS:
        raise ArtifactError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")
    if not records:
        raise ArtifactError("no prediction records")
    post = post or PostProcess()
    records = merge_ensembles(records)
    if metric == "visdial":  # a ranking of every round's candidates, with its own summary
        return visdial_metrics(records)
    rows = [{"id": r["id"]} for r in records]
    extra: dict = {}
    if metric in ("vqa", "ivqa"):
        for row, r in zip(rows, records):
            if "answers" not in r and str(r.get("split", "")).startswith("test"):
                raise ArtifactError(f"{r['id']}: split {r['split']} has no public answers; write the "
                                    "results file of its evaluation server instead (evaluate --server)")
            answers = _reference(r, metric)
            if not isinstance(answers, list) or not answers:
                raise ArtifactError(f"{r['id']}: 'answers' must be a non-empty list of human answers")
            row["prediction"] = answer(r, post)
            row["score"] = (vqa_accuracy(row["prediction"], answers, vqa_evaluator) if metric == "vqa"
                            else ivqa_accuracy(row["prediction"], answers))
        score = 100 * sum(row["score"] for row in rows) / len(rows)
        if metric == "vqa" and (by_type := _answer_types(records, rows)) is not None:
            extra["by_answer_type"] = by_type
    elif metric == "mwap":
        for row, r in zip(rows, records):
            scores = r.get("scores")
            if not isinstance(scores, dict) or not scores:
                raise ArtifactError(f"{r['id']}: mwap needs 'scores' over every class (score --candidates CLASSES)")
            for key in ("verb", "noun", "annotation", "video_id"):
                if key not in r:
                    raise ArtifactError(f"{r['id']}: mwap needs '{key}' (from flamingo data rareact)")
            row.update(prediction=max(scores, key=scores.get), label=r.get("label"))
        try:
            mean, _ = rareact_mwap(records)
        except KeyError as e:
            raise ArtifactError(f"mwap: a record has no score for class {e.args[0]!r}") from None
        except ValueError as e:
            raise ArtifactError(f"mwap: {e}") from None
        score = 100 * mean
    elif metric == "wups":
        from .wups import Wups, nextqa_summary

        wups = Wups.load()
        types, scores = [], []
        for row, r in zip(rows, records):
            answers = _reference(r, metric)
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise ArtifactError(f"{r['id']}: 'answers' must be a non-empty list of reference answers")
            if not isinstance(r.get("type"), str):
                raise ArtifactError(f"{r['id']}: wups needs the question's 'type' (CW, TN, DC, ...; "
                                    "from flamingo data nextqa)")
            row["prediction"] = answer(r, post)
            scores.append(wups.score(row["prediction"], answers, r["type"]))
            types.append(r["type"])
            row.update(type=r["type"], score=scores[-1][0.0], wups9=scores[-1][0.9])
        table = nextqa_summary(types, scores)
        score = table.pop("wups0")
        extra.update(table)
    elif metric == "exact":
        for row, r in zip(rows, records):
            row.update(prediction=answer(r, post), label=str(_reference(r, metric)))
            row["score"] = exact_match(row["prediction"], row["label"])
        score = 100 * sum(row["score"] for row in rows) / len(rows)
    elif metric in ("cider", "captions"):
        candidates, references = {}, {}
        for row, r in zip(rows, records):
            refs = _reference(r, metric)
            references[str(r["id"])] = [refs] if isinstance(refs, str) else list(refs)
            row["prediction"] = candidates[str(r["id"])] = answer(r, post)
        if metric == "cider":
            mean, per_image = cider_d(candidates, references)
            for row in rows:
                row["score"] = per_image[str(row["id"])]
            score = 100 * mean
        else:
            suite, per_image = caption_metrics(candidates, references, backend=caption_backend)
            for row in rows:
                row.update(per_image[str(row["id"])])
                row["score"] = row["cider"]
            score = suite["cider"]
            extra.update(suite)
    elif metric == "top1":
        labels = [str(_reference(r, metric)) for r in records]
        predictions = [answer(r, post) for r in records]
        for row, p, y in zip(rows, predictions, labels):
            row.update(prediction=p, label=y, score=float(p == y.strip()))
        score = 100 * top1(predictions, labels)
        if (top5 := _top5(records, labels, rows)) is not None:
            extra["top5"] = top5
    else:
        labels, probs = [], []
        for row, r in zip(rows, records):
            label = r["label_id"] if "label_id" in r else _reference(r, metric)
            y = int(label) if isinstance(label, (int, bool)) else {positive: 1, negative: 0}.get(str(label))
            if y not in (0, 1):
                raise ArtifactError(f"{r['id']}: label {label!r} is neither {positive!r} nor {negative!r}")
            p = _positive_probability(r, positive, negative)
            labels.append(y)
            probs.append(p)
            row.update(label=y, probability=p)
        if len(set(labels)) < 2:
            raise ArtifactError(f"roc_auc needs examples of both labels; all {len(labels)} are {labels[0]}")
        score = 100 * roc_auc(labels, probs)
    return {"metric": metric, "score": score, "n": len(rows), **extra}, rows
