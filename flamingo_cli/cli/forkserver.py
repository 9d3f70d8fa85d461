"""The warm process behind `flamingo server`, and the side of a command that hands it its work.

A stage's fixed cost is mostly importing torch, transformers and timm. The server imports them
once and listens on a Unix socket. With FLAMINGO_SERVER naming that
socket, `flamingo STAGE ...` does not run the stage itself: it hands the server its arguments,
working directory, environment and its own stdin, stdout and stderr (the descriptors, passed over
the socket), and the server forks a child that runs the stage on them, exactly as the command
would have. Pipes, files, terminals, `| head -1`, exit codes and signals (forwarded by the
command) behave as without the server; the command waits and exits with the child's status.

The parent never runs a model: each stage forks from a process that has only imported, so
children share no thread pools and no device state, and one child's failure is its own.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path

from ..errors import FlamingoError

# What stages import before their first record: the parent imports it once, each child inherits it.
WARM_MODULES = (
    "torch", "torch.distributed", "transformers", "transformers.modeling_utils", "transformers.generation",
    "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.opt.modeling_opt", "transformers.models.gpt_neox.modeling_gpt_neox",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto", "timm", "timm.data",
    "safetensors.torch", "PIL.Image", "tqdm", "yaml",
    "flamingo_cli.formats.checkpoint", "flamingo_cli.formats.records", "flamingo_cli.inference.media",
    "flamingo_cli.inference.encoding", "flamingo_cli.inference.prompting", "flamingo_cli.inference.generation",
    "flamingo_cli.inference.scoring", "flamingo_cli.inference.prefix_cache",
)
_FDS = (0, 1, 2)
_HEADER = struct.Struct("!I")
_MAX_REQUEST = 16 << 20  # arguments and environment; more is not a command's


class ServerError(FlamingoError):
    """The server cannot listen where it was asked to, or is not there to stop."""


def default_socket() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return str(Path(base) / f"flamingo-{os.getuid()}.sock")


# -- the command's side ----------------------------------------------------------------------

def run_in_server(argv: list[str]) -> None:
    """Under FLAMINGO_SERVER, `flamingo ARGV` runs in that server and this process exits with its
    status; where nothing listens, it returns (saying so) and the command runs here."""
    path = os.environ.get("FLAMINGO_SERVER", "")
    if not path or is_server_command(argv):
        return
    code = forward(path, argv)
    if code is not None:
        sys.exit(code)
    print(f"flamingo: no server listening at FLAMINGO_SERVER={path}; running the command here", file=sys.stderr)


def is_server_command(argv: list[str]) -> bool:
    return next((a for a in argv if not a.startswith("-")), None) == "server"


def forward(path: str, argv: list[str]) -> int | None:
    """Run `flamingo ARGV` in the server at path, on this process's stdin, stdout and stderr;
    its exit status, or None when no server answers there (the caller runs the stage itself)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    fds = [fd for fd in _FDS if _is_open(fd)]
    request = json.dumps({"argv": argv, "cwd": _cwd(), "env": dict(os.environ), "fds": fds}).encode()
    socket.send_fds(conn, [_HEADER.pack(len(request))], fds)
    conn.sendall(request)

    def relay(signum, frame):  # Ctrl-C, a timeout's SIGTERM, a closed terminal: the child gets it
        try:
            conn.sendall(json.dumps({"signal": signum}).encode() + b"\n")
        except OSError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, relay)
    for line in conn.makefile("rb"):
        if "exit" in (message := json.loads(line)):
            return message["exit"]
    print(f"flamingo: the server at {path} stopped before the command finished", file=sys.stderr)
    return 1


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # the directory was removed under us: the child says so when it needs it
        return "/"


# -- the server's side -----------------------------------------------------------------------

