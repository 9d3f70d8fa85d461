"""The `flamingo` command."""
from .core import cli, main

__all__ = ["cli", "main"]
