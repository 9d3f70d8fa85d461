"""`flamingo chat`: a visual dialogue on the terminal, or dialogue records answered as a filter."""
from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Iterator

import click

from ..errors import FlamingoError
from ..evaluation.dialogue import Round, dialogue_text
from .core import (checkpoint_dir, input_records, model_dtype_option, prefix_cache, prefix_cache_option,
                   say_derived_ids, setup, stage_options)
from .placing import device_map_option, placed, placed_run, single_process

PROMPT = "> "
COMMANDS = """\
  QUESTION       ask it; the answer streams to stdout and the round joins the dialogue
  /image PATH    a new dialogue, about another image
  /caption TEXT  the image's caption, said before the rounds (no TEXT: none)
  /reset         forget the rounds so far (the image stays)
  /help          this list
  /quit          leave (so do Ctrl-D and, at the prompt, Ctrl-C)"""


def render_dialogue(record: dict) -> str:
    """A checked dialogue record's text after its <image>, as VisDial evaluation renders a round."""
    history = [Round(r["question"], r["answer"]) for r in record.get("history", [])]
    return dialogue_text(record["question"], history, record.get("caption"))


@click.command(short_help="Talk about an image, or answer dialogue records.")
@click.argument("image", required=False)
@click.option("--caption", help="IMAGE's caption, said to the model before the dialogue.")
@click.option("--records", "records_input", metavar="FILE", type=click.Path(allow_dash=True),
              help="Answer the dialogue records of FILE (- is stdin) instead: what chat does when stdin is not "
                   "a terminal and no IMAGE is named.")
@stage_options()
@click.option("--shots", type=click.Path(dir_okay=False), help="Support records (JSON Lines) to draw shots from.")
@click.option("-k", "k", type=click.IntRange(min=0), default=4, show_default=True,
              help="Shots before each dialogue; 0 = two text-only examples.")
@click.option("--select", type=click.Choice(["random", "rices", "first"]), default="random", show_default=True,
              help="Shot selection, by --seed and the dialogue's id; rices needs records with features.")
@click.option("--template", default="vqa", show_default=True,
              help="Template NAME (stages/prompt/) or YAML FILE whose `shot` renders the shots.")
@click.option("--num-beams", type=click.IntRange(min=1), default=1, show_default=True,
              help="1 is greedy, and streams; more beams give the answer when they are done.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--length-penalty", type=float, default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Dialogue records per batch (as a filter).")
@model_dtype_option
@prefix_cache_option
@device_map_option
def chat(image, caption, records_input, ckpt, output, device, seed, quiet, shots, k, select, template, num_beams,
         max_new_tokens, length_penalty, batch_size, dtype, prefix_cache_mib, device_map):
    """Talk with the model about an image, or answer dialogue records.

    On a terminal, `flamingo chat IMAGE` starts a dialogue about IMAGE: type a
    question and its answer streams to stdout as it is decoded; each round joins
    the history the next question is asked with. The model reads IMAGE, then the
    caption and the rounds as VisDial evaluation writes them ("Question: ...
    Answer: ..."). Commands: /image PATH (a new dialogue about another image),
    /caption TEXT, /reset (forget the rounds), /help, /quit. Ctrl-C stops an answer,
    which is then not kept; at the prompt it leaves (exit 130), as does Ctrl-D (0).
    The prompt and all messages go to stderr. With stdin not a terminal, each line
    is a question or command and each answer one line of stdout.

    With --records FILE, or with no IMAGE and stdin not a terminal, chat is a
    filter: it reads dialogue records, {"id", "image", "caption" (optional),
    "history": [{"question", "answer"}, ...] (optional), "question"}, and writes
    each with `output`, the answer a chat would give after the same rounds.

    Answers are greedy unless --num-beams says otherwise, and end at
    <|endofchunk|>, a newline or a new "Question". With --shots, the shots come
    first, chosen as generate --shots chooses them (by --seed and the dialogue's
    id; a terminal's dialogue is "chat") and rendered by --template's shot.
    """
    from ..inference.chat import Chat, answer_records
    from ..inference.generation import batches
    from ..inference.media import load_for_inference

    single_process("chat")
    filtering = records_input is not None or (image is None and not sys.stdin.isatty())
    if filtering and (image is not None or caption is not None):
        raise click.UsageError("IMAGE and --caption start a chat; dialogue records name their own image and caption")
    if caption is not None and image is None:
        raise click.UsageError("--caption is IMAGE's: name the image too")
    if not filtering and output != "-":
        raise click.UsageError("-o writes the records of a filter (--records); a chat's answers go to stdout")
    if not filtering and select == "rices":
        raise click.UsageError("--select rices needs records with features (flamingo encode): use it with --records")
    setup(seed, quiet)
    records = input_records(records_input or "-") if filtering else None
    demonstrations = _shots(shots, k, select, seed, template)
    place = placed(None, device_map)
    model, media = load_for_inference(checkpoint_dir(ckpt, quiet=quiet), device, dtype=dtype, device_map=device_map)
    decoding = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                    device=media.device, prefix_cache=prefix_cache(model, prefix_cache_mib))
    if filtering:
        def work(batch):
            yield answer_records(model, batch, media, render_dialogue, shots=demonstrations, **decoding)

        units = batches(records, batch_size)
        with placed_run(place, output, units, work, quiet=quiet, desc="chat") as (results, write):
            for outputs in results:
                write(outputs)
        return
    session = Chat(model, media, render_dialogue, shots=demonstrations, **decoding)
    if image is not None:
        session.attach(image, caption)
    _converse(session, terminal=sys.stdin.isatty())


