"""The `flamingo` command: thin click commands that parse, validate and hand off to the library.

torch, transformers and timm are imported inside commands so `--help` stays instant.
Configuration precedence: flag > FLAMINGO_<CMD>_<OPT> environment variable > --config YAML > default.
"""
from __future__ import annotations

import os
import sys
import traceback

import click

from .. import __version__
from ..formats.artifacts import open_output
from ..errors import FlamingoError


def _debug() -> bool:
    return os.environ.get("FLAMINGO_DEBUG", "") not in ("", "0")


class FlamingoGroup(click.Group):
    """Maps library errors to one line on stderr and exit 1; a closed stdout pipe to exit 0."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlamingoError as e:
            if _debug():
                traceback.print_exc()
            raise click.ClickException(str(e)) from None
        except BrokenPipeError:
            # `flamingo ... | head -1`: the reader has what it wanted; that is success, and silence.
            # Handled here because click's own main turns EPIPE into exit 1.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(0) from None


@click.group(cls=FlamingoGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "auto_envvar_prefix": "FLAMINGO"})
@click.version_option(__version__, "--version", prog_name="flamingo")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (also FLAMINGO_DEBUG=1).")
def cli(debug: bool):
    """Flamingo visual language models as composable Unix stages.

    Stages read and write JSON Lines records and safetensors tensors, so they chain
    in shell pipes, Makefiles and SLURM jobs. See flamingo(1) and flamingo-<cmd>(1).
    """
    if debug:
        os.environ["FLAMINGO_DEBUG"] = "1"


def _quiet_libraries(quiet: bool = False) -> None:
    """Progress bars only on a terminal and without --quiet, transformers' included."""
    if quiet or not sys.stderr.isatty() or os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _load_yaml_config(name_or_file: str | None):
    """An init preset by name (stages/init/NAME.yaml) or file, as a FlamingoConfig."""
    from ..model.config import FlamingoConfig
    from ..errors import ConfigError
    from ..formats.presets import preset_path

    if name_or_file is None:
        return FlamingoConfig()
    path = preset_path("init", name_or_file)
    try:
        return FlamingoConfig.from_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    except ConfigError as e:
        raise click.ClickException(f"{path}: {e}") from None


@cli.command(short_help="Create an untrained checkpoint.")
@click.option("-c", "--config", "config_path",
              help="A FlamingoConfig preset: NAME (stages/init/NAME.yaml, e.g. tiny, openflamingo-3b) or YAML FILE.")
@click.option("--lm", help="The frozen causal LM: a local directory (or a hub id when online).")
@click.option("--lm-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype the frozen LM is held in.")
@click.option("--encoder", help="The frozen vision encoder: a timm model name, or a directory written by "
              "flamingo contrastive.")
@click.option("--encoder-weights", type=click.Path(dir_okay=False), help="Local weights file for the encoder.")
@click.option("--every", type=click.IntRange(min=1), help="A GATED XATTN-DENSE block every N LM layers.")
@click.option("--placement", type=click.Choice(["paper", "openflamingo"]),
              help="paper: layers 0, N, 2N...; openflamingo: layers where (i+1) % N == 0.")
@click.option("--latents", type=click.IntRange(min=1), help="Visual tokens per image (resampler latents).")
@click.option("--embed", is_flag=True, default=None, help="Copy the LM and encoder weights into the checkpoint.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the new weights.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
def init(config_path, lm, lm_dtype, encoder, encoder_weights, every, placement, latents, embed, seed, out):
    """Create an untrained checkpoint around a frozen LM and vision encoder.

    The gates start at 0, so the new model computes exactly what the LM does until
    it is trained. The resampler's width is taken from the encoder.
    """
    from ..formats.checkpoint import new_model, save_checkpoint
    from ..model.config import EncoderConfig

    _quiet_libraries()
    config = _load_yaml_config(config_path)
    for value, section, field in [(lm, config.lm, "path"), (lm_dtype, config.lm, "dtype"),
                                  (every, config.xattn, "every"), (placement, config.xattn, "placement"),
                                  (latents, config.resampler, "num_latents")]:
        if value is not None:
            setattr(section, field, value)
    if encoder is not None:
        if os.path.isdir(encoder):  # written by flamingo contrastive
            from ..training.contrastive import read_encoder_dir

            config.encoder = read_encoder_dir(encoder)
        else:
            config.encoder = EncoderConfig(name=encoder)
    if encoder_weights is not None:
        config.encoder.weights = encoder_weights
    model = new_model(config, seed=seed)
    save_checkpoint(model, out, embed_lm=bool(embed), embed_encoder=bool(embed) or config.encoder.weights is None)
    n = sum(p.numel() for p in model.trainable_parameters())
    click.echo(f"wrote {out}: {n:,} trainable parameters, xattn before LM layers "
               f"{', '.join(model.xattn.keys())} (untrained)", err=True)


@cli.group(name="import", short_help="Convert other toolkits' checkpoints into ours.")
def import_():
    """Convert checkpoints written by other Flamingo implementations into checkpoint directories."""


@import_.command(name="openflamingo", short_help="Import an OpenFlamingo checkpoint, strictly.")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-c", "--config", "config_path",
              help="A preset (openflamingo-3b, openflamingo-4b, openflamingo-9b) or YAML file. It names the LM and "
              "encoder, and the import fails if the checkpoint contradicts it. Default: the architecture is read "
              "from the checkpoint, and --lm is required.")
