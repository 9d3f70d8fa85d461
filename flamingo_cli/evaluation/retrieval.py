"""VisDial's metrics: each round's candidate answers ranked by score, as its official evaluation
ranks and scores them (visdial-challenge-starter-pytorch, visdialch/metrics.py); pure Python.

- Ranks (scores_to_ranks): options sorted by descending score, the first ranked 1. The official
  code sorts with torch's unstable sort, which leaves the order of equal scores to the
  implementation (torch 2 on CPU orders 100 equal scores 62, 74, 73, ...): ties here go to the
  earlier option, as a stable sort orders them. Equal scores come from repeated option strings:
  `score` keys its scores by candidate text, so every copy of a string gets the one score.
- MRR, R@1, R@5, R@10 and mean rank (SparseGTMetrics) over the rank of the ground truth
  (`gt_index`) in every round given.
- NDCG (NDCG) over the densely annotated rounds (those with `relevance`): with k the number of
  options of non-zero relevance, the DCG of the k best-ranked options, sum relevance / log2(1 +
  position), divided by the DCG of the k most relevant; averaged over rounds. The official code
  sums in float32, this in float64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ..formats.artifacts import ArtifactError

RECALLS = (1, 5, 10)


def ranks(scores: Sequence[float]) -> list[int]:
    """The 1-based rank of each option, by descending score; on a tie the earlier option ranks first."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # sorted is stable: ties keep option order
    out = [0] * len(scores)
    for position, option in enumerate(order, start=1):
        out[option] = position
    return out


def ndcg(option_ranks: Sequence[int], relevance: Sequence[float]) -> float:
    """NDCG of one round: the k best-ranked options against the k most relevant, k the number of
    options with non-zero relevance."""
    k = sum(1 for r in relevance if r != 0)
    if k == 0:
        raise ValueError("no option has non-zero relevance")
    ranked = sorted(range(len(option_ranks)), key=option_ranks.__getitem__)
    dcg = sum(relevance[option] / math.log2(j + 2) for j, option in enumerate(ranked[:k]))
    ideal = sum(r / math.log2(j + 2) for j, r in enumerate(sorted(relevance, reverse=True)[:k]))
    return dcg / ideal


def option_scores(record: dict) -> list[float]:
    """The score of each of the record's `candidates`, in order, from its `scores` {candidate: score}.
    By index, so a candidate that occurs twice has its one score at both places."""
    rid = record["id"]
    candidates, scores = record.get("candidates"), record.get("scores")
    if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
        raise ArtifactError(f"{rid}: 'candidates' must be a non-empty list of the round's answer options "
                            "(from flamingo data visdial)")
    if not isinstance(scores, dict):
        raise ArtifactError(f"{rid}: no 'scores' over its candidates (from flamingo score)")
    if set(scores) != set(candidates):
        missing = next((c for c in candidates if c not in scores), None)
        problem = (f"no score for candidate {missing!r}" if missing is not None
                   else f"a score for {next(c for c in scores if c not in set(candidates))!r}, not a candidate")
        raise ArtifactError(f"{rid}: 'scores' has {problem} (score each record's own candidates)")
    values = [scores[c] for c in candidates]
    for c, v in zip(candidates, values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise ArtifactError(f"{rid}: the score of {c!r} should be a number, got {v!r}")
    return values


def _gt_index(record: dict, n: int) -> int:
    rid, gt = record["id"], record.get("gt_index")
    if gt is None:
        raise ArtifactError(f"{rid}: no 'gt_index' (VisDial's test split has no ground truth: its ranks go to "
                            "the evaluation server)")
    if isinstance(gt, bool) or not isinstance(gt, int) or not 0 <= gt < n:
        raise ArtifactError(f"{rid}: 'gt_index' should be an option index in 0..{n - 1}, got {gt!r}")
    label = record.get("label")
    if label is not None and label != record["candidates"][gt]:
        raise ArtifactError(f"{rid}: 'label' {label!r} is not candidate {gt} ({record['candidates'][gt]!r})")
    return gt


def _relevance(record: dict, n: int) -> list[float]:
    rid, relevance = record["id"], record["relevance"]
    if (not isinstance(relevance, list) or len(relevance) != n
            or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in relevance)):
        raise ArtifactError(f"{rid}: 'relevance' should be {n} numbers, one per candidate")
    if not any(relevance):
        raise ArtifactError(f"{rid}: 'relevance' is zero for every candidate, so NDCG is undefined")
    return relevance


def visdial_metrics(records: list[dict]) -> tuple[dict, list[dict]]:
    """(summary, per-round rows) from score records, one per round (prompt ensembles merged:
    evaluate.merge_ensembles). summary: {"metric": "visdial", "score": ndcg, "ndcg", "mrr", "r1",
    "r5", "r10", "mean_rank", "n", "n_dense"}, as the VisDial leaderboard reports them: NDCG, MRR
    and R@k x100, mean rank as it is; n rounds, n_dense of them densely annotated. rows: id,
    prediction (the best-ranked candidate), label, rank (of the ground truth), and ndcg (a
    fraction) for the dense rounds."""
    if not records:
        raise ArtifactError("no prediction records")
    seen: set[str] = set()
    rows, gt_ranks, ndcgs = [], [], []
    for record in records:
        if "id" not in record:
            raise ArtifactError("a prediction record has no 'id'")
        if str(record["id"]) in seen:
            raise ArtifactError(f"{record['id']}: several records share this id (merge prompt ensembles first)")
        seen.add(str(record["id"]))
        option_ranks = ranks(option_scores(record))
        n = len(option_ranks)
        gt = _gt_index(record, n)
        row = {"id": record["id"], "prediction": record["candidates"][option_ranks.index(1)],
               "label": record["candidates"][gt], "rank": option_ranks[gt]}
        gt_ranks.append(option_ranks[gt])
        if record.get("relevance") is not None:
            row["ndcg"] = ndcg(option_ranks, _relevance(record, n))
            ndcgs.append(row["ndcg"])
        rows.append(row)
    if not ndcgs:
        raise ArtifactError(f"none of the {len(records)} rounds is densely annotated ('relevance'), so there is no "
                            "NDCG: read val with its visdial_1.0_val_dense_annotations.json")
    n = len(gt_ranks)
    summary = {"metric": "visdial", "score": 100 * sum(ndcgs) / len(ndcgs)}
    summary["ndcg"] = summary["score"]
    summary["mrr"] = 100 * sum(1 / r for r in gt_ranks) / n
    for k in RECALLS:
        summary[f"r{k}"] = 100 * sum(r <= k for r in gt_ranks) / n
    summary.update(mean_rank=sum(gt_ranks) / n, n=n, n_dense=len(ndcgs))
    return summary, rows