class Server:
    def __init__(self, path: str, idle_timeout: float | None):
        self.path, self.idle_timeout = path, idle_timeout
        self.children: dict[int, socket.socket] = {}  # pid -> its command's connection
        self.last_active = time.monotonic()
        self.stopping = False
        self.wake: tuple[socket.socket, ...] = ()

    def bind(self) -> socket.socket:
        """The socket, readable by this user only; a stale one (no server behind it) is replaced."""
        path = Path(self.path)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
                raise ServerError(f"{self.path}: a server is already listening there")
            except ConnectionRefusedError:
                path.unlink()
            except OSError as e:
                if not path.is_socket():
                    raise ServerError(f"{self.path}: exists and is not a socket") from None
                raise ServerError(f"{self.path}: {e.strerror}") from None
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            listener.bind(self.path)
        except OSError as e:
            raise ServerError(f"{self.path}: cannot listen there ({e.strerror})") from None
        finally:
            os.umask(old)
        listener.listen(64)
        return listener

    def serve(self, listener: socket.socket) -> None:
        import selectors

        wake_r, wake_w = self.wake = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, "accept")
        selector.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while not (self.stopping and not self.children):
                for key, _ in selector.select(timeout=1.0):
                    if key.data == "accept" and not self.stopping:
                        self._accept(listener, selector)
                    elif key.data == "wake":
                        while True:
                            try:
                                if not wake_r.recv(256):
                                    break
                            except BlockingIOError:
                                break
                    elif isinstance(key.data, int):
                        self._from_command(key.data, selector)
                self._reap(selector)
                if self.stopping and listener.fileno() != -1:  # new commands find no one and run themselves
                    selector.unregister(listener)
                    listener.close()
                    Path(self.path).unlink(missing_ok=True)
                if (self.idle_timeout and not self.children
                        and time.monotonic() - self.last_active > self.idle_timeout):
                    break
        finally:
            signal.set_wakeup_fd(-1)
            listener.close()
            Path(self.path).unlink(missing_ok=True)

    def _stop(self, signum, frame) -> None:
        """SIGTERM or SIGINT: the stages running end too (each as its command would)."""
        self.stopping = True
        for pid in self.children:
            _kill(pid, signal.SIGTERM)

    def _accept(self, listener: socket.socket, selector) -> None:
        import selectors

        try:
            conn, _ = listener.accept()
        except OSError:  # the command gave up between connecting and being accepted
            return
        try:
            request, fds = _read_request(conn)
        except (OSError, ValueError) as e:
            print(f"flamingo server: a malformed request ({e}): ignored", file=sys.stderr, flush=True)
            conn.close()
            return
        self.last_active = time.monotonic()
        if request.get("stop"):  # flamingo server --stop: the stages running finish first
            self.stopping = True
            try:
                conn.sendall(json.dumps({"exit": 0}).encode() + b"\n")
            except OSError:
                pass
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the child: never returns
            selector.close()
            for other in (listener, *self.children.values(), *self.wake):
                other.close()
            _run_in_child(request, fds, conn)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        selector.register(conn, selectors.EVENT_READ, pid)

    def _from_command(self, pid: int, selector) -> None:
        conn = self.children.get(pid)
        if conn is None:
            return
        try:
            data = conn.recv(4096)
        except OSError:
            data = b""
        if not data:  # the command is gone (killed): so is its work
            selector.unregister(conn)
            _kill(pid, signal.SIGTERM)
            return
        for line in data.splitlines():
            try:
                signum = int(json.loads(line)["signal"])
            except (ValueError, KeyError, TypeError):
                continue
            if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
                _kill(pid, signum)

    def _reap(self, selector) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            try:
                selector.unregister(conn)
            except (KeyError, ValueError):
                pass
            try:  # a child killed by signal N exits as a shell reports it: 128 + N
                conn.sendall(json.dumps({"exit": code if code >= 0 else 128 - code}).encode() + b"\n")
            except OSError:
                pass
            conn.close()
            self.last_active = time.monotonic()


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise ValueError(f"from user {uid}, not this server's")
    conn.settimeout(10)
    head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, len(_FDS))
    try:  # whatever goes wrong, the descriptors it passed are closed here, not kept
        request = _parse_request(conn, head, len(fds))
    except (OSError, ValueError, KeyError, TypeError) as e:
        for fd in fds:
            os.close(fd)
        raise ValueError(str(e) or type(e).__name__) from None
    conn.settimeout(None)
    return request, fds


def _parse_request(conn: socket.socket, head: bytes, passed: int) -> dict:
    if len(head) != _HEADER.size:
        raise ValueError("no header")
    size, = _HEADER.unpack(head)
    if size > _MAX_REQUEST:
        raise ValueError(f"{size} bytes")
    data = bytearray()
    while len(data) < size and (chunk := conn.recv(min(1 << 16, size - len(data)))):
        data += chunk
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    if not request.get("stop") and not (isinstance(request.get("argv"), list) and isinstance(request.get("cwd"), str)
                                        and isinstance(request.get("env"), dict)):
        raise ValueError("no argv, cwd and env")
    if len(request.get("fds", [])) != passed:
        raise ValueError("descriptors and request disagree")
    return request


def _run_in_child(request: dict, fds: list[int], conn: socket.socket) -> None:
    """Become the command: its descriptors, directory, environment and arguments; run it; exit."""
    code = 1
    try:
        os.setsid()  # the server's terminal and process group are not the command's
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as Python starts: EPIPE is an exception
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        conn.close()
        sent = dict(zip(request["fds"], fds))
        for target in _FDS:
            if target in sent:
                os.dup2(sent[target], target)
            else:
                os.close(target)
        for fd in fds:
            if fd not in _FDS:
                os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        # Streams anew over the command's descriptors: line-buffered where they are terminals.
        sys.stdin = open(0, "r", encoding="utf-8", closefd=False) if 0 in sent else None
        sys.stdout = open(1, "w", encoding="utf-8", closefd=False) if 1 in sent else None
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False) if 2 in sent else None
        sys.argv = ["flamingo", *request["argv"]]
        _threads_from_environment()
        from .core import main

        main(request["argv"], forwarded=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never return into the server's loop
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream and stream.flush()
            except OSError:
                pass
        os._exit(code)


def _threads_from_environment() -> None:
    """OMP_NUM_THREADS is read once, when torch loads: the command's own value, applied now."""
    import torch

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    else:
        torch.set_num_threads(len(os.sched_getaffinity(0)))


def warm_up() -> None:
    import importlib

    # CUDA checks through NVML, not by initialising the driver, so children may still use the GPU.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # a family this transformers lacks: its stages import it themselves
            pass


def stop_server(path: str) -> None:
    """Ask the server at path to stop: it takes no new commands and exits when those it runs end."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = json.dumps({"stop": True}).encode()
        conn.sendall(_HEADER.pack(len(request)) + request)
        conn.recv(64)
    except OSError as e:
        raise ServerError(f"{path}: no server listening ({e.strerror})") from None
    finally:
        conn.close()
