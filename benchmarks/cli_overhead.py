"""What running a stage as a command costs over calling the same library functions in a process
that has the model loaded already: start-up (imports, loading) and the record plumbing.

On the bundled toy model and its demo images (N query records, 4 shots each, the shots' features
encoded beforehand), for `score` (the shape template's six candidates) and `generate` (3 beams):
  cli         wall time of `flamingo STAGE prompts.jsonl -o out.jsonl`, a subprocess as a user runs it
  in-process  the same work through score_records / generate_records in this process, model loaded
  fixed       wall time of the same command on one record: what a stage costs before its first record
  server      the same command with FLAMINGO_SERVER naming a `flamingo server` started beforehand (the
              stage forked from a process that has imported already), and its fixed cost
The outputs of both are checked identical. Also prints where a stage's start-up goes (imports,
checkpoint loading) in a fresh interpreter, and the same command with OpenMP's threads sleeping
while they wait (OMP_WAIT_POLICY=PASSIVE, what a stage reading or writing a pipe sets).

    .venv/bin/python benchmarks/cli_overhead.py [--records 1000] [--stages score,generate]
"""
import argparse
import itertools
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
COMMANDS = {"score": ["score"], "generate": ["generate"]}

STARTUP = """
import time; t0 = time.perf_counter()
import torch, transformers
from flamingo_cli.inference.media import load_for_inference
t1 = time.perf_counter()
load_for_inference({ckpt!r})
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def flamingo(*args, env, **kw):
    # Files in and out, no pipe: a stage run alone (beside a pipe, its OpenMP threads sleep instead of spinning).
    return subprocess.run([str(BIN / "flamingo"), *map(str, args)], env=env, check=True, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, **kw)


def write_prompts(work: Path, n: int, env: dict) -> Path:
    images = sorted((TOY / "images").glob("*.png"))
    flamingo("encode", "-q", *images, "-o", work / "features.jsonl", env=env)
    flamingo("encode", "-q", TOY / "shots.jsonl", "-o", work / "shots.jsonl", env=env)
    features = [json.loads(line) for line in (work / "features.jsonl").read_text().splitlines()]
    with open(work / "queries.jsonl", "w") as f:
        for i, record in zip(range(n), itertools.cycle(features)):
            f.write(json.dumps({**record, "id": f"q{i}"}) + "\n")
    prompts = work / "prompts.jsonl"
    flamingo("prompt", "-q", "--shots", work / "shots.jsonl", "-k", 4, "--template", TOY / "templates/shape.yaml",
             work / "queries.jsonl", "-o", prompts, env=env)
    return prompts


def in_process(stage: str, model, media, prompts: Path) -> tuple[float, list[dict]]:
    from flamingo_cli.inference.generation import batches, generate_records
    from flamingo_cli.inference.prefix_cache import PrefixCache
    from flamingo_cli.inference.scoring import score_records
    from flamingo_cli.formats.records import read_records_file

    records = read_records_file(prompts)
    cache = PrefixCache(model, max_bytes=2048 << 20)
    start = time.perf_counter()
    if stage == "score":
        out = list(score_records(model, records, media, batch_size=32, prefix_cache=cache))
    else:
        out = [r for batch in batches(records, 8) for r in generate_records(model, batch, media, prefix_cache=cache)]
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--stages", default="score,generate")
    args = parser.parse_args()
    from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT
    from flamingo_cli.inference.media import load_for_inference

    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "FLAMINGO_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
               "OMP_NUM_THREADS": threads}
        os.environ.update(env)
        import torch

        torch.set_num_threads(int(threads))
        prompts = write_prompts(work, args.records, env)
        (work / "one.jsonl").write_text(prompts.read_text().splitlines(keepends=True)[0])
        startup = subprocess.run([sys.executable, "-c", STARTUP.format(ckpt=str(BUNDLED_CHECKPOINT))], env=env,
                                 check=True, capture_output=True, text=True).stdout.split()
        print(f"start-up in a fresh interpreter: imports {float(startup[0]):.2f} s, loading the checkpoint "
              f"{float(startup[1]):.2f} s ({threads} threads)")
        model, media = load_for_inference(BUNDLED_CHECKPOINT)
        socket = str(work / "server.sock")
        subprocess.run([str(BIN / "flamingo"), "server", "--detach", "--socket", socket], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        served_env = {**env, "FLAMINGO_SERVER": socket}
        print(f"{'stage':>9} {'records':>8} {'cli s':>8} {'in-process s':>13} {'overhead':>9} {'fixed s':>8} "
              f"{'server s':>9} {'overhead':>9} {'fixed s':>8}")
        for stage in args.stages.split(","):
            inside, expected = in_process(stage, model, media, prompts)
            start = time.perf_counter()
            flamingo(*COMMANDS[stage], "-q", prompts, "-o", work / "out.jsonl", env=env)
            cli = time.perf_counter() - start
            got = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
            keys = ("scores", "prediction") if stage == "score" else ("output",)
            if [[r[k] for k in keys] for r in got] != [[r[k] for k in keys] for r in expected]:
                raise SystemExit(f"{stage}: the command's output differs from the in-process run")
            start = time.perf_counter()
            flamingo(*COMMANDS[stage], "-q", work / "one.jsonl", "-o", work / "out1.jsonl", env=env)
            fixed = time.perf_counter() - start
            start = time.perf_counter()
            flamingo(*COMMANDS[stage], "-q", prompts, "-o", work / "served.jsonl", env=served_env)
            served = time.perf_counter() - start
            if (work / "served.jsonl").read_bytes() != (work / "out.jsonl").read_bytes():
                raise SystemExit(f"{stage}: the command's output through the server differs")
            start = time.perf_counter()
            flamingo(*COMMANDS[stage], "-q", work / "one.jsonl", "-o", work / "out1.jsonl", env=served_env)
            served_fixed = time.perf_counter() - start
            print(f"{stage:>9} {args.records:>8} {cli:>8.2f} {inside:>13.2f} {(cli - inside) / inside:>8.0%} "
                  f"{fixed:>8.2f} {served:>9.2f} {(served - inside) / inside:>8.0%} {served_fixed:>8.2f}", flush=True)
            start = time.perf_counter()  # as a stage in a pipe runs: OpenMP threads sleep while they wait
            flamingo(*COMMANDS[stage], "-q", prompts, "-o", work / "out.jsonl",
                     env={**env, "OMP_WAIT_POLICY": "PASSIVE"})
            passive = time.perf_counter() - start
            print(f"{'':>9} with OMP_WAIT_POLICY=PASSIVE (a stage in a pipe): {passive:.2f} s; spinning alone is "
                  f"{passive / cli:.2f}x faster", flush=True)
        subprocess.run([str(BIN / "flamingo"), "server", "--stop", "--socket", socket], env=env, check=True)


if __name__ == "__main__":
    main()
