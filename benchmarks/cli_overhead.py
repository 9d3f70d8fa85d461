"""What running a stage as a command costs over calling the same library functions in a process
that has the model loaded already: start-up (imports, loading) and the record plumbing.

On the bundled toy model and its demo images (N query records, 4 shots each, the shots' features
encoded beforehand), for `score` (the shape template's six candidates) and `generate` (3 beams):
  in-process  the same work through score_records / generate_records, timed inside a fresh
              process after it has imported and loaded the model
  cli         wall time of `flamingo STAGE prompts.jsonl -o out.jsonl`, a subprocess as a user runs it
  fixed       wall time of the same command on one record: what a stage costs before its first record
  server      the same command with FLAMINGO_SERVER naming a `flamingo server` started beforehand (the
              stage forked from a process that has imported already), and its fixed cost
Each is run --repeats times, interleaved (one of each, then again), and the median is reported:
the same work in two fresh processes varies by up to a sixth on a 2-core machine, more than the
overhead being measured. The outputs are checked identical. Also prints where a stage's start-up
goes (imports, checkpoint loading) in a fresh interpreter, and the same command with OpenMP's
threads sleeping while they wait (OMP_WAIT_POLICY=PASSIVE, what a stage reading or writing a pipe
sets), and two such commands at once on the first --pair records, under each wait policy: spinning
(the default), PASSIVE, and a short spin (GOMP_SPINCOUNT=10000).

    .venv/bin/python benchmarks/cli_overhead.py [--records 1000] [--stages score,generate] [--repeats 3] [--pair 300]
"""

import argparse
import itertools
import json
import os
import statistics
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


IN_PROCESS = """
import json, sys, time
from flamingo_cli.formats.records import read_records_file
from flamingo_cli.inference.generation import batches, generate_records
from flamingo_cli.inference.media import load_for_inference
from flamingo_cli.inference.prefix_cache import PrefixCache
from flamingo_cli.inference.scoring import score_records

stage, ckpt, prompts, output = sys.argv[1:]
model, media = load_for_inference(ckpt)
records = read_records_file(prompts)
cache = PrefixCache(model, max_bytes=2048 << 20)
start = time.perf_counter()
if stage == "score":
    out = list(score_records(model, records, media, batch_size=32, prefix_cache=cache))
else:
    out = [r for batch in batches(records, 8) for r in generate_records(model, batch, media, prefix_cache=cache)]
seconds = time.perf_counter() - start
with open(output, "w") as f:
    f.writelines(json.dumps(r) + "\\n" for r in out)
print(seconds)
"""


def in_process(stage: str, prompts: Path, output: Path, env: dict) -> float:
    """Seconds the stage's work takes in a fresh process with the model loaded (timed inside it)."""
    from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT

    return float(subprocess.run([sys.executable, "-c", IN_PROCESS, stage, str(BUNDLED_CHECKPOINT), str(prompts),
                                 str(output)], env=env, check=True, capture_output=True, text=True).stdout)


def wall(*args, env) -> float:
    start = time.perf_counter()
    flamingo(*args, env=env)
    return time.perf_counter() - start


def side_by_side(stage: str, prompts: Path, work: Path, env: dict) -> float:
    """Wall time of two runs of the same command started together (stages sharing the cores)."""
    start = time.perf_counter()
    runs = [subprocess.Popen([str(BIN / "flamingo"), *COMMANDS[stage], "-q", str(prompts), "-o",
                              str(work / f"pair{i}.jsonl")], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL) for i in range(2)]
    if any(run.wait() for run in runs):
        raise SystemExit(f"{stage}: a side-by-side run failed")
    return time.perf_counter() - start


