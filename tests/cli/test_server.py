"""`flamingo server`: commands handed to a warm process behave as the commands run alone."""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "examples" / "toy"
BIN = Path(sys.executable).parent
PIPELINE = f"flamingo encode -q {TOY}/images/ | flamingo generate -q --shots {TOY}/shots.jsonl"


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("FLAMINGO_CKPT", "FLAMINGO_SERVER")}
    return {**env, "PATH": f"{BIN}:{env['PATH']}", "FLAMINGO_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", **extra}


def sh(command, env, **kw):
    return subprocess.run(["bash", "-c", f"set -o pipefail; {command}"], env=env, capture_output=True, text=True, **kw)


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


@pytest.fixture
def server(tmp_path):
    """A detached server on a socket of this test's; stopped (and seen gone) afterwards."""
    socket = str(tmp_path / "fl.sock")
    r = subprocess.run([str(BIN / "flamingo"), "server", "--detach", "--socket", socket, "--log",
                        str(tmp_path / "server.log")], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "", r.stderr
    pid = int(re.search(r"ready on .* \(pid (\d+)\)", r.stderr).group(1))
    yield socket, pid
    subprocess.run([str(BIN / "flamingo"), "server", "--stop", "--socket", socket], env=_env(tmp_path), timeout=60)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server did not stop")
    assert not Path(socket).exists()


def test_a_pipeline_through_the_server_writes_what_it_writes_alone(tmp_path, server):
    socket, pid = server
    assert stat.S_IMODE(os.stat(socket).st_mode) & 0o077 == 0  # this user's only
    alone = sh(PIPELINE, _env(tmp_path))
    served = sh(PIPELINE, _env(tmp_path, FLAMINGO_SERVER=socket))
    assert alone.returncode == served.returncode == 0, served.stderr
    assert served.stdout == alone.stdout and len(alone.stdout.splitlines()) == 8
    assert served.stderr == alone.stderr == ""

    # The command itself imports no torch: the work ran in the server. The same command without
    # a server imports it (the check can fail).
    command = [sys.executable, "-X", "importtime", "-c", "from flamingo_cli.cli import main; main()",
               "encode", "-q", str(TOY / "images" / "blue-diamond.png")]
    for env, imports_torch in ((_env(tmp_path, FLAMINGO_SERVER=socket), False), (_env(tmp_path), True)):
        r = subprocess.run(command, env=env, capture_output=True, text=True)
        assert r.returncode == 0 and json.loads(r.stdout)["id"].endswith("blue-diamond.png")
        assert bool(re.search(r"\|\s*torch$", r.stderr, re.M)) == imports_torch
    assert children(pid) == []


def test_errors_exit_codes_and_a_closed_pipe_are_the_commands_own(tmp_path, server):
    socket, _ = server
    for command in ("flamingo encode -q /no/such.png", "echo '{\"id\": 1, \"image\": 3' | flamingo encode -q",
                    "printf '' | flamingo generate -q", "flamingo generate --no-such-flag",
                    f"{PIPELINE} | head -1"):
        alone, served = sh(command, _env(tmp_path)), sh(command, _env(tmp_path, FLAMINGO_SERVER=socket))
        assert (served.returncode, served.stdout, served.stderr) == (alone.returncode, alone.stdout, alone.stderr)
        assert "Traceback" not in served.stderr
        if "head" not in command and "flag" not in command:  # (a usage error is click's usage and one line)
            assert served.returncode != 0 and len(served.stderr.strip().splitlines()) == 1, served.stderr


def test_ctrl_c_and_sigterm_reach_the_stage_and_a_killed_command_takes_its_stage_along(tmp_path, server):
    socket, pid = server
    env = _env(tmp_path, FLAMINGO_SERVER=socket)
    for signum, code, said in ((signal.SIGINT, 130, "flamingo: interrupted"), (signal.SIGTERM, 143, "flamingo: terminated"),
                               (signal.SIGKILL, -9, None)):
        # encode waits on a stdin that never ends; -o's temp file must not outlive it
        reader, writer = os.pipe()
        command = subprocess.Popen([str(BIN / "flamingo"), "encode", "-q", "-", "-o", str(tmp_path / "out.jsonl")],
                                   env=env, stdin=reader, stderr=subprocess.PIPE, text=True)
        os.close(reader)
        for _ in range(100):
            if children(pid):
                break
            time.sleep(0.05)
        stage = children(pid)
        assert len(stage) == 1
        time.sleep(0.5)
        command.send_signal(signum)
        assert command.wait(timeout=30) == code
        if said:
            assert command.stderr.read().strip() == said
        for _ in range(100):
            if not children(pid):
                break
            time.sleep(0.05)
        assert children(pid) == [], f"the stage outlived its command ({signum})"
        os.close(writer)
        assert list(tmp_path.glob("out.jsonl*")) == []


def test_no_server_there_means_the_command_runs_itself_and_says_so(tmp_path):
    absent = str(tmp_path / "absent.sock")
    r = sh(f"flamingo encode -q {TOY}/images/blue-diamond.png", _env(tmp_path, FLAMINGO_SERVER=absent))
    assert r.returncode == 0 and json.loads(r.stdout)["id"].endswith("blue-diamond.png")
    assert r.stderr == f"flamingo: no server listening at FLAMINGO_SERVER={absent}; running the command here\n"


def test_a_live_socket_is_refused_a_stale_one_replaced_and_idle_servers_leave(tmp_path, server):
    socket, _ = server
    env = _env(tmp_path)
    r = sh(f"flamingo server --socket {socket}", env, timeout=60)
    assert r.returncode == 1 and r.stderr == f"Error: {socket}: a server is already listening there\n"
    r = sh(f"flamingo server --stop --socket {tmp_path / 'none.sock'}", env)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: {tmp_path / 'none.sock'}: no server listening")

    import socket as sockets

    stale = tmp_path / "stale.sock"
    sockets.socket(sockets.AF_UNIX).bind(str(stale))  # a socket file nobody listens on
    started = time.monotonic()
    r = sh(f"flamingo server --socket {stale} --idle-timeout 1", env, timeout=120)
    assert r.returncode == 0 and "ready on" in r.stderr and not stale.exists()
    assert time.monotonic() - started < 60


def test_stop_lets_running_stages_finish_and_new_commands_run_themselves(tmp_path, server):
    socket, pid = server
    env = _env(tmp_path, FLAMINGO_SERVER=socket)
    reader, writer = os.pipe()
    command = subprocess.Popen([str(BIN / "flamingo"), "encode", "-q", "-"], env=env, stdin=reader,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(reader)
    for _ in range(100):
        if children(pid):
            break
        time.sleep(0.05)
    assert sh(f"flamingo server --stop --socket {socket}", _env(tmp_path)).returncode == 0
    for _ in range(100):
        if not Path(socket).exists():
            break
        time.sleep(0.05)
    assert not Path(socket).exists() and Path(f"/proc/{pid}").exists()  # listening no more, still working
    os.write(writer, json.dumps({"id": "x", "image": str(TOY / "images" / "blue-diamond.png")}).encode() + b"\n")
    os.close(writer)
    out, err = command.communicate(timeout=60)
    assert command.returncode == 0 and json.loads(out)["id"] == "x", err
    r = sh(f"flamingo encode -q {TOY}/images/blue-diamond.png", env)
    assert r.returncode == 0 and r.stderr.startswith("flamingo: no server listening")


def test_a_malformed_request_is_one_line_in_the_log_and_the_server_serves_on(tmp_path, server):
    import socket as sockets

    socket, pid = server
    for payload in (b"\x00\x00\x00\x05[1,2]", b"\x00\x00\x00\x02{}", b"\xff\xff\xff\xff", b"\x00\x00\x00\x03abc"):
        conn = sockets.socket(sockets.AF_UNIX)
        conn.connect(socket)
        conn.sendall(payload)
        conn.close()
    time.sleep(1)
    log = (tmp_path / "server.log").read_text().splitlines()
    assert len([line for line in log if "malformed request" in line]) == 4, log
    assert Path(f"/proc/{pid}").exists() and children(pid) == []
    r = sh(f"flamingo encode -q {TOY}/images/blue-diamond.png", _env(tmp_path, FLAMINGO_SERVER=socket))
    assert r.returncode == 0 and r.stderr == "", r.stderr
