"""examples/eval end to end: native-format benchmarks -> the sweep -> results.json, table, plot; resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "examples" / "eval"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(EVAL))

from toy_benchmarks import make_hatefulmemes, make_msrvttqa, make_vqav2  # noqa: E402


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "FLAMINGO_CKPT"}
    return {**env, "PATH": f"{BIN}:{env['PATH']}", **extra}


def sweep(out: Path, bench: str, data: Path, cache: Path, **sizes):
    args = [f"BENCH={bench}", f"DATA={data}", f"OUT={out}", "SUPPORT=8", "QUERIES=4",
            *(f"{k}={v}" for k, v in sizes.items())]
    return subprocess.run(["make", "-C", str(EVAL), *args], env=_env(FLAMINGO_CACHE=str(cache)),
                          capture_output=True, text=True, timeout=600)


def test_the_sweep_writes_results_table_and_plot_and_resumes(tmp_path):
    make_vqav2(tmp_path / "vqav2")
    make_hatefulmemes(tmp_path / "hm")
    out, cache = tmp_path / "out", tmp_path / "cache"

    r = sweep(out, "vqav2", tmp_path / "vqav2", cache, SHOTS="2", SEEDS="0 1")
    assert r.returncode == 0, r.stdout + r.stderr
    r = sweep(out, "hatefulmemes", tmp_path / "hm", cache, SHOTS="2", SEEDS="0", ENSEMBLES="6")
    assert r.returncode == 0, r.stdout + r.stderr
    make_msrvttqa(tmp_path / "msrvttqa", n=4)  # a video benchmark: clips through encode, prompt, generate
    r = sweep(out, "msrvttqa", tmp_path / "msrvttqa", cache, SHOTS="0", SEEDS="0", SUPPORT="4")
    assert r.returncode == 0, r.stdout + r.stderr

    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"vqav2", "hatefulmemes", "msrvttqa"}
    assert results["msrvttqa"]["metric"] == "exact" and 0 <= results["msrvttqa"]["shots"]["0"]["mean"] <= 100
    assert results["vqav2"]["metric"] == "vqa" and results["hatefulmemes"]["metric"] == "roc_auc"
    cell = results["vqav2"]["shots"]["2"]
    assert cell["n_seeds"] == 2 and set(cell["seeds"]) == {"seed0", "seed1"}
    assert 0 <= cell["mean"] <= 100 and cell["std"] >= 0
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| benchmark | metric | 0-shot | 2-shot |"
    assert table[2].startswith("| HatefulMemes | ROC-AUC |  | ") and table[4].startswith("| VQAv2 | VQA acc. |  | ")
    assert table[3].startswith("| MSRVTT-QA | top-1 | ") and not table[3].startswith("| MSRVTT-QA | top-1 |  |")
    video = [json.loads(p) for p in (out / "msrvttqa" / "prompts" / "0shot-seed0.jsonl").read_text().splitlines()]
    assert len(video) == 4 and all(p["prompt"].count("<image>") == 1 and p["media"][0].endswith("#features")
                                   for p in video)
    assert (out / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Auditable: every prompt names its demonstrations, every prediction is kept with its score.
    prompts = [json.loads(line) for line in (out / "vqav2" / "prompts" / "2shot-seed1.jsonl").read_text().splitlines()]
    assert len(prompts) == 4 and all(len(p["shots"]) == 2 and p["id"] not in p["shots"] for p in prompts)
    scores = (out / "vqav2" / "predictions" / "2shot-seed1.scores.jsonl").read_text().splitlines()
    assert len(scores) == 4 and all("prediction" in json.loads(line) for line in scores)
    # Close-ended: 2 shots give 2 orders per query, averaged into one prediction each.
    hm = [json.loads(line) for line in (out / "hatefulmemes" / "prompts" / "2shot-seed0.jsonl").read_text().splitlines()]
    assert len(hm) == 8 and sorted({p["ensemble"] for p in hm}) == [0, 1]
    cell = json.loads((out / "hatefulmemes" / "cells" / "2shot-seed0.json").read_text())
    assert cell["n"] == 4 and cell["shots"] == 2 and cell["metric"] == "roc_auc"

    # Resume: finished cells are not recomputed; a missing one is.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "vqav2" / "cells").glob("*.json")}
    (out / "vqav2" / "cells" / "2shot-seed1.json").unlink()
    r = sweep(out, "vqav2", tmp_path / "vqav2", cache, SHOTS="2", SEEDS="0 1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("flamingo evaluate") == 1
    for path, stamp in stamps.items():
        if path.name != "2shot-seed1.json":
            assert path.stat().st_mtime_ns == stamp
    assert json.loads((out / "vqav2" / "cells" / "2shot-seed1.json").read_text())["seed"] == 1


def test_the_openflamingo_protocol_sweeps_per_seed_with_its_draws_and_presets(tmp_path):
    from flamingo_cli.evaluation.protocols import demonstrations, draw, openflamingo_split

    make_vqav2(tmp_path / "vqav2")
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = sweep(out, "vqav2", tmp_path / "vqav2", cache, PROTOCOL="openflamingo", SUPPORT="6", QUERIES="all",
              SHOTS="2", SEEDS="42 3", OF_WORLD_SIZE="2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-c openflamingo-vqa " in r.stdout and "-c openflamingo-vqav2 " in r.stdout
    for seed in (42, 3):
        queries = openflamingo_split("vqav2", tmp_path / "vqav2", "val")
        train = openflamingo_split("vqav2", tmp_path / "vqav2", "train")
        chosen = draw(len(queries), len(train), seed=seed, query_set_size=6)
        support = [train[i]["id"] for i in chosen.support]
        orders = demonstrations(6, 2, seed=seed, world_size=2)
        expected = [(queries[i]["id"], [support[j] for j in o[0]]) for i, o in zip(chosen.queries, orders)]
        prompts = [json.loads(line) for line in (out / "vqav2" / "prompts" / f"2shot-seed{seed}.jsonl").read_text()
                   .splitlines()]
        assert [(p["id"], p["shots"]) for p in prompts] == expected and len(expected) == 10
        assert prompts[0]["prompt"].startswith("<image>Question:What colour is the shape? Short answer:")
        cell = json.loads((out / "vqav2" / "cells" / f"2shot-seed{seed}.json").read_text())
        assert cell["protocol"] == "openflamingo" and cell["vqa_evaluator"] == "openflamingo" and cell["n"] == 10
        assert cell["cut_at"] == ["Question", "Answer", "Short", ", "]
    r = sweep(out, "msrvttqa", tmp_path / "vqav2", cache, PROTOCOL="openflamingo")
    assert r.returncode != 0 and "OpenFlamingo 2.0.1 evaluates vqav2" in r.stdout + r.stderr