@click.option("--lm", help="The LM the checkpoint was trained with: a local directory (or a hub id when online).")
@click.option("--lm-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype the frozen LM is held in.")
@click.option("--encoder-weights", type=click.Path(dir_okay=False),
              help="CLIP ViT-L/14 weights, in timm's or open_clip's layout (e.g. open_clip_pytorch_model.bin). "
              "Default: timm's pretrained vit_large_patch14_clip_224.openai, downloaded.")
@click.option("--take-lm-rows", is_flag=True,
              help="Where the file's embedding rows of the LM's own tokens differ from the LM's (a run that trained "
              "them all), use the file's, as OpenFlamingo does; they are stored in the checkpoint. Default: an error.")
@click.option("--embed", is_flag=True, help="Copy the LM and encoder weights into the checkpoint.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory to write.")
def import_openflamingo(checkpoint, config_path, lm, lm_dtype, encoder_weights, take_lm_rows, embed, out):
    """Import CHECKPOINT, a file written by OpenFlamingo's training (checkpoint_*.pt) or a
    released OpenFlamingo checkpoint.pt, into a checkpoint directory that every stage reads.

    The file is loaded with torch.load(weights_only=True): tensors only, never code. Every
    tensor in it must be either imported (perceiver, gated cross-attention, the new tokens'
    embedding rows) or a frozen LM or encoder weight equal to the one loaded; anything
    missing, unknown, mis-shaped or different is an error that names it.
    """
    from ..formats.checkpoint import save_checkpoint
    from ..importers.openflamingo import import_openflamingo as run_import

    _quiet_libraries()
    config = _load_yaml_config(config_path or "openflamingo-9b")
    if lm is not None:
        config.lm.path = lm
    elif config_path is None:
        raise click.UsageError("give --lm (the checkpoint's LM), or a preset with -c")
    if lm_dtype is not None:
        config.lm.dtype = lm_dtype
    if encoder_weights is not None:
        config.encoder.weights, config.encoder.pretrained = encoder_weights, False
    model, report = run_import(checkpoint, config, check_preset=config_path is not None, take_lm_rows=take_lm_rows)
    save_checkpoint(model, out, embed_lm=embed, embed_encoder=embed)
    for line in report.lines():
        click.echo(f"{checkpoint}: {line}", err=True)
    click.echo(f"wrote {out}", err=True)


# -- shared machinery for the stages -----------------------------------------------------

