"""`flamingo evaluate`: prediction records scored against their references, or written as the results file of
a benchmark's evaluation server."""
from __future__ import annotations

import click

from .core import input_records, key_values, preset_option, say_derived_ids


@click.command(short_help="Score predictions (VQA accuracy, CIDEr-D, top-1, ROC-AUC, ...) or write a server's file.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@preset_option("Preset NAME (stages/evaluate/NAME.yaml, one per benchmark) or YAML FILE of option defaults.")
@click.option("--metric", type=click.Choice(["vqa", "cider", "captions", "top1", "roc_auc", "exact", "ivqa", "mwap",
                                            "wups", "visdial"]),
              help="vqa: the VQA evaluator's accuracy, and by_answer_type where the records carry answer_type "
              "(VQAv2, OK-VQA, VizWiz); cider: CIDEr-D (pure Python); captions: BLEU-1..4, METEOR, ROUGE-L, "
              "CIDEr-D and SPICE as pycocoevalcap reports them, CIDEr-D as the score (see --caption-backend); top1, "
              "and top5 over score records' scores; roc_auc: from P(yes) vs P(no); exact: top-1 of open-ended "
              "answers after the VQA normalisation (video QA); ivqa: iVQA accuracy; mwap: RareAct's mean weighted "
              "average precision; wups: NExT-QA's WUPS (needs NLTK's WordNet, tagger and Punkt data); visdial: "
              "VisDial's NDCG over its densely annotated rounds, with MRR, R@1/5/10 and mean rank. Required unless "
              "--server.")
@click.option("--references", type=click.Path(dir_okay=False),
              help="Records holding the references, joined by id (default: the predictions carry them).")
@click.option("--cut-at", "cut_at", multiple=True,
              help="Cut a generated answer at the first occurrence of this text (repeat), e.g. Question.")
@click.option("--strip-quotes", is_flag=True, help="Delete double quotes from generated answers.")
@click.option("--okvqa-stem/--no-okvqa-stem", default=False,
              help="Stem generated answers as OK-VQA v1.1 stems its answers (NLTK's tokenizer, tagger and WordNet "
              "lemmas, inflection's singulars, OK-VQA's table of exceptions), after the cut, as OpenFlamingo does; "
              "-c okvqa turns it on. Needs the NLTK data wups needs.")
@click.option("--vqa-evaluator", type=click.Choice(["official", "openflamingo"]), default="official",
              show_default=True, help="vqa: the official evaluator, or OpenFlamingo's copy, which also normalises "
              "the human answers (case, number words, articles) and so scores higher on unnormalised ones.")
@click.option("--caption-backend", type=click.Choice(["auto", "java", "python"]), default="auto", show_default=True,
              help="captions: java runs pycocoevalcap itself (its Java PTB tokenizer; METEOR; SPICE where Stanford "
              "CoreNLP is installed); python scores BLEU, ROUGE-L and CIDEr-D in Python with an approximate PTB "
              "tokenizer, without METEOR and SPICE; auto: java when `java` is on PATH. The summary says which ran.")
@click.option("--positive", default="yes", show_default=True, help="roc_auc: the positive candidate.")
@click.option("--negative", default="no", show_default=True, help="roc_auc: the negative candidate.")
@click.option("--per-example", type=click.Path(dir_okay=False),
              help="Also write one record per example (id, prediction, score) here, atomically.")
@click.option("--tag", multiple=True, help="KEY=VALUE to record in the summary (e.g. shots=4); repeat.")
@click.option("--server", type=click.Choice(["vqav2", "vizwiz", "textvqa"]),
              help="Instead of scoring, write the results file this benchmark's evaluation server (EvalAI) takes, "
              "for predictions on a split whose answers are not public (vqav2: test-dev or test; vizwiz, textvqa: "
              "test), their answers post-processed as for scoring; needs --root.")
@click.option("--root", type=click.Path(file_okay=False),
              help="With --server: the benchmark's download (the ROOT given to flamingo data), whose question files "
              "the predictions are checked against.")
@click.option("-o", "--output", default="-", show_default=True,
              help="Write the JSON summary (with --server: the results file) here (atomically).")
def evaluate(input, metric, references, cut_at, strip_quotes, okvqa_stem, vqa_evaluator, caption_backend, positive,
             negative, per_example, tag, server, root, output):
    """Score prediction records (from generate or score) against their references and print
    a one-line JSON summary: {"metric", "score", "n", ...}; scores are in percent, as papers
    report them. Records sharing an id (prompt --ensembles) are one query: their candidate
    log-likelihoods are averaged first. References are the records' own fields (answers,
    captions, label), which the benchmark adapters write and every stage passes through.

    With --server, test-split predictions become the JSON list the server scores (vqav2,
    textvqa: {"question_id", "answer"}; vizwiz: {"image", "answer"}), one entry for every
    question of the split (for vqav2 test-dev: of all test2015, as EvalAI requires), the
    unanswered with empty answers; stderr says how many questions of the split the
    predictions answer. A prediction without a question_id, one question predicted twice, or
    one not in the split's question file is refused.
    """
    import json

    from ..evaluation.evaluate import PostProcess, evaluate_records, join_references
    from ..formats.artifacts import open_output
    from ..formats.records import read_records_file, write_records

    if server:
        if not root:
            raise click.UsageError("--server needs --root ROOT, the benchmark's download")
        if per_example or references or tag:
            raise click.UsageError("--per-example, --references and --tag are for scoring, not --server")
    elif not metric:
        raise click.UsageError("Missing option '--metric' (or --server NAME).")
    records = list(input_records(input))  # a metric is over all the records
    stem = None
    if okvqa_stem:
        from ..evaluation.okvqa import OkvqaStemmer

        stem = OkvqaStemmer.load()
    post = PostProcess(cut=cut_at, quotes=strip_quotes, stem=stem)
    if server:
        _write_server_results(records, server, root, post, output)
        return
    if references:
        records = join_references(records, read_records_file(references, on_derived_id=say_derived_ids), metric)
    summary, rows = evaluate_records(records, metric, post=post, positive=positive, negative=negative,
                                     vqa_evaluator=vqa_evaluator, caption_backend=caption_backend)
    for key, value in key_values(tag, "--tag"):
        summary[key] = _scalar(value)
    summary.update(cut_at=list(cut_at), strip_quotes=strip_quotes, okvqa_stem=okvqa_stem)
    if metric == "vqa":
        summary["vqa_evaluator"] = vqa_evaluator
    if per_example:
        with open_output(per_example) as out:
            write_records(out, rows)
    with open_output(output) as out:
        out.write(json.dumps(summary) + "\n")


def _write_server_results(records, server, root, post, output) -> None:
    import json

    from ..evaluation.servers import server_results
    from ..formats.artifacts import open_output

    results, coverage = server_results(records, server, root, post)
    with open_output(output) as out:
        out.write(json.dumps(results) + "\n")
    click.echo(f"flamingo: {'<stdout>' if output == '-' else output}: {coverage}", err=True)


def _scalar(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
