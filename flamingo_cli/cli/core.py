"""The `flamingo` group, its error handling, and the options and helpers its commands share.

torch, transformers and timm are imported inside functions so `--help` stays instant.
Configuration precedence: flag > FLAMINGO_<CMD>_<OPT> environment variable > --config YAML > default.
"""
from __future__ import annotations

import itertools
import os
import signal
import stat
import sys
import traceback
from collections.abc import Iterable, Iterator

import click

from .. import __version__
from ..errors import ConfigError, FlamingoError
from ..formats.artifacts import storage_failure
from .forkserver import is_server_command, run_in_server

DTYPES = ["float32", "bfloat16", "float16"]


def _debug() -> bool:
    return os.environ.get("FLAMINGO_DEBUG", "") not in ("", "0")


class Interrupted(BaseException):
    """Ctrl-C, kept from click (whose Abort prints a blank line and exits 1)."""


class Terminated(BaseException):
    """SIGTERM (timeout, SLURM, container runtimes), raised where the main process is, so it
    unwinds as Ctrl-C does: temp files and directories are removed on the way out."""


_MAIN_PID = None  # set by main(), before any worker is forked


def _terminate(signum, frame):
    if os.getpid() != _MAIN_PID:  # a forked DataLoader worker: end as the signal means
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Terminated


class FlamingoGroup(click.Group):
    """Maps library errors to one line on stderr and exit 1; a closed stdout pipe to exit 0."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise Interrupted from None
        except FlamingoError as e:
            from ..inference.sharding import RankStopped

            if isinstance(e, RankStopped):  # rank 0 says why, once
                raise click.exceptions.Exit(1) from None
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


def _in_pipe() -> bool:
    """Whether stdin or stdout is a pipe, so another process may be working beside this one."""
    for fd in (0, 1):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                return True
        except OSError:  # closed
            pass
    return False


def main(argv: list[str] | None = None, *, forwarded: bool = False) -> None:
    """Entry point: click in non-standalone mode, so a closed pipe can end quietly with 0. With
    FLAMINGO_SERVER set, the command is handed to that server (`flamingo server`), which runs
    it here in a child of its own (forwarded)."""
    argv = sys.argv[1:] if argv is None else argv
    if not forwarded:
        run_in_server(argv)  # exits with the command's status where a server ran it
    # Stages of one pipe share the cores. OpenMP's default of spinning while it waits makes
    # a busy neighbour slow every small op by ~50x, so in a pipe threads sleep instead; alone,
    # spinning is faster for small ops (benchmarks/cli_overhead.py). Set before torch loads; the
    # user's own setting wins.
    if _in_pipe() and not is_server_command(argv):  # a server's stages are not its pipes
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = cli.main(args=argv, prog_name="flamingo", standalone_mode=False)
        sys.stdout.flush()
    except Interrupted:  # as shells report a process ended by a signal: 128 + its number
        click.echo("flamingo: interrupted", err=True)
        code = 128 + signal.SIGINT
    except Terminated:
        click.echo("flamingo: terminated", err=True)
        code = 128 + signal.SIGTERM
    except BrokenPipeError:  # raised by the final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except OSError as e:
        if storage_failure(e) is None:
            raise
        click.echo(f"Error: <stdout>: cannot write ({storage_failure(e)})", err=True)  # the final flush
        code = 1
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    code = code if isinstance(code, int) else 0
    if _in_group():
        # A torchrun/srun rank, its work done and written: leave without the interpreter's teardown,
        # in which gloo's threads can abort the finished process ("terminate called without an
        # active exception", a SIGABRT that fails the whole job).
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        os._exit(code)
    sys.exit(code)


def _in_group() -> bool:
    """A torchrun/srun rank that may have joined a torch.distributed group, even if it has left
    it since (pretrain does): gloo's threads can abort the teardown either way."""
    if "torch.distributed" not in sys.modules:
        return False
    from ..inference.sharding import launched

    return launched() is not None


# -- options -------------------------------------------------------------------------------

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


def preset_option(help: str = "Preset NAME (stages/<stage>/NAME.yaml) or YAML FILE of option defaults."):
    """-c/--config: eager, so the preset's values become defaults before other options are read."""
    return click.option("-c", "--config", callback=_load_preset, is_eager=True, expose_value=False, help=help)