def same_outputs(stage: str, got: Path, want: Path) -> bool:
    keys = ("scores", "prediction") if stage == "score" else ("output",)
    rows = [[[json.loads(line)[k] for k in keys] for line in path.read_text().splitlines()] for path in (got, want)]
    return rows[0] == rows[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--stages", default="score,generate")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; the median is reported")
    parser.add_argument("--pair", type=int, default=300, help="records for the two-at-once runs (0: none)")
    args = parser.parse_args()
    from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT

    threads = os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "FLAMINGO_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
               "OMP_NUM_THREADS": threads}
        prompts = write_prompts(work, args.records, env)
        one, pair = work / "one.jsonl", work / "pair.jsonl"
        one.write_text(prompts.read_text().splitlines(keepends=True)[0])
        pair.write_text("".join(prompts.read_text().splitlines(keepends=True)[:args.pair]))
        startup = subprocess.run([sys.executable, "-c", STARTUP.format(ckpt=str(BUNDLED_CHECKPOINT))], env=env,
                                 check=True, capture_output=True, text=True).stdout.split()
        print(f"start-up in a fresh interpreter: imports {float(startup[0]):.2f} s, loading the checkpoint "
              f"{float(startup[1]):.2f} s ({threads} threads; medians of {args.repeats} interleaved runs)")
        socket = str(work / "server.sock")
        subprocess.run([str(BIN / "flamingo"), "server", "--detach", "--socket", socket], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        served_env = {**env, "FLAMINGO_SERVER": socket}
        print(f"{'stage':>9} {'records':>8} {'in-process s':>13} {'cli s':>8} {'overhead':>9} {'fixed s':>8} "
              f"{'server s':>9} {'overhead':>9} {'fixed s':>8}")
        for stage in args.stages.split(","):
            runs = {name: [] for name in ("inside", "cli", "fixed", "served", "served_fixed")}
            for _ in range(args.repeats):
                runs["inside"].append(in_process(stage, prompts, work / "inside.jsonl", env))
                runs["cli"].append(wall(*COMMANDS[stage], "-q", prompts, "-o", work / "out.jsonl", env=env))
                runs["served"].append(wall(*COMMANDS[stage], "-q", prompts, "-o", work / "served.jsonl",
                                           env=served_env))
                runs["fixed"].append(wall(*COMMANDS[stage], "-q", one, "-o", work / "out1.jsonl", env=env))
                runs["served_fixed"].append(wall(*COMMANDS[stage], "-q", one, "-o", work / "out1.jsonl",
                                                 env=served_env))
                if not same_outputs(stage, work / "out.jsonl", work / "inside.jsonl"):
                    raise SystemExit(f"{stage}: the command's output differs from the in-process run")
                if (work / "served.jsonl").read_bytes() != (work / "out.jsonl").read_bytes():
                    raise SystemExit(f"{stage}: the command's output through the server differs")
            m = {name: statistics.median(times) for name, times in runs.items()}
            print(f"{stage:>9} {args.records:>8} {m['inside']:>13.2f} {m['cli']:>8.2f} "
                  f"{(m['cli'] - m['inside']) / m['inside']:>8.0%} {m['fixed']:>8.2f} {m['served']:>9.2f} "
                  f"{(m['served'] - m['inside']) / m['inside']:>8.0%} {m['served_fixed']:>8.2f}", flush=True)
            print(f"{'':>9} every run (s): " + "; ".join(f"{name} " + ", ".join(f"{t:.2f}" for t in times)
                                                        for name, times in runs.items()), flush=True)
            passive = wall(*COMMANDS[stage], "-q", prompts, "-o", work / "out.jsonl",
                           env={**env, "OMP_WAIT_POLICY": "PASSIVE"})
            print(f"{'':>9} with OMP_WAIT_POLICY=PASSIVE (a stage in a pipe): {passive:.2f} s; spinning alone is "
                  f"{passive / m['cli']:.2f}x faster", flush=True)
            if args.pair:
                policies = {"spinning": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
                            "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}}
                print(f"{'':>9} two at once, {args.pair} records each: " + ", ".join(
                    f"{name} {side_by_side(stage, pair, work, {**env, **extra}):.2f} s"
                    for name, extra in policies.items()), flush=True)
        subprocess.run([str(BIN / "flamingo"), "server", "--stop", "--socket", socket], env=env, check=True)


if __name__ == "__main__":
    main()
