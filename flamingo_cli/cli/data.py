"""`flamingo data`: a benchmark's own annotation files into query/support records."""
from __future__ import annotations

import click

BENCHMARK_NAMES = ["vqav2", "okvqa", "vizwiz", "textvqa", "coco", "flickr30k", "hatefulmemes", "imagenet", "msvdqa",
                   "msrvttqa", "ivqa", "nextqa", "star", "vatex", "youcook2", "rareact", "visdial"]


@click.command(short_help="Turn a benchmark's own annotation files into query/support records.")
@click.argument("bench", type=click.Choice(BENCHMARK_NAMES), metavar="BENCH")
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--split", help="The benchmark's split (train, val, test, dev_seen, ...); required unless --classes.")
@click.option("--sample", "n", type=click.IntRange(min=0),
              help="Keep a seeded random N of the split (file order kept); openflamingo: its --num_samples "
              "(default: the whole split).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for --sample; openflamingo: the trial seed (OpenFlamingo's default is 42).")
@click.option("--protocol", type=click.Choice(["flamingo", "openflamingo"]), default="flamingo", show_default=True,
              help="flamingo: the split in file order, --sample keeps it; openflamingo: the split as OpenFlamingo "
              "2.0.1 evaluates it (see below).")
@click.option("--support", "support_output", type=click.Path(dir_okay=False),
              help="openflamingo: also write its query set (the demonstrations' pool, drawn from the train split "
              "after the queries, from the same generator) here, atomically.")
@click.option("--support-size", default="2048", show_default=True, metavar="N|all",
              help="openflamingo: the query set's size (its --query_set_size); all: the whole train split in "
              "order, as OpenFlamingo's --rices uses it.")
@click.option("--classes", is_flag=True,
              help="imagenet, rareact: write the class names instead, one per line (ImageNet's in synset order, "
              "RareAct's \"verb noun\" in class_id order).")
@click.option("-o", "--output", default="-", show_default=True, help="Write records here (atomically); - is stdout.")
def data(bench, root, split, n, seed, protocol, support_output, support_size, classes, output):
    """Read benchmark BENCH from ROOT, its download in the benchmark's native layout, and write
    one record per example: `id`, `image` (video benchmarks: `video`), `split` and the
    references its metric needs (VQA: question, answers, answer, and answer_type where annotated
    (VQAv2, OK-VQA, VizWiz); test splits: question and question_id only; captioning: caption,
    captions; HatefulMemes: text, label; ImageNet: label, synset; MSVD-QA, MSRVTT-QA:
    question, answer, label; iVQA: question, answers, answer; NExT-QA: question, answer,
    answers, type; STAR: question, candidates, label; VATEX, YouCook2: caption, captions;
    RareAct: verb, noun, annotation, label; VisDial: caption, history, question, dialogue,
    candidates, round, label, gt_index, and relevance on the densely annotated round: val gives
    that round of each dialogue, the one NDCG scores).
    The layouts:

    \b
    vqav2         v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json,
                  v2_mscoco_{train,val}2014_annotations.json, {train2014,val2014,test2015}/COCO_..._<id>.jpg
    okvqa         OpenEnded_mscoco_{split}2014_questions.json, mscoco_{split}2014_annotations.json, COCO images
    vizwiz        Annotations/{split}.json (test: questions only), {split}/<image>
    textvqa       TextVQA_0.5.1_{split}.json, train_images/<image_id>.jpg (test: test_images/)
    coco          dataset_coco.json (Karpathy; train includes restval), <filepath>/<filename>
    flickr30k     dataset_flickr30k.json (Karpathy), flickr30k-images/<filename>
    hatefulmemes  {split}.jsonl (train, dev_seen, dev_unseen, test_seen, test_unseen), img/<id>.png
    imagenet      LOC_synset_mapping.txt, LOC_val_solution.csv, ILSVRC/Data/CLS-LOC/{train,val}/...
    msvdqa        {split}_qa.json, youtube_mapping.txt, YouTubeClips/<clip>.avi
    msrvttqa      {split}_qa.json, TrainValVideo/video<id>.mp4 (id < 7010), TestVideo/video<id>.mp4
    ivqa          {split}.csv (video_id, question, answer1..answer5), videos/<video_id>.mp4
    nextqa        {split}.csv, add_reference_answer_{split}.json (optional), map_vid_vidorID.json,
                  NExTVideo/<folder>/<vidor id>.mp4
    star          STAR_{split}.json, Charades_v1_480/<video_id>.mp4
    vatex         vatex_training_v1.0.json, vatex_validation_v1.0.json, vatex_public_test_english_v1.1.json,
                  videos/<videoID>.mp4
    youcook2      youcookii_annotations_trainval.json, raw_videos/{training,validation}/<recipe>/<id>.mp4
    rareact       rareact.csv (split test), videos/<video_id>.mp4
    visdial       visdial_1.0_{split}.json, visdial_1.0_val_dense_annotations.json (val),
                  VisualDialog_{val,test}2018/VisualDialog_{val,test}2018_<id>.jpg, train2014/ and val2014/
                  (or VisualDialog_train2018/) for train
    """
    from ..evaluation.benchmarks import imagenet_classnames, rareact_classnames, read_benchmark, sample
    from ..formats.artifacts import open_output
    from ..formats.records import write_records

    if classes:
        if bench not in ("imagenet", "rareact"):
            raise click.UsageError("--classes is for imagenet and rareact")
        names = imagenet_classnames(root) if bench == "imagenet" else rareact_classnames(root)
        with open_output(output) as out:
            out.write("".join(name + "\n" for name in names))
        return
    if not split:
        raise click.UsageError("--split is required")
    if protocol == "openflamingo":
        return _openflamingo(bench, root, split, n, seed, support_output, support_size, output)
    if support_output:
        raise click.UsageError("--support is for --protocol openflamingo")
    records = sample(read_benchmark(bench, root, split), n, seed)
    with open_output(output) as out:
        write_records(out, records)


def _openflamingo(bench, root, split, n, seed, support_output, support_size, output):
    from ..evaluation.protocols import draw, openflamingo_split
    from ..formats.artifacts import open_output
    from ..formats.records import write_records

    if support_size != "all" and not (support_size.isdigit() and int(support_size) > 0):
        raise click.BadParameter(f"{support_size!r} is neither a positive number nor all", param_hint="--support-size")
    queries = openflamingo_split(bench, root, split)
    train = openflamingo_split(bench, root, "train") if support_output else []
    size = None if support_size == "all" or not support_output else int(support_size)
    chosen = draw(len(queries), len(train), seed=seed, num_samples=n, query_set_size=size)
    with open_output(output) as out:
        write_records(out, [queries[i] for i in chosen.queries])
    if support_output:
        with open_output(support_output) as out:
            write_records(out, [train[i] for i in chosen.support])
