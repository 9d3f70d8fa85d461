"""The README's commands are ones that exist."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent


def test_hub_downloads_use_the_hf_command_huggingface_hub_ships():
    """huggingface-cli is gone from current huggingface_hub; `hf download` is its successor."""
    assert "huggingface-cli" not in README
    lines = re.findall(r"^hf (\w+) ", README, flags=re.M)
    assert lines and set(lines) == {"download"}
    r = subprocess.run([str(BIN / "hf"), "download", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--local-dir" in r.stdout
