"""The `flamingo` command: one module per command, each parsing and validating its flags and
then calling library functions a Python user can call directly. `core` holds the group, its
error handling and the options the commands share. Nothing heavy is imported here, so
`flamingo --help` is instant."""
from . import (card, chat, contrastive, data, encode, evaluate, generate, importing, init, merge, pretrain, prompt,
               resample, score, server)
from .core import cli, main

# In this order in `flamingo --help` and flamingo(1).
for _command in (init.init, importing.import_, encode.encode, resample.resample, prompt.prompt,
                 generate.generate, score.score, chat.chat, merge.merge, data.data, evaluate.evaluate,
                 contrastive.contrastive, pretrain.pretrain, card.card, server.server):
    cli.add_command(_command)

__all__ = ["cli", "main"]