def stage_options(*, ckpt: bool = True):
    """Options every stage shares."""
    def decorate(f):
        options = [
            preset_option(),
            click.option("-o", "--output", default="-", show_default=True,
                         help="Write records here (atomically); - is stdout."),
            click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1, ..."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed for anything random."),
            click.option("-q", "--quiet", is_flag=True, help="No progress bars (also TQDM_DISABLE=1)."),
        ]
        if ckpt:
            options[1:1] = [
                click.option("--ckpt", envvar="FLAMINGO_CKPT", type=click.Path(),
                             help="Checkpoint directory, a hub repo id holding one, or a bundled model: toy (the "
                                  "default), toy-video (also FLAMINGO_CKPT)."),
                click.option("--revision", envvar="FLAMINGO_REVISION", expose_value=False, callback=_keep_revision,
                             help="With --ckpt a hub repo id: its branch, tag or commit (default: main)."),
            ]
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


dtype_option = click.option("--dtype", type=click.Choice(DTYPES), default="float32",
                            show_default=True, help="Autocast dtype for the frozen parts (bfloat16 is fast on CPUs with AMX).")

model_dtype_option = click.option(
    "--dtype", type=click.Choice(DTYPES), default=None,
    help="Hold the model (the frozen LM, the cross-attention and the resampler) in this dtype, cast once as it "
         "loads: bfloat16 halves its memory and is faster where the CPU or GPU has bf16 units; scores and, near "
         "ties, answers differ from float32. Default: the checkpoint's lm.dtype (float32 unless its config says "
         "otherwise), the rest float32.")

prefix_cache_option = click.option(
    "--prefix-cache", "prefix_cache_mib", type=click.IntRange(min=0), default=2048, show_default=True, metavar="MIB",
    help="Keep up to MIB of prompt states, so prompts that begin alike (the same demonstrations) run what they "
         "share once; 0 turns it off. Outputs are the same either way.")


def prefix_cache(model, mib: int):
    from ..inference.prefix_cache import PrefixCache

    return PrefixCache(model, max_bytes=mib << 20) if mib else None


def shot_options(f):
    """How `prompt` (and `generate --shots`) build few-shot prompts."""
    for option in reversed([
        click.option("--shots", type=click.Path(dir_okay=False), help="Support records (JSON Lines) to draw shots from."),
        click.option("-k", "k", type=click.IntRange(min=0), default=4, show_default=True,
                     help="Shots per prompt; 0 = zero-shot with 2 text-only examples."),
        click.option("--select", type=click.Choice(["random", "rices", "first"]), default="random", show_default=True,
                     help="Shot selection; rices = most similar by pooled features or an image embedding (prompt "
                          "--rices-vectors), most similar last."),
        click.option("--template", default="captioning", show_default=True,
                     help="Prompt template NAME (stages/prompt/) or YAML FILE."),
    ]):
        f = option(f)
    return f