def _load_preset(ctx: click.Context, param, value):
    """--config NAME|FILE: a YAML mapping of option names, loaded as this command's defaults
    (so FLAMINGO_<CMD>_<OPT> environment variables and flags still win)."""
    if value is None:
        return value
    import yaml

    from ..formats.presets import preset_path

    path = preset_path(ctx.info_name, value)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.BadParameter(f"{path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path}: expected a mapping of option names to values")
    known = {p.name for p in ctx.command.params}
    unknown = sorted(k for k in (str(k).replace("-", "_") for k in data) if k not in known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown option(s) {', '.join(unknown)}")
    ctx.default_map = {**(ctx.default_map or {}), **{str(k).replace("-", "_"): v for k, v in data.items()}}
    return value


def stage_options(*, ckpt: bool = True):
    """Options every stage shares. --config is eager so its values become defaults."""
    def decorate(f):
        options = [
            click.option("-c", "--config", callback=_load_preset, is_eager=True, expose_value=False,
                         help="Preset NAME (stages/<stage>/NAME.yaml) or YAML FILE of option defaults."),
            click.option("-o", "--output", default="-", show_default=True,
                         help="Write records here (atomically); - is stdout."),
            click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1, ..."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed for anything random."),
            click.option("-q", "--quiet", is_flag=True, help="No progress bars (also TQDM_DISABLE=1)."),
        ]
        if ckpt:
            options.insert(1, click.option("--ckpt", envvar="FLAMINGO_CKPT", type=click.Path(),
                                           help="Checkpoint directory (also FLAMINGO_CKPT)."))
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _single_process(stage: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError(f"flamingo {stage} runs as one process; under torchrun, split the input "
                               "and run one process per part instead")


def _setup(seed: int, quiet: bool) -> None:
    import torch

    _quiet_libraries(quiet)
    torch.manual_seed(seed)


def _progress(quiet: bool, **kw):
    from tqdm import tqdm

    disable = True if quiet or os.environ.get("TQDM_DISABLE", "") not in ("", "0") else None
    return tqdm(file=sys.stderr, disable=disable, dynamic_ncols=True, **kw)


def _records(source: str) -> list[dict]:
    """All records of a file or of stdin ('-'); empty input is an error."""
    from ..formats.artifacts import ArtifactError, read_records, read_records_file

    if source == "-":
        if sys.stdin.isatty():
            raise click.UsageError("no input: pipe JSON Lines records in, or name a file (- means stdin)")
        records = list(read_records(sys.stdin, "<stdin>"))
        name = "<stdin>"
    else:
        records = read_records_file(source)
        name = source
    if not records:
        raise ArtifactError(f"{name}: no records")
    return records


def _checkpoint(ckpt: str | None, *, bundled: bool = True) -> str:
    """--ckpt, else FLAMINGO_CKPT, else the bundled toy model (said on stderr: it knows only its world)."""
    if ckpt:
        return ckpt
    if not bundled:
        raise click.UsageError("no checkpoint: pass --ckpt DIR or set FLAMINGO_CKPT")
    from ..formats.checkpoint import BUNDLED_CHECKPOINT

    click.echo(f"flamingo: no --ckpt or FLAMINGO_CKPT, using the bundled toy model ({BUNDLED_CHECKPOINT}); "
               "it knows only the shapes world of examples/toy", err=True)
    return str(BUNDLED_CHECKPOINT)


def _dtype(name: str):
    import torch

    return None if name == "float32" else getattr(torch, name)


def _load_model(ckpt: str, device: str):
    from ..formats.checkpoint import load_checkpoint, load_checkpoint_encoder
    from ..inference.media import MediaResolver

    model = load_checkpoint(ckpt, with_encoder=False).to(device).eval()
    return model, MediaResolver(model, load_encoder=lambda: load_checkpoint_encoder(ckpt)[0], device=device)


dtype_option = click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
                            show_default=True, help="Autocast dtype for the frozen parts (bfloat16 is fast on CPUs with AMX).")


def shot_options(f):
    """How `prompt` (and `generate --shots`) build few-shot prompts."""
    for option in reversed([
        click.option("--shots", type=click.Path(dir_okay=False), help="Support records (JSON Lines) to draw shots from."),
        click.option("-k", "k", type=click.IntRange(min=0), default=4, show_default=True,
                     help="Shots per prompt; 0 = zero-shot with 2 text-only examples."),
        click.option("--select", type=click.Choice(["random", "rices", "first"]), default="random", show_default=True,
                     help="Shot selection; rices = most similar by pooled features, most similar last."),
        click.option("--template", default="captioning", show_default=True,
                     help="Prompt template NAME (stages/prompt/) or YAML FILE."),
    ]):
        f = option(f)
    return f


def _prompt_records(queries: list[dict], shots_file: str, k: int, select: str, seed: int, template_name: str,
                    ensembles: int = 1):
    from ..formats.artifacts import read_records_file
    from ..inference.prompting import load_template, make_prompt_records

    template = load_template(template_name)
    support = read_records_file(shots_file)
    vectors = _pooled_vectors(queries, support) if select == "rices" else None
    out = []
    for i, query in enumerate(queries):
        kw = {} if vectors is None else {"query_vector": vectors[0][i], "support_vectors": vectors[1]}
        out.extend(make_prompt_records(template, query, support, k=k, method=select, seed=seed,
                                       ensembles=ensembles, **kw))
    return out


def _pooled_vectors(queries: list[dict], support: list[dict]):
    """Pooled encoder features for RICES, all from one encoder."""
    import torch

    from ..formats.artifacts import POOLED, ArtifactError, load_ref, make_ref, split_ref

    encoders = set()

    def pooled(record):
        ref = record.get("features")
        if not isinstance(ref, str):
            raise ArtifactError(f"{record.get('id', '<record>')}: --select rices needs a 'features' reference "
                                "(run flamingo encode)")
        vector, meta = load_ref(make_ref(split_ref(ref)[0], POOLED))
        encoders.add(meta.get("encoder"))
        if len(encoders) > 1:
            raise ArtifactError(f"{ref}: features come from different encoders ({', '.join(map(str, encoders))})")
        return vector.float()

    return torch.stack([pooled(r) for r in queries]), torch.stack([pooled(r) for r in support])


