"""The flamingo command as a user runs it: real subprocesses and click's runner."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from flamingo_cli import __version__
from flamingo_cli.cli import cli

ROOT = Path(__file__).resolve().parents[2]
FLAMINGO = [sys.executable, "-c", "from flamingo_cli.cli import main; main()"]


def run(*args, **kw):
    return subprocess.run([*FLAMINGO, *args], capture_output=True, text=True, **kw)


def test_help_and_version_go_to_stdout_and_exit_0():
    for args in (["--help"], ["-h"], ["init", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and r.stdout.startswith("Usage: flamingo") and r.stderr == ""
    r = run("--version")
    assert r.returncode == 0 and r.stdout == f"flamingo, version {__version__}\n"


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, flamingo_cli.cli; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_openmp_threads_sleep_only_when_a_pipe_is_stdin_or_stdout(tmp_path):
    # What main() decides before torch loads: spin alone (faster), sleep beside a pipe's other stages.
    code = "from flamingo_cli.cli.core import _in_pipe; import sys; sys.stderr.write(str(_in_pipe()))"
    run = lambda **kw: subprocess.run([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,  # noqa: E731
                                      **kw).stderr
    with open(tmp_path / "out", "w") as out:
        assert run(stdin=subprocess.DEVNULL, stdout=out) == "False"
        assert run(stdin=subprocess.PIPE, stdout=out) == "True"
    assert run(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) == "True"


def test_bad_option_exits_2_with_usage_on_stderr():
    r = run("init", "--every", "zero", "-o", "x")
    assert r.returncode == 2 and r.stdout == "" and "Usage:" in r.stderr and "Error:" in r.stderr


def test_init_writes_a_loadable_untrained_checkpoint(tmp_path, lm_dir):
    from flamingo_cli.formats.checkpoint import load_checkpoint

    out = tmp_path / "ckpt"
    r = run("init", "-c", str(ROOT / "stages/init/tiny.yaml"), "--lm", str(lm_dir("gpt2")), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert "untrained" in r.stderr
    model = load_checkpoint(out)
    assert list(model.xattn) == ["0", "2"]
    assert all(float(b.attn_gate.detach()) == 0 and float(b.ff_gate.detach()) == 0 for b in model.xattn.values())
    assert model.config.resampler.dim == model.encoder.dim


def test_flag_beats_environment_beats_yaml(tmp_path, lm_dir):
    from flamingo_cli.formats.checkpoint import read_config

    base = ["init", "-c", str(ROOT / "stages/init/tiny.yaml"), "--lm", str(lm_dir("gpt2"))]
    runner = CliRunner()
    r = runner.invoke(cli, [*base, "-o", str(tmp_path / "yaml")])
    assert r.exit_code == 0, r.output
    assert read_config(tmp_path / "yaml").xattn.every == 2
    r = runner.invoke(cli, [*base, "-o", str(tmp_path / "env")], env={"FLAMINGO_INIT_EVERY": "1"})
    assert read_config(tmp_path / "env").xattn.every == 1
    r = runner.invoke(cli, [*base, "--every", "4", "-o", str(tmp_path / "flag")], env={"FLAMINGO_INIT_EVERY": "1"})
    assert read_config(tmp_path / "flag").xattn.every == 4


@pytest.mark.parametrize("args, message", [
    (["--lm", "/nonexistent/lm"], "/nonexistent/lm"),
    (["-c", "/nonexistent/preset.yaml"], "/nonexistent/preset.yaml"),
    (["--encoder", "no_such_timm_model"], "no_such_timm_model"),
    (["--lm", "/nonexistent/lm"], "LM /nonexistent/lm: no such directory"),
    (["--lm", "missing_dir"], "LM missing_dir: no such directory"),
])
def test_runtime_errors_are_one_line_without_traceback(tmp_path, lm_dir, args, message):
    full = ["init", "--lm", str(lm_dir("gpt2")), "-c", str(ROOT / "stages/init/tiny.yaml"), *args,
            "-o", str(tmp_path / "ckpt")]
    r = run(*full)
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and message in lines[-1]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ckpt").exists()


def test_man_pages_match_the_help_texts(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "man/generate.py"), str(tmp_path)], check=True)
    generated = sorted(p.name for p in tmp_path.glob("*.1"))
    assert generated == sorted(p.name for p in (ROOT / "man").glob("*.1")), "run `make man`"
    for name in generated:
        assert (tmp_path / name).read_text() == (ROOT / "man" / name).read_text(), f"{name} is stale: run `make man`"


def test_an_lm_that_transformers_refuses_is_one_line(tmp_path, lm_dir):
    """transformers 5 validates config fields strictly: 4.0 for an int is huggingface_hub's
    StrictDataclassFieldValidationError, which must not escape as a traceback."""
    import json
    import shutil

    lm = tmp_path / "lm"
    shutil.copytree(lm_dir("llama"), lm)
    config = json.loads((lm / "config.json").read_text())
    (lm / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4.0}))
    r = run("init", "-c", str(ROOT / "stages/init/tiny.yaml"), "--lm", str(lm), "-o", str(tmp_path / "ckpt"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"Error: LM {lm}: cannot load its tokenizer (Validation error for field "
                                     "'num_hidden_layers': TypeError: Field 'num_hidden_layers' expected int, got "
                                     "float (value: 4.0))"]


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield [*path, name]
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def _usage(args, width):
    r = CliRunner().invoke(cli, [*args, "--help"], terminal_width=width, max_content_width=width)
    assert r.exit_code == 0, r.output
    return r.output.split("\n\n")[0]


def test_usage_lines_wrap_between_words():
    """At 80 columns a usage line may wrap, but never inside a word (flamingo data's list of
    benchmarks once broke 'hatefulmemes' in two)."""
    for args in _commands(cli):
        assert _usage(args, 80).split() == _usage(args, 1000).split(), args


def test_man_pages_are_installed_where_man_finds_them():
    """man looks in PREFIX/share/man for a PREFIX/bin on PATH: the venv's included."""
    installed = Path(sys.prefix) / "share" / "man"
    for page in [*(ROOT / "man").glob("*.1"), *(ROOT / "man").glob("*.5")]:
        target = installed / f"man{page.suffix[1:]}" / page.name
        assert target.is_file() and target.read_bytes() == page.read_bytes(), target


