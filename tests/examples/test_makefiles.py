"""The example Makefiles run the project's own environment, not whatever python3 is on PATH."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv" / "bin"


@pytest.mark.parametrize("example, target", [("eval", "sample"), ("toy", "all"), ("pretrain", "all")])
def test_example_makefiles_use_the_projects_environment(example, target):
    if not (VENV / "python").exists():
        pytest.skip("no .venv: the checkout was not set up with make")
    r = subprocess.run(["make", "-n", "-C", str(ROOT / "examples" / example), target], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    commands = [line for line in r.stdout.splitlines() if not line.startswith("make")]
    assert any(line.startswith((f"{VENV}/python ", f"{VENV}/flamingo ")) for line in commands)
    bare = [line for line in commands if re.match(r"\s*(python3|flamingo) ", line)]
    assert bare == []