# -- stages ------------------------------------------------------------------------------

@cli.command(short_help="Encode images into feature references.")
@click.argument("inputs", nargs=-1, type=click.Path())
@stage_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Directory for feature files (default: the content-addressed cache, $FLAMINGO_CACHE).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="DataLoader processes that decode and resize images while the encoder runs.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (counted on stderr) instead of failing.")
@click.option("--wds", "wds_pattern", help="Also write webdataset feature shards for pretrain, e.g. "
              "OUT/shard-%06d.tar (records with `image`, or `segments` and `images`).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per shard with --wds.")
@dtype_option
def encode(inputs, ckpt, output, device, seed, quiet, out_dir, batch_size, workers, skip_bad, wds_pattern,
           shard_size, dtype):
    """Encode images with the checkpoint's frozen vision encoder.

    INPUTS are image files, directories (searched recursively, in sorted order) or -
    for JSON Lines records with an `image` field on stdin; with no INPUTS, records are
    read from stdin. Each output record passes its input fields through and adds
    `features` (PATH.safetensors#features, shaped frames x tokens x dim) and `encoder`.
    Features are cached by image content and encoder, so re-encoding is free.
    Records are written as each batch finishes. With --wds, it also writes feature
    shards for `flamingo pretrain` (records then come at the end; a document's
    `features` is a list, one reference per entry of its `images`).
    Runs as a single process.
    """
    from pathlib import Path

    from ..formats.artifacts import cache_dir, write_records
    from ..formats.checkpoint import load_checkpoint_encoder
    from ..inference.encoding import encode_records
    from ..inference.media import find_images

    _single_process("encode")
    _setup(seed, quiet)
    records = []
    for item in inputs or ("-",):
        if item == "-":
            records += _records("-")
        elif Path(item).is_dir():
            records += [{"id": str(p), "image": str(p)} for p in find_images(Path(item))]
        else:
            records.append({"id": item, "image": item})
    if not records:
        raise click.UsageError(f"no images found in {' '.join(inputs)}")
    encoder, identity = load_checkpoint_encoder(_checkpoint(ckpt))
    encoder = encoder.to(device)
    skipped = []
    root = Path(out_dir) if out_dir else cache_dir()
    options = dict(root=root, batch_size=batch_size, workers=workers, skip_bad=skip_bad, device=device,
                   dtype=_dtype(dtype), on_skip=skipped.append)
    if wds_pattern:
        from ..inference.encoding import media_paths, write_feature_shards

        if "%" not in wds_pattern:
            raise click.BadParameter("needs a %d-style shard number, e.g. out/shard-%06d.tar", param_hint="--wds")
        total = sum(len(media_paths(r)) for r in records)
        with _progress(quiet, total=total, unit="img", desc="encode") as bar, open_output(output) as out:
            write_records(out, write_feature_shards(encoder, identity, records, wds_pattern, maxcount=shard_size,
                                                    on_batch=bar.update, **options))
    else:
        with _progress(quiet, total=len(records), unit="img", desc="encode") as bar, open_output(output) as out:
            for batch in encode_records(encoder, identity, records, **options):
                write_records(out, batch)
                bar.update(len(batch))
    if skipped:
        click.echo(f"flamingo encode: skipped {len(skipped)} unreadable file(s); first: {skipped[0]}", err=True)


@cli.command(short_help="Turn feature records into visual-token records.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Directory for visual-token files (default: the cache).")
def resample(input, ckpt, output, device, seed, quiet, out_dir):
    """Run the checkpoint's Perceiver Resampler over feature records.

    Adds `visual` (PATH.safetensors#visual, latents x dim) to each record with a
    `features` reference. Resample a support set once, and every prompt that uses
    it skips that work. Visual tokens are tied to the checkpoint that made them.
    Runs as a single process.
    """
    from pathlib import Path

    from ..formats.artifacts import cache_dir, write_records
    from ..inference.encoding import resample_records
    from ..inference.generation import batches

    _single_process("resample")
    _setup(seed, quiet)
    records = _records(input)
    model, _ = _load_model(_checkpoint(ckpt), device)
    root = Path(out_dir) if out_dir else cache_dir()
    with _progress(quiet, total=len(records), unit="rec", desc="resample") as bar, open_output(output) as out:
        for batch in batches(records, 64):
            write_records(out, resample_records(model, batch, root=root, device=device))
            bar.update(len(batch))