def test_shell_completion_works_as_the_readme_says():
    assert 'eval "$(_FLAMINGO_COMPLETE=bash_source flamingo)"' in (ROOT / "README.md").read_text()
    script = subprocess.run([str(Path(sys.executable).parent / "flamingo")], env={**os.environ,
                            "_FLAMINGO_COMPLETE": "bash_source"}, capture_output=True, text=True)
    assert script.returncode == 0 and "complete " in script.stdout and "_flamingo_completion" in script.stdout
    words = subprocess.run([str(Path(sys.executable).parent / "flamingo")], capture_output=True, text=True,
                           env={**os.environ, "_FLAMINGO_COMPLETE": "bash_complete", "COMP_WORDS": "flamingo gen",
                                "COMP_CWORD": "1"})
    assert words.returncode == 0 and "plain,generate" in words.stdout.splitlines()


def test_an_encoder_never_gets_random_weights_by_accident(tmp_path, lm_dir):
    from flamingo_cli.formats.checkpoint import read_config

    lm, tiny = str(lm_dir("gpt2")), str(ROOT / "stages/init/tiny.yaml")
    runner = CliRunner()
    r = runner.invoke(cli, ["init", "--lm", lm, "--encoder", "test_vit", "-o", str(tmp_path / "bare")])
    assert r.exit_code == 2 and not (tmp_path / "bare").exists()
    assert ("encoder test_vit has no weights: give --encoder-weights FILE, a pretrained tag (test_vit.TAG, "
            "downloaded when online), or --random-encoder") in " ".join(r.output.split())
    r = runner.invoke(cli, ["init", "--lm", lm, "--encoder", "test_vit", "--random-encoder", "-o", str(tmp_path / "rnd")])
    assert r.exit_code == 0, r.output
    assert read_config(tmp_path / "rnd").encoder.random_init is True
    # A pretrained tag means its weights: offline, an error that says how to supply them.
    r = runner.invoke(cli, ["init", "-c", tiny, "--lm", lm, "--encoder", "vit_tiny_patch16_224.augreg_in21k",
                            "-o", str(tmp_path / "t")])
    assert r.exit_code == 1 and not (tmp_path / "t").exists()
    assert "offline, give a local file with --encoder-weights" in r.output
    # Naming the preset's own encoder keeps the preset's settings for it.
    r = runner.invoke(cli, ["init", "-c", tiny, "--lm", lm, "--encoder", "test_vit", "-o", str(tmp_path / "same")])
    assert r.exit_code == 0, r.output
    encoder = read_config(tmp_path / "same").encoder
    assert encoder.kwargs == {"img_size": 64} and encoder.random_init is True