def key_values(items: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    """Repeated KEY=VALUE options, split."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        pairs.append((key, value))
    return pairs


# -- what a command does before it calls the library ---------------------------------------

def quiet_libraries(quiet: bool = False) -> None:
    """Progress bars only on a terminal and without --quiet, transformers' included."""
    if quiet or not sys.stderr.isatty() or os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def setup(seed: int, quiet: bool) -> None:
    import torch

    quiet_libraries(quiet)
    torch.manual_seed(seed)


def progress(quiet: bool, **kw):
    from tqdm import tqdm

    disable = True if quiet or os.environ.get("TQDM_DISABLE", "") not in ("", "0") else None
    return tqdm(file=sys.stderr, disable=disable, dynamic_ncols=True, **kw)


def say_derived_ids(first: str) -> None:
    source = first.rpartition(":")[0]
    click.echo(f"flamingo: {'<stdin>' if source == 'stdin' else source}: records without an 'id' are named by "
               f"their line ({first}, ...)", err=True)


def input_records(source: str) -> Iterator[dict]:
    """The records of a file, of stdin ('-') or of webdataset shards (`data/{000..009}.tar`, their
    media unpacked into the cache: formats/shards.py), read as they are consumed, so a stage works on
    the first batch while the rest is still arriving. Empty input is an error here, before any
    model loads; a bad line later on is an error when it is reached."""
    from ..formats.artifacts import ArtifactError, cache_dir
    from ..formats.records import iter_records_file, read_records
    from ..formats.shards import is_shards, shard_records

    if is_shards(source):
        records = shard_records(source, cache_dir() / "shards")
    elif source == "-":
        if sys.stdin.isatty():
            raise click.UsageError("no input: pipe JSON Lines records in, or name a file (- means stdin)")
        records = read_records(sys.stdin.buffer, "<stdin>", on_derived_id=say_derived_ids)
    else:
        records = iter_records_file(source, on_derived_id=say_derived_ids)
    records = peeked(records)
    if records is None:
        raise ArtifactError(f"{'<stdin>' if source == '-' else source}: no records")
    return records


def peeked(items: Iterator) -> Iterator | None:
    """The same items, the first already read (so its errors come now), or None if there are none."""
    first = next(items, None)
    return None if first is None else itertools.chain([first], items)


def _keep_revision(ctx: click.Context, param, value):
    ctx.meta["flamingo.revision"] = value


def checkpoint_dir(ckpt: str | None, *, bundled: bool = True, quiet: bool = False) -> str:
    """--ckpt (a directory, or a hub repo id at --revision: its snapshot in the hub cache), else
    FLAMINGO_CKPT, else the bundled toy model (said on stderr unless quiet: it knows only its world)."""
    if ckpt:
        from ..formats.checkpoint import checkpoint_path

        ctx = click.get_current_context(silent=True)
        return str(checkpoint_path(ckpt, ctx.meta.get("flamingo.revision") if ctx else None))
    if not bundled:
        raise click.UsageError("no checkpoint: pass --ckpt DIR or set FLAMINGO_CKPT")
    from ..formats.checkpoint import BUNDLED_CHECKPOINT

    if not quiet:
        click.echo(f"flamingo: no --ckpt or FLAMINGO_CKPT, using the bundled toy model ({BUNDLED_CHECKPOINT}); "
                   "it knows only the shapes world of examples/toy", err=True)
    return str(BUNDLED_CHECKPOINT)


def autocast_dtype(name: str):
    import torch

    return None if name == "float32" else getattr(torch, name)


def shot_prompts(queries: Iterable[dict], shots_file: str, k: int, select: str, seed: int, template_name: str,
                 ensembles: int = 1, *, quiet: bool = False, rices_vectors: str = "pooled") -> Iterator[dict]:
    """--shots FILE, -k, --select, --template: the queries' few-shot prompt records, made as the
    queries arrive (the template and support set are read now, so their errors come first). A
    user who hands over a shots file without -k means "use these": up to the default -k of them."""
    from click.core import ParameterSource

    from ..formats.records import read_records_file
    from ..inference.prompting import load_template, prompt_records, shots_available

    template = load_template(template_name)
    support = read_records_file(shots_file, on_derived_id=say_derived_ids)
    ctx = click.get_current_context()
    default_k = ctx.get_parameter_source("k") == ParameterSource.DEFAULT
    available = shots_available(support)
    counts = [0, 0]  # queries, and those with fewer than k shots

    def counted(queries):
        for query in queries:
            counts[0] += 1
            counts[1] += available(query) < k
            yield query

    def prompts():
        yield from prompt_records(template, counted(queries), support, k=k, method=select, seed=seed,
                                  ensembles=ensembles, at_most=default_k, vectors=rices_vectors)
        if default_k and counts[1] and not quiet:
            click.echo(f"flamingo {ctx.info_name}: {shots_file} has fewer than the default {k} shots for {counts[1]} "
                       f"of {counts[0]} queries; their prompts use all it has (-k N requires N)", err=True)

    return prompts()


def init_config(name_or_file: str | None):
    """An init preset by name (stages/init/NAME.yaml) or file, as a FlamingoConfig."""
    from ..formats.presets import preset_path
    from ..model.config import FlamingoConfig

    if name_or_file is None:
        return FlamingoConfig()
    path = preset_path("init", name_or_file)
    try:
        return FlamingoConfig.from_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    except ConfigError as e:
        raise click.ClickException(f"{path}: {e}") from None
