"""`flamingo server`: a warm process that runs stages for the shell, so each command skips the
seconds of importing torch, transformers and timm (cli/forkserver.py is how)."""
from __future__ import annotations

import os
import sys

import click

from .forkserver import default_socket


@click.command(short_help="Keep a warm process that runs stages, so each command starts at once.")
@click.option("--socket", "path", envvar="FLAMINGO_SERVER", default=default_socket, show_default=True,
              type=click.Path(dir_okay=False), help="The Unix socket to listen on (commands find it in FLAMINGO_SERVER).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=0, show_default=True, metavar="SECONDS",
              help="Exit after this long with nothing to run; 0 never does.")
@click.option("--detach", is_flag=True, help="Run in the background: return once the server is ready.")
@click.option("--log", type=click.Path(dir_okay=False), help="With --detach: append the server's own messages "
              "here (default: none; a stage's messages go to its command's stderr either way).")
@click.option("--stop", is_flag=True, help="Stop the server listening on --socket (it finishes the stages it runs).")
def server(path, idle_timeout, detach, log, stop):
    """Keep a process with torch, transformers and timm imported that runs stages for the shell.

    A stage's fixed cost is mostly importing (seconds); on a small job that is most of its time.
    With FLAMINGO_SERVER set to the server's socket, every `flamingo STAGE` hands its arguments,
    directory, environment, stdin, stdout and stderr to the server, which forks a child that runs
    it on them: outputs, exit codes, pipes (`| head -1`), Ctrl-C and SIGTERM behave as without the
    server. When nothing listens on FLAMINGO_SERVER, commands run themselves, saying so once.

    \b
        flamingo server --detach --socket /tmp/fl.sock
        export FLAMINGO_SERVER=/tmp/fl.sock
        flamingo encode imgs/ | flamingo generate --shots shots.jsonl
        flamingo server --stop --socket /tmp/fl.sock

    The socket is this user's only (no access for group or others; the peer's uid is checked). Each stage runs in
    a fresh child of a process that has only imported: it loads its model as the command would,
    and nothing it does reaches the next one. OMP_NUM_THREADS is the command's; OMP_WAIT_POLICY
    is the server's, read once as torch loads: by default OpenMP threads spin while they wait,
    fastest for one stage at a time; start the server with OMP_WAIT_POLICY=PASSIVE when its
    commands run side by side on few cores (a pipe's stages), as a stage in a pipe does alone.
    """
    from .forkserver import Server, stop_server, warm_up

    if stop:
        stop_server(path)
        return
    ready = _detach(log) if detach else None
    instance = Server(path, idle_timeout or None)
    listener = instance.bind()
    warm_up()
    click.echo(f"flamingo server: ready on {path} (pid {os.getpid()})", err=True)
    if ready:
        ready()
    instance.serve(listener)


def _detach(log: str | None):
    """Fork: this process waits for the server's word that it listens, then exits with its
    status; the server gets the function that says that word. From then on the server holds none
    of the starting command's descriptors, so a pipe from it (`$(...)`, make, subprocess) ends
    when the command does."""
    read, write = os.pipe()
    if os.fork():
        os.close(write)
        if os.read(read, 1) != b"1":  # it failed before listening, and said why on stderr
            sys.exit(1)
        sys.exit(0)
    os.close(read)
    os.setsid()

    def ready() -> None:
        devnull = os.open(os.devnull, os.O_RDWR)
        messages = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if log else devnull
        for fd, target in ((devnull, 0), (devnull, 1), (messages, 2)):
            os.dup2(fd, target)
        os.write(write, b"1")
        os.close(write)

    return ready


