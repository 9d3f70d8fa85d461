"""Peak memory of the stages against the size of their input: streaming keeps it flat.

Runs `flamingo encode`, `resample`, `prompt` and `score` as a user does (subprocesses, records
from a file) over 1k to 100k records, on the bundled toy model and its demo images, and
prints each run's peak resident memory (the child's ru_maxrss). The baseline is what a stage
that reads its input before starting would hold at least: the same records parsed into a list
(`read_records_file`), measured the same way. Encoding repeats the 8 demo images, so after the
first batch every feature is a cache hit: what grows with the input is the records, not the work.

    .venv/bin/python benchmarks/stream_memory.py [--sizes 1000,10000,100000] [--stages encode,prompt]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples/toy"
BIN = Path(sys.executable).parent


def peak_rss_mb(command: list[str], stdin: Path, cwd: Path, env: dict) -> tuple[float, float]:
    """The command's peak resident memory in MiB, and its wall time."""
    start = time.perf_counter()
    with open(stdin, "rb") as f:
        proc = subprocess.Popen(command, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.read().decode()}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def write_inputs(work: Path, n: int, env: dict) -> dict[str, Path]:
    """n image records, n feature records and n prompt records, repeating the demo images."""
    images = sorted((TOY / "images").glob("*.png"))
    features = work / "features.jsonl"
    if not features.exists():
        with open(features, "w") as f:
            subprocess.run([BIN / "flamingo", "encode", "-q", *map(str, images)], stdout=f, env=env, check=True)
        with open(work / "prompts.jsonl", "w") as f:
            subprocess.run([BIN / "flamingo", "prompt", "--shots", str(TOY / "shots.jsonl"), "--template",
                            str(TOY / "templates/shape.yaml"), str(features)], stdout=f, env=env, check=True)
    out = {}
    for name, source in (("image", None), ("features", features), ("prompt", work / "prompts.jsonl")):
        base = ([{"image": str(p)} for p in images] if source is None
                else [json.loads(line) for line in source.read_text().splitlines()])
        path = out[name] = work / f"{name}-{n}.jsonl"
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({**base[i % len(base)], "id": f"r{i}"}) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--stages", default="encode,resample,prompt,score")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = {
        "encode": ("image", ["encode", "-q", "--batch-size", "64", "-"]),
        "resample": ("features", ["resample", "-q"]),
        "prompt": ("features", ["prompt", "--shots", str(TOY / "shots.jsonl"), "--template",
                                str(TOY / "templates/shape.yaml")]),
        "score": ("prompt", ["score", "-q"]),
    }
    chosen = args.stages.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "FLAMINGO_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        reader = [sys.executable, "-c", "import sys; from flamingo_cli.formats.records import read_records_file; "
                  "records = read_records_file(sys.argv[1])"]
        print(f"{'stage':<10}{'records':>9}{'peak MiB':>10}{'s':>8}{'input as a list MiB':>21}", flush=True)
        peaks: dict[tuple[str, int], float] = {}
        for n in sizes:
            inputs = write_inputs(work, n, env)
            for stage in chosen:
                kind, command = stages[stage]
                rss, seconds = peak_rss_mb([BIN / "flamingo", *command], inputs[kind], ROOT, env)
                held, _ = peak_rss_mb([*reader, str(inputs[kind])], inputs[kind], ROOT, env)
                peaks[stage, n] = rss
                print(f"{stage:<10}{n:>9}{rss:>10.0f}{seconds:>8.1f}{held:>21.0f}", flush=True)
        print(f"peak at {sizes[-1]} records / peak at {sizes[0]}: "
              + ", ".join(f"{s} {peaks[s, sizes[-1]] / peaks[s, sizes[0]]:.2f}x" for s in chosen))

if __name__ == "__main__":
    main()
