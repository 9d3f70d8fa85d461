"""`flamingo prompt`: query records and a support set into few-shot prompt records."""
from __future__ import annotations

import click

from .core import input_records, shot_options, shot_prompts, stage_options
from .placing import single_process


@click.command(short_help="Build few-shot prompts from queries and a support set.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options(ckpt=False)
@shot_options
@click.option("--ensembles", type=click.IntRange(min=1), default=1, show_default=True,
              help="Prompt ensembling for close-ended tasks: one record per order of the same shots, up to N "
              "(the paper averages 6); flamingo evaluate averages their scores.")
@click.option("--protocol", type=click.Choice(["flamingo", "openflamingo"]), default="flamingo", show_default=True,
              help="How shots are drawn: flamingo, from (--seed, query id); openflamingo, as OpenFlamingo 2.0.1's "
              "evaluate.py draws them, from the queries' order (see below).")
@click.option("--world-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="openflamingo: the number of processes (GPUs) OpenFlamingo ran on; its shots depend on it.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="openflamingo with --ensembles: OpenFlamingo's --batch_size, which its shuffles depend on.")
@click.option("--rices-vectors", type=click.Choice(["embedding", "pooled"]),
              help="What --select rices ranks by: embedding, the CLIP image embedding that flamingo encode "
              "--embedding adds (OpenFlamingo's RICES); pooled, the checkpoint encoder's mean features. Default: "
              "pooled; openflamingo: embedding when the support records have one.")
def prompt(input, output, device, seed, quiet, shots, k, select, template, ensembles, protocol, world_size,
           batch_size, rices_vectors):
    """Build interleaved few-shot prompts.

    Reads query records and adds `prompt` (text with <image> markers and
    <|endofchunk|>), `media` (one entry per <image>, in order), `shots` (the ids of
    the demonstrations, in prompt order) and `template`. Shots depend only on --seed
    and the query id. With --ensembles N, each query gives min(N, k!) records, the
    same shots in different orders, each with an `ensemble` number. Runs as a single process.

    With --protocol openflamingo, shots are drawn as OpenFlamingo 2.0.1 draws its
    demonstrations, for queries and a support set that `flamingo data --protocol
    openflamingo` wrote (their order matters): query i is run by rank i % --world-size,
    and each rank draws random.sample(support, k) per query, in order, from Python's
    generator seeded --seed + rank; a query's own id is not excluded. -k 0 draws 2, shown
    text only, as in the paper. --select rices takes the k most similar, most similar
    last, by cosine similarity of the CLIP image embedding that `flamingo encode
    --embedding vit_large_patch14_clip_224.openai` adds (open_clip's ViT-L-14 openai, as
    OpenFlamingo's RICES ranks); a support set without embeddings is ranked by pooled
    features, with a warning. --ensembles N: OpenFlamingo's
    --classification_prompt_ensembling (it uses 6): min(N, k!) orders, each the previous
    one shuffled, batch by batch of --batch-size.
    """
    from ..formats.artifacts import open_output
    from ..formats.records import write_records

    single_process("prompt")
    if not shots:
        raise click.UsageError("--shots FILE is required")
    if rices_vectors and select != "rices":
        raise click.UsageError("--rices-vectors is for --select rices")
    records = input_records(input)
    if protocol == "openflamingo":
        prompts = _openflamingo(records, shots, k, select, seed, template, ensembles, world_size, batch_size,
                                rices_vectors, quiet)
    else:
        ctx = click.get_current_context()
        for name in ("world_size", "batch_size"):
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"--{name.replace('_', '-')} is for --protocol openflamingo")
        prompts = shot_prompts(records, shots, k, select, seed, template, ensembles, quiet=quiet,
                               rices_vectors=rices_vectors or "pooled")
    with open_output(output) as out:
        for record in prompts:
            write_records(out, [record])


def _openflamingo(records, shots_file, k, select, seed, template_name, ensembles, world_size, batch_size,
                  rices_vectors, quiet):
    from ..evaluation.protocols import demonstrations, effective_shots, orders_per_query
    from ..formats.artifacts import EMBEDDING
    from ..formats.records import read_records_file
    from ..inference.prompting import load_template, ordered_prompt_records, rices_shots
    from ..inference.rices import ENCODE_EMBEDDING
    from .core import say_derived_ids

    if select == "first":
        raise click.UsageError("--protocol openflamingo draws shots at random or by --select rices")
    template = load_template(template_name)
    support = read_records_file(shots_file, on_derived_id=say_derived_ids)
    whole = select == "rices" or orders_per_query(k, ensembles) > 1
    queries = list(records) if whole else records
    chosen = None
    if select == "rices":
        vectors = rices_vectors or ("embedding" if any(EMBEDDING in s for s in support) else "pooled")
        if vectors != "embedding" and not rices_vectors and not quiet:
            click.echo(f"flamingo prompt: warning: {shots_file} has no 'embedding', so RICES ranks by pooled features, "
                       f"not by OpenFlamingo's CLIP embedding: add it with `{ENCODE_EMBEDDING}` (or say "
                       "--rices-vectors pooled)", err=True)
        chosen = rices_shots(queries, support, effective_shots(k), vectors=vectors)
    orders = demonstrations(len(support), k, seed=seed, world_size=world_size, batch_size=batch_size,
                            ensembles=ensembles, n_queries=len(queries) if whole else None, chosen=chosen)
    return ordered_prompt_records(template, queries, support, orders, k=k)
