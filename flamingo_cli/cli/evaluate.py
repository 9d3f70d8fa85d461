"""`flamingo evaluate`: prediction records scored against their references."""
from __future__ import annotations

import click

from .core import input_records, key_values, preset_option, say_derived_ids


@click.command(short_help="Score predictions: VQA accuracy, CIDEr-D, top-1, ROC-AUC.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@preset_option("Preset NAME (stages/evaluate/NAME.yaml, one per benchmark) or YAML FILE of option defaults.")
@click.option("--metric", type=click.Choice(["vqa", "cider", "top1", "roc_auc", "exact", "ivqa", "mwap", "wups"]),
              required=True,
              help="vqa: the VQA evaluator's accuracy; cider: CIDEr-D; top1; roc_auc: from P(yes) vs P(no); exact: "
              "top-1 of open-ended answers after the VQA normalisation (video QA); ivqa: iVQA accuracy; mwap: "
              "RareAct's mean weighted average precision; wups: NExT-QA's WUPS (needs NLTK's WordNet, tagger and Punkt "
              "data).")
@click.option("--references", type=click.Path(dir_okay=False),
              help="Records holding the references, joined by id (default: the predictions carry them).")
@click.option("--cut-at", "cut_at", multiple=True,
              help="Cut a generated answer at the first occurrence of this text (repeat), e.g. Question.")
@click.option("--strip-quotes", is_flag=True, help="Delete double quotes from generated answers.")
@click.option("--vqa-evaluator", type=click.Choice(["official", "openflamingo"]), default="official",
              show_default=True, help="vqa: the official evaluator, or OpenFlamingo's copy, which also normalises "
              "the human answers (case, number words, articles) and so scores higher on unnormalised ones.")
@click.option("--positive", default="yes", show_default=True, help="roc_auc: the positive candidate.")
@click.option("--negative", default="no", show_default=True, help="roc_auc: the negative candidate.")
@click.option("--per-example", type=click.Path(dir_okay=False),
              help="Also write one record per example (id, prediction, score) here, atomically.")
@click.option("--tag", multiple=True, help="KEY=VALUE to record in the summary (e.g. shots=4); repeat.")
@click.option("-o", "--output", default="-", show_default=True, help="Write the JSON summary here (atomically).")
def evaluate(input, metric, references, cut_at, strip_quotes, vqa_evaluator, positive, negative, per_example, tag,
             output):
    """Score prediction records (from generate or score) against their references and print
    a one-line JSON summary: {"metric", "score", "n", ...}; scores are in percent, as papers
    report them. Records sharing an id (prompt --ensembles) are one query: their candidate
    log-likelihoods are averaged first. References are the records' own fields (answers,
    captions, label), which the benchmark adapters write and every stage passes through.
    """
    import json

    from ..evaluation.evaluate import PostProcess, evaluate_records, join_references
    from ..formats.artifacts import open_output
    from ..formats.records import read_records_file, write_records

    records = list(input_records(input))  # a metric is over all the records
    if references:
        records = join_references(records, read_records_file(references, on_derived_id=say_derived_ids), metric)
    post = PostProcess(cut=cut_at, quotes=strip_quotes)
    summary, rows = evaluate_records(records, metric, post=post, positive=positive, negative=negative,
                                     vqa_evaluator=vqa_evaluator)
    for key, value in key_values(tag, "--tag"):
        summary[key] = _scalar(value)
    summary.update(cut_at=list(cut_at), strip_quotes=strip_quotes)
    if metric == "vqa":
        summary["vqa_evaluator"] = vqa_evaluator
    if per_example:
        with open_output(per_example) as out:
            write_records(out, rows)
    with open_output(output) as out:
        out.write(json.dumps(summary) + "\n")


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