@cli.command(short_help="Build few-shot prompts from queries and a support set.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options(ckpt=False)
@shot_options
@click.option("--ensembles", type=click.IntRange(min=1), default=1, show_default=True,
              help="Prompt ensembling for close-ended tasks: one record per order of the same shots, up to N "
              "(the paper averages 6); flamingo evaluate averages their scores.")
def prompt(input, output, device, seed, quiet, shots, k, select, template, ensembles):
    """Build interleaved few-shot prompts.

    Reads query records and adds `prompt` (text with <image> markers and
    <|endofchunk|>), `media` (one entry per <image>, in order), `shots` (the ids of
    the demonstrations, in prompt order) and `template`. Shots depend only on --seed
    and the query id. With --ensembles N, each query gives min(N, k!) records, the
    same shots in different orders, each with an `ensemble` number. Runs as a single process.
    """
    from ..formats.artifacts import write_records

    _single_process("prompt")
    if not shots:
        raise click.UsageError("--shots FILE is required")
    records = _records(input)
    with open_output(output) as out:
        write_records(out, _prompt_records(records, shots, k, select, seed, template, ensembles))


@cli.command(short_help="Generate answers for prompt records.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@shot_options
@click.option("--num-beams", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--length-penalty", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@dtype_option
def generate(input, ckpt, output, device, seed, quiet, shots, k, select, template, num_beams,
             max_new_tokens, length_penalty, batch_size, dtype):
    """Generate open-ended answers: beam search, stopping at <|endofchunk|>.

    Reads prompt records (from flamingo prompt) and adds `output`. With --shots, it
    reads query records instead (e.g. from flamingo encode) and builds the prompts
    itself, exactly as flamingo prompt does. Runs as a single process.
    """
    from ..formats.artifacts import write_records
    from ..inference.generation import batches, generate_records

    _single_process("generate")
    _setup(seed, quiet)
    records = _records(input)
    if shots:
        records = _prompt_records(records, shots, k, select, seed, template)
    model, media = _load_model(_checkpoint(ckpt), device)
    with _progress(quiet, total=len(records), unit="rec", desc="generate") as bar, open_output(output) as out:
        for batch in batches(records, batch_size):
            write_records(out, generate_records(model, batch, media, num_beams=num_beams,
                                                max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                                device=device, dtype=_dtype(dtype)))
            bar.update(len(batch))


@cli.command(short_help="Rank candidate answers by likelihood.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@stage_options()
@click.option("--candidates", "candidates_file", type=click.Path(dir_okay=False),
              help="File with one candidate per line (else each record's `candidates`, else the template's).")
@click.option("--normalize", type=click.Choice(["sum", "mean"]), default="sum", show_default=True,
              help="Total log-likelihood, or per token.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Candidates per batched forward.")
@dtype_option
def score(input, ckpt, output, device, seed, quiet, candidates_file, normalize, batch_size, dtype):
    """Score close-ended candidates for prompt records.

    Adds `scores` {candidate: log-likelihood of " candidate<|endofchunk|>" after the
    prompt} and `prediction` (the best). Each prompt runs once; all its candidates
    are scored against the cached prefix in batched forwards. Runs as a single process.
    """
    from ..formats.artifacts import ArtifactError, write_records
    from ..inference.prompting import load_template
    from ..inference.scoring import score_record

    _single_process("score")
    _setup(seed, quiet)
    fixed = None
    if candidates_file:
        try:
            fixed = [line.strip() for line in open(candidates_file, encoding="utf-8") if line.strip()]
        except OSError as e:
            raise ArtifactError(f"{candidates_file}: {e.strerror}") from None
        if not fixed:
            raise ArtifactError(f"{candidates_file}: no candidates")
    records = _records(input)
    model, media = _load_model(_checkpoint(ckpt), device)
    templates = {}
    with _progress(quiet, total=len(records), unit="rec", desc="score") as bar, open_output(output) as out:
        for record in records:
            name = record.get("template")
            if name and name not in templates:
                templates[name] = load_template(name)
            template = templates.get(name)
            candidates = fixed or record.get("candidates") or (template.candidates if template else None)
            if not candidates:
                raise ArtifactError(f"{record.get('id', '<record>')}: no candidates (use --candidates FILE "
                                    "or a 'candidates' field)")
            kw = {"continuation": template.continuation} if template else {}
            write_records(out, [score_record(model, record, media, list(candidates), normalize=normalize,
                                             batch_size=batch_size, device=device, dtype=_dtype(dtype), **kw)])
            bar.update(1)


BENCHMARK_NAMES = ["vqav2", "okvqa", "vizwiz", "textvqa", "coco", "flickr30k", "hatefulmemes", "imagenet"]


@cli.command(short_help="Turn a benchmark's own annotation files into query/support records.")
@click.argument("bench", type=click.Choice(BENCHMARK_NAMES))
@click.argument("root", type=click.Path(file_okay=False))
@click.option("--split", help="The benchmark's split (train, val, test, dev_seen, ...); required unless --classes.")
@click.option("--sample", "n", type=click.IntRange(min=0), help="Keep a seeded random N of the split (file order kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --sample.")
@click.option("--classes", is_flag=True, help="imagenet: write the class names (one per line, synset order) instead.")
@click.option("-o", "--output", default="-", show_default=True, help="Write records here (atomically); - is stdout.")
def data(bench, root, split, n, seed, classes, output):
    """Read benchmark BENCH from ROOT, its download in the benchmark's native layout, and write
    one record per example: `id`, `image`, `split` and the references its metric needs
    (VQA: question, answers, answer; captioning: caption, captions; HatefulMemes: text,
    label; ImageNet: label, synset). The layouts:

    \b
    vqav2         v2_OpenEnded_mscoco_{split}2014_questions.json, v2_mscoco_{split}2014_annotations.json,
                  {split}2014/COCO_{split}2014_<id>.jpg
    okvqa         OpenEnded_mscoco_{split}2014_questions.json, mscoco_{split}2014_annotations.json, COCO images
    vizwiz        Annotations/{split}.json, {split}/<image>
    textvqa       TextVQA_0.5.1_{split}.json, train_images/<image_id>.jpg
    coco          dataset_coco.json (Karpathy; train includes restval), <filepath>/<filename>
    flickr30k     dataset_flickr30k.json (Karpathy), flickr30k-images/<filename>
    hatefulmemes  {split}.jsonl (train, dev_seen, dev_unseen, test_seen, test_unseen), img/<id>.png
    imagenet      LOC_synset_mapping.txt, LOC_val_solution.csv, ILSVRC/Data/CLS-LOC/{train,val}/...
    """
    from ..formats.artifacts import write_records
    from ..evaluation.benchmarks import imagenet_classnames, read_benchmark, sample

    if classes:
        if bench != "imagenet":
            raise click.UsageError("--classes is for imagenet")
        with open_output(output) as out:
            out.write("".join(name + "\n" for name in imagenet_classnames(root)))
        return
    if not split:
        raise click.UsageError("--split is required")
    records = sample(read_benchmark(bench, root, split), n, seed)
    with open_output(output) as out:
        write_records(out, records)


@cli.command(short_help="Score predictions: VQA accuracy, CIDEr-D, top-1, ROC-AUC.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@click.option("-c", "--config", callback=_load_preset, is_eager=True, expose_value=False,
              help="Preset NAME (stages/evaluate/NAME.yaml, one per benchmark) or YAML FILE of option defaults.")
@click.option("--metric", type=click.Choice(["vqa", "cider", "top1", "roc_auc"]), required=True,
              help="vqa: the VQA evaluator's accuracy; cider: CIDEr-D; top1; roc_auc: from P(yes) vs P(no).")
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

    from ..formats.artifacts import read_records_file, write_records
    from ..evaluation.evaluate import PostProcess, evaluate_records, join_references

    records = _records(input)
    if references:
        records = join_references(records, read_records_file(references), metric)
    post = PostProcess(cut=cut_at, quotes=strip_quotes)
    summary, rows = evaluate_records(records, metric, post=post, positive=positive, negative=negative,
                                     vqa_evaluator=vqa_evaluator)
    for item in tag:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--tag")
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


@cli.command(short_help="Pretrain a vision encoder contrastively on image-caption pairs.")
@click.argument("input", default="-", type=click.Path(allow_dash=True))
@click.option("-c", "--config", callback=_load_preset, is_eager=True, expose_value=False,
              help="Preset NAME (stages/contrastive/NAME.yaml) or YAML FILE of option defaults.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write: encoder.yaml, encoder.safetensors, text_tower.safetensors, metrics.jsonl.")
@click.option("--encoder", default="vit_tiny_patch16_224", show_default=True, help="timm model name of the image tower.")
@click.option("--encoder-arg", multiple=True,
              help="KEY=VALUE passed to timm.create_model (YAML value), e.g. img_size=32. Repeat.")
@click.option("--tokenizer", required=True, type=click.Path(),
              help="A tokenizer directory (save_pretrained) for the captions, e.g. the LM's.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=100, show_default=True,
              help="Linear warmup steps, then cosine decay.")
@click.option("--weight-decay", type=float, default=0.1, show_default=True)
@click.option("--embed-dim", type=click.IntRange(min=1), default=128, show_default=True,
              help="Width of the shared image-text embedding space.")
@click.option("--text-width", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--text-layers", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=1, show_default=True,
              help="DataLoader processes decoding images.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Autocast dtype; master weights stay float32.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def contrastive(input, out_dir, encoder, encoder_arg, tokenizer, steps, batch_size, lr, warmup, weight_decay,
                embed_dim, text_width, text_layers, workers, dtype, device, seed, quiet):
    """Pretrain a vision encoder contrastively, as Flamingo does before freezing it.

    Reads image-caption records ({"image": PATH, "caption": TEXT}, JSON Lines; - or
    no INPUT is stdin) and trains the timm image tower with a small text tower on
    the two-term contrastive loss (image->text and text->image InfoNCE, learned
    temperature). Records with the same caption count as positives of each other.
    Writes OUT/encoder.yaml and OUT/encoder.safetensors, which `flamingo init
    --encoder OUT` takes as the frozen encoder, plus the text tower and metrics.jsonl.
    """
    import yaml

    from ..formats.artifacts import ArtifactError
    from ..model.config import EncoderConfig
    from ..training.contrastive import ContrastiveConfig, train_contrastive

    _single_process("contrastive")
    _quiet_libraries(quiet)
    kwargs = {}
    for item in encoder_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--encoder-arg")
        kwargs[key] = yaml.safe_load(value)
    records = _records(input)
    for r in records:
        if not isinstance(r.get("image"), str) or not isinstance(r.get("caption"), str):
            raise ArtifactError(f"{r.get('id', '<record>')}: contrastive needs 'image' (a path) and 'caption' fields")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{tokenizer}: cannot load a tokenizer ({str(e).splitlines()[0][:160]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if text_width % ContrastiveConfig.text_heads:
        raise click.BadParameter(f"must be a multiple of the text tower's {ContrastiveConfig.text_heads} heads",
                                 param_hint="--text-width")
    config = ContrastiveConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                               embed_dim=embed_dim, text_width=text_width, text_layers=text_layers, dtype=dtype,
                               seed=seed)
    # The loss sees timm's pooled (normalised) tokens, so Flamingo should get the tokens after the final norm.
    encoder_config = EncoderConfig(name=encoder, kwargs=kwargs, final_norm=True)
    try:
        with _progress(quiet, total=steps, unit="step", desc="contrastive") as bar:
            last = train_contrastive(records, encoder_config, tok, config, out_dir, device=device, workers=workers,
                                     progress=bar)
    except ValueError as e:
        raise ArtifactError(f"{input}: {e}") from None
    click.echo(f"wrote {out_dir}: loss {last['loss']:.3f}, in-batch image->text accuracy "
               f"{last['image_to_text_accuracy']:.2f}", err=True)


def _preset_entries_for(data: list[str], **named: tuple[str, ...]) -> list[list[str]]:
    """A preset's per-dataset weights and batches apply to its own datasets: when --data on the
    command line replaces them, entries for datasets no longer present are dropped, not errors."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    names = {item.partition("=")[0] for item in data}
    out = []
    for param, entries in named.items():
        if ctx.get_parameter_source(param) == ParameterSource.DEFAULT_MAP:
            entries = [e for e in entries if e.partition("=")[0] in names]
        out.append(list(entries))
    return out


@cli.command(short_help="Train the resampler, gated cross-attention and new token rows.")
@click.option("-c", "--config", callback=_load_preset, is_eager=True, expose_value=False,
              help="Preset NAME (stages/pretrain/NAME.yaml) or YAML FILE of option defaults.")
@click.option("--ckpt", envvar="FLAMINGO_CKPT", type=click.Path(),
              help="Checkpoint to start from (e.g. from flamingo init); also FLAMINGO_CKPT.")
@click.option("--run-dir", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory: checkpoint/ and metrics.jsonl go here.")
@click.option("--resume", is_flag=True, help="Continue the run in --run-dir from its last checkpoint, exactly.")
@click.option("--data", multiple=True, help="NAME=SHARDS: a dataset of webdataset shards (brace patterns allowed). Repeat.")
@click.option("--weight", multiple=True, help="NAME=LAMBDA: the dataset's weight in the loss (default 1.0).")
@click.option("--batch", multiple=True, help="NAME=B: the dataset's global batch size per step (default 8).")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=5000, show_default=True,
              help="Linear warmup steps, then a constant rate.")
@click.option("--weight-decay", type=float, default=0.1, show_default=True, help="AdamW decay; never on the resampler or gates.")
@click.option("--grad-clip", type=float, default=1.0, show_default=True, help="Global gradient-norm clip.")
@click.option("--gate-lr-mult", type=float, default=1.0, show_default=True,
              help="Learning-rate multiplier for the tanh-gate scalars (zero-start gates move slowly in short runs).")
@click.option("--save-every", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Autocast dtype of the forward pass; master weights stay float32.")
@click.option("--split", type=click.Choice(["samples", "shards"]), default="samples", show_default=True,
              help="samples: every process reads the whole stream and keeps its slice of each global batch "
                   "(results independent of the process count); shards: webdataset deals shards to processes "
                   "and DataLoader workers (less reading at scale; results depend on the counts).")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader workers decoding shards per process, with --split shards.")
@click.option("--fsdp", is_flag=True,
              help="Under torchrun: shard the model with FSDP2 (each LM layer, xattn block and the resampler) "
                   "instead of replicating it with DDP, for LMs too large for one device.")
@click.option("--grad-checkpointing", is_flag=True,
              help="Recompute decoder layers and xattn blocks in backward: less memory, more compute.")
@click.option("--window", type=click.IntRange(min=8), default=256, show_default=True,
              help="Tokens per interleaved sample.")
@click.option("--max-images", type=click.IntRange(min=1), default=5, show_default=True,
              help="Images kept per interleaved window.")
@click.option("--p-next", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Per document, probability that text attends to the next image instead of the previous.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def pretrain(ckpt, run_dir, resume, data, weight, batch, steps, lr, warmup, weight_decay, grad_clip, gate_lr_mult,
             save_every, dtype, split, workers, fsdp, grad_checkpointing, window, max_images, p_next, device, seed, quiet):
    """Pretrain on a weighted mixture of webdataset shards, as the paper does.

    Every step accumulates gradients from every dataset, each loss scaled by its
    lambda (--weight); the LM and the vision encoder stay frozen. Shards hold
    image-caption pairs (a caption and an image) or interleaved documents (segments
    of text and image indices), with raw images or precomputed features from
    `flamingo encode --wds`; training from features never loads the encoder.
    Writes RUN/checkpoint/ (a checkpoint every stage accepts, plus the training
    state) and RUN/metrics.jsonl. Under torchrun or SLURM it trains with DDP, or
    with FSDP2 given --fsdp; the global batch does not depend on the process count.
    """
    from pathlib import Path

    import torch

    from ..formats.checkpoint import load_checkpoint, load_checkpoint_encoder
    from ..training.data import ExampleStream, ImageEncoder, ShardStream, parse_specs
    from ..training.sampling import SamplingConfig
    from ..training.trainer import CHECKPOINT_DIR, Distributed, TrainConfig, Trainer, truncate_metrics

    _quiet_libraries(quiet)
    dist = Distributed.from_env()
    if dist.world > 1 and not torch.distributed.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl")
        if device != "cpu":
            device = f"cuda:{dist.local_rank}"
    run = Path(run_dir)
    resumed = resume and (run / CHECKPOINT_DIR / "config.yaml").exists()
    source = run / CHECKPOINT_DIR if resumed else Path(_checkpoint(ckpt, bundled=False))
    specs = parse_specs(list(data), *_preset_entries_for(list(data), weight=weight, batch=batch))
    config = TrainConfig(steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
                         gate_lr_mult=gate_lr_mult, save_every=save_every, dtype=dtype, seed=seed)
    torch.manual_seed(seed)
    model = load_checkpoint(source, with_encoder=False).to(device)
    model.set_activation_checkpointing(grad_checkpointing)
    encode_images = ImageEncoder(lambda: load_checkpoint_encoder(source)[0], device)
    log = (lambda msg: click.echo(msg, err=True)) if dist.rank == 0 else (lambda msg: None)
    run.mkdir(parents=True, exist_ok=True)
    sampling = SamplingConfig(window=window, max_images=max_images, p_next=p_next)
    trainer = Trainer(model, specs, sampling, config, run, dist=dist, encode_images=encode_images, log=log,
                      device=device, fsdp=fsdp)
    if resumed:
        trainer.load_state(source)
        truncate_metrics(run, trainer.step)
    elif resume:
        log(f"flamingo pretrain: nothing to resume in {run}; starting from {source}")
    if split == "shards":
        streams = {s.name: ShardStream(s, model.tokenizer, sampling, seed=seed, world=dist.world, workers=workers,
                                       position=trainer.positions[s.name], log=log) for s in specs}
    else:
        streams = {s.name: ExampleStream(s, model.tokenizer, sampling, seed=seed,
                                         position=trainer.positions[s.name], log=log) for s in specs}
    with _progress(quiet or dist.rank != 0, total=steps, initial=trainer.step, unit="step",
                   desc="pretrain") as bar:
        trainer.train(streams, bar)
    if dist.world > 1:
        torch.distributed.destroy_process_group()


def main() -> None:
    """Entry point: click in non-standalone mode, so a closed pipe can end quietly with 0."""
    # Stages of one pipe share the cores. OpenMP's default of spinning while it waits makes
    # a busy neighbour slow every small op by ~50x; sleeping threads cost almost nothing.
    # Set before torch loads; the user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        code = cli.main(prog_name="flamingo", standalone_mode=False)
        sys.stdout.flush()
    except BrokenPipeError:  # raised by the final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
