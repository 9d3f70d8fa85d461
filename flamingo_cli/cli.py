"""The `flamingo` command: thin click commands that parse, validate and hand off to the library.

torch, transformers and timm are imported inside commands so `--help` stays instant.
Configuration precedence: flag > FLAMINGO_<CMD>_<OPT> environment variable > --config YAML > default.
"""
from __future__ import annotations

import os
import sys
import traceback

import click

from . import __version__
from .errors import FlamingoError


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


def _quiet_libraries() -> None:
    """Progress bars only on a terminal (unix.md §8), transformers' included."""
    if not sys.stderr.isatty() or os.environ.get("TQDM_DISABLE"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _load_yaml_config(path: str | None):
    from .config import FlamingoConfig

    if path is None:
        return FlamingoConfig()
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as e:
        raise click.ClickException(f"{path}: {e.strerror}") from None
    from .errors import ConfigError

    try:
        return FlamingoConfig.from_yaml(text)
    except ConfigError as e:
        raise click.ClickException(f"{path}: {e}") from None


@cli.command(short_help="Create an untrained checkpoint.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="A FlamingoConfig YAML preset, e.g. stages/init/tiny.yaml.")
@click.option("--lm", help="The frozen causal LM: a local directory (or a hub id when online).")
@click.option("--lm-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="dtype the frozen LM is held in.")
@click.option("--encoder", help="timm model name of the frozen vision encoder.")
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
    from .checkpoint import new_model, save_checkpoint
    from .config import EncoderConfig

    _quiet_libraries()
    config = _load_yaml_config(config_path)
    for value, section, field in [(lm, config.lm, "path"), (lm_dtype, config.lm, "dtype"),
                                  (every, config.xattn, "every"), (placement, config.xattn, "placement"),
                                  (latents, config.resampler, "num_latents")]:
        if value is not None:
            setattr(section, field, value)
    if encoder is not None:
        config.encoder = EncoderConfig(name=encoder)
    if encoder_weights is not None:
        config.encoder.weights = encoder_weights
    model = new_model(config, seed=seed)
    save_checkpoint(model, out, embed_lm=bool(embed), embed_encoder=bool(embed) or config.encoder.weights is None)
    n = sum(p.numel() for p in model.trainable_parameters())
    click.echo(f"wrote {out}: {n:,} trainable parameters, xattn before LM layers "
               f"{', '.join(model.xattn.keys())} (untrained)", err=True)


def main() -> None:
    """Entry point: click in non-standalone mode, so a closed pipe can end quietly with 0."""
    try:
        code = cli.main(prog_name="flamingo", standalone_mode=False)
        sys.stdout.flush()
    except BrokenPipeError:
        # `flamingo ... | head -1`: the reader has what it wanted; that is success, and silence.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    sys.exit(code if isinstance(code, int) else 0)
