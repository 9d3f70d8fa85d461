"""Regenerate man/flamingo.1 and man/flamingo-<cmd>.1 from the click --help texts.

Run with `make man`. The date and version are fixed inputs, so the output is
reproducible and tests/cli/test_cli.py can check the committed pages are current.
"""
import sys
from pathlib import Path

from click_man.core import write_man_pages

from flamingo_cli import __version__
from flamingo_cli.cli import cli

MAN_DATE = "2026-11-26"


def main(target: str) -> None:
    Path(target).mkdir(parents=True, exist_ok=True)
    write_man_pages("flamingo", cli, version=__version__, target_dir=target, date=MAN_DATE)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