def _shots(shots_file: str | None, k: int, select: str, seed: int, template: str):
    """--shots FILE and its options; a -k left at its default means up to that many."""
    from click.core import ParameterSource

    from ..formats.records import read_records_file
    from ..inference.chat import Shots
    from ..inference.prompting import load_template

    if not shots_file:
        return None
    at_most = click.get_current_context().get_parameter_source("k") == ParameterSource.DEFAULT
    return Shots(load_template(template), read_records_file(shots_file, on_derived_id=say_derived_ids), k=k,
                 select=select, seed=seed, at_most=at_most)


def _converse(chat, *, terminal: bool) -> None:
    """Questions and commands, a line each, until /quit or the end of input. On a terminal a
    failed question or command is said and the dialogue goes on; from a pipe it ends the run,
    as a bad record ends any stage."""
    if terminal:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (input() then edits lines and recalls earlier ones)
        about = f"ask about {chat.image}" if chat.image else "/image PATH to begin"
        click.echo(f"flamingo chat: {about}; /help lists the commands, Ctrl-D leaves", err=True)
    for line in _lines(terminal):
        line = line.strip()
        try:
            if line.startswith("/"):
                if not _command(chat, line, terminal):
                    return
            elif line:
                _answer(chat, line, terminal)
        except FlamingoError as e:
            if not terminal:
                raise
            click.echo(f"Error: {e}", err=True)


def _lines(terminal: bool) -> Iterator[str]:
    """The lines of input: from a terminal through input() (its line editing), each after the
    prompt (on stderr, where input() would write it to stdout); from a pipe as they arrive.
    Input that is not UTF-8 ends the chat, as it ends any stage."""
    from ..formats.artifacts import ArtifactError

    if not terminal:
        for number, line in enumerate(sys.stdin.buffer, start=1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                raise ArtifactError(f"<stdin>: line {number}: not UTF-8 text") from None
        return
    for number in itertools.count(1):
        try:
            sys.stderr.write(PROMPT)
            sys.stderr.flush()
            line = input()
            line.encode("utf-8")  # bytes that are not UTF-8 come as lone surrogates
        except EOFError:
            click.echo(err=True)  # ends the prompt's line
            return
        except KeyboardInterrupt:
            click.echo(err=True)
            raise
        except UnicodeError:
            raise ArtifactError(f"<stdin>: line {number}: not UTF-8 text") from None
        yield line


def _answer(chat, question: str, terminal: bool) -> None:
    pieces = chat.ask(question)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        if not terminal:
            raise
        pieces.close()
        click.echo("")
        click.echo("flamingo chat: answer stopped, and not kept in the dialogue", err=True)
        return
    click.echo("")


def _command(chat, line: str, terminal: bool) -> bool:
    """Does a /command; False when it is /quit."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/image":
        if len(argument) > 1 and argument[0] == argument[-1] and argument[0] in "'\"":
            argument = argument[1:-1]  # a path quoted as a shell would take it
        if not argument:
            raise FlamingoError("/image needs the PATH of an image")
        chat.attach(os.path.expanduser(argument))
        if terminal:
            click.echo(f"flamingo chat: a new dialogue, about {argument}", err=True)
    elif name == "/caption":
        chat.caption = argument or None
    elif name == "/reset":
        chat.reset()
    elif name == "/help":
        click.echo(COMMANDS, err=True)
    else:
        raise FlamingoError(f"unknown command {name} (/help lists them)")
    return True
