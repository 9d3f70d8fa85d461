"""`flamingo import`: one subcommand per toolkit whose checkpoints we convert."""
from __future__ import annotations

import click

from . import import_idefics, import_openflamingo


@click.group(name="import", short_help="Convert other toolkits' checkpoints into ours.")
def import_():
    """Convert checkpoints written by other Flamingo implementations into checkpoint directories."""


import_.add_command(import_openflamingo.import_openflamingo)
import_.add_command(import_idefics.import_idefics)
