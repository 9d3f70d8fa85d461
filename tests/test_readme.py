"""The README's commands are ones that exist."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent


def test_hub_commands_are_the_hf_command_huggingface_hub_ships():
    """huggingface-cli is gone from current huggingface_hub; `hf download` and `hf upload` succeed it."""
    assert "huggingface-cli" not in README
    lines = re.findall(r"^hf (\w+) ", README, flags=re.M)
    assert lines and set(lines) == {"download", "upload"}
    for command, option in (("download", "--local-dir"), ("upload", "--repo-type")):
        r = subprocess.run([str(BIN / "hf"), command, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and option in r.stdout, command


def test_the_readmes_python_runs_as_written(tmp_path, monkeypatch):
    """Every ```python block, run in a directory holding what the blocks name: ckpt/ (the
    bundled model), cat.png and dog.png, queries.jsonl and shots.jsonl."""
    import json
    import shutil

    from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT

    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert len(blocks) >= 2
    (tmp_path / "ckpt").symlink_to(BUNDLED_CHECKPOINT)
    images = sorted((ROOT / "examples/toy/images").glob("*.png"))
    shutil.copy(images[0], tmp_path / "cat.png")
    shutil.copy(images[1], tmp_path / "dog.png")
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"id": p.stem, "image": str(p)}) + "\n"
                                                    for p in images[:2]))
    shots = [json.loads(line) for line in (ROOT / "examples/toy/shots.jsonl").read_text().splitlines()]
    (tmp_path / "shots.jsonl").write_text("".join(json.dumps({**s, "image": str(ROOT / "examples/toy" / s["image"])}) + "\n"
                                                  for s in shots))
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        scope = {}
        exec(compile(block, f"README.md python block {i + 1}", "exec"), scope)
    assert [a["output"] for a in scope["answers"]] == ["a blue diamond", "a blue triangle"]
