"""--protocol openflamingo against OpenFlamingo 2.0.1's own evaluation code.

tests/golden/openflamingo_eval/ holds what open_flamingo/eval/evaluate.py drew and prompted on the
benchmarks of tests/fixtures/openflamingo/ (tests/golden/make_openflamingo_eval_golden.py): for each
trial seed, shot count, number of ranks, --num_samples and batch size, the query set, and rank by
rank each query with its demonstrations and exact prompt text. Ours must be the same, id for id and
character for character.
"""
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from flamingo_cli.cli import cli
from flamingo_cli.evaluation import protocols
from flamingo_cli.evaluation.protocols import demonstrations, draw, openflamingo_split
from flamingo_cli.formats.artifacts import ArtifactError
from flamingo_cli.inference.prompting import load_template, ordered_prompt_records

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "openflamingo"
GOLDEN = ROOT / "golden" / "openflamingo_eval"
BENCHES = ("vqav2", "okvqa", "vizwiz", "textvqa", "coco", "flickr30k", "hatefulmemes")
TEMPLATE = {"coco": "openflamingo-captioning", "flickr30k": "openflamingo-captioning",
            "hatefulmemes": "openflamingo-hatefulmemes"}


def of_key(bench: str, split: list[dict]):
    """Our record -> the id OpenFlamingo's dataset gives it."""
    if bench == "vizwiz":  # its converted files number the questions in file order
        index = {r["id"]: i for i, r in enumerate(split)}
        return lambda r: index[r["id"]]
    if bench in ("coco", "flickr30k"):
        return lambda r: r["image_id"]
    if bench == "hatefulmemes":
        return lambda r: int(r["id"].split("-", 1)[1])
    return lambda r: r["question_id"]


def cases():
    for bench in BENCHES:
        for case in json.loads((GOLDEN / f"{bench}.json").read_text())["cases"]:
            yield pytest.param(bench, case, id=f"{bench}-seed{case['seed']}-{case['shots']}shot-w{case['world_size']}"
                               f"-n{case['num_samples']}-b{case['batch_size']}{'-ens' if case['ensembling'] else ''}")


@pytest.mark.parametrize("bench,case", list(cases()))
def test_queries_demonstrations_and_prompts_are_openflamingos(bench, case):
    queries = openflamingo_split(bench, FIXTURES / bench, protocols.OPENFLAMINGO_BENCHMARKS[bench])
    train = openflamingo_split(bench, FIXTURES / bench, "train")
    qkey, skey = of_key(bench, queries), of_key(bench, train)
    chosen = draw(len(queries), len(train), seed=case["seed"],
                  num_samples=case["num_samples"] if case["num_samples"] > 0 else None,
                  query_set_size=case["query_set_size"])
    support = [train[i] for i in chosen.support]
    assert [skey(s) for s in support] == case["query_set"]

    ordered = [queries[i] for i in chosen.queries]
    w, k = case["world_size"], case["shots"]
    orders = demonstrations(len(support), k, seed=case["seed"], world_size=w, batch_size=case["batch_size"],
                            ensembles=6 if case["ensembling"] else 1, n_queries=len(ordered))
    records = list(ordered_prompt_records(load_template(TEMPLATE.get(bench, "openflamingo-vqa")), ordered, support,
                                          orders, k=k))
    by_query: dict[int, list[dict]] = {}
    per_query = len(records) // len(ordered)
    for p in range(len(ordered)):
        by_query[p] = records[p * per_query:(p + 1) * per_query]
        assert {r["id"] for r in by_query[p]} == {ordered[p]["id"]}
    support_key = {s["id"]: skey(s) for s in support}
    golden = case["prompts"]
    for rank in range(w):
        ours = [{"query": qkey(ordered[p]), "demos": [[support_key[i] for i in r["shots"]] for r in by_query[p]],
                 "texts": [r["prompt"] for r in by_query[p]]} for p in range(rank, len(ordered), w)]
        theirs = [{key: g[key] for key in ("query", "demos", "texts")} for g in golden if g["rank"] == rank]
        assert theirs[:len(ours)] == ours
        # What is left is the sampler's padding: the evaluation order's head, run a second time.
        padding = [g["query"] for g in theirs[len(ours):]]
        assert padding == [qkey(ordered[p % len(ordered)]) for p in range(len(ordered), len(ordered) + len(padding))]
    assert sum(len(r["shots"]) == (k or 2) for r in records) == len(records)


def test_the_golden_cases_cover_ranks_padding_subsets_zero_shot_and_ensembling():
    seen = [c for b in BENCHES for c in json.loads((GOLDEN / f"{b}.json").read_text())["cases"]]
    assert {c["world_size"] for c in seen} == {1, 2} and {c["shots"] for c in seen} >= {0, 2, 4}
    assert {c["num_samples"] for c in seen} == {-1, 5} and any(c["ensembling"] for c in seen)
    assert any(len(c["prompts"]) > (13 if c["num_samples"] < 0 else 5) for c in seen)  # padded


def test_the_streams_are_numpys_and_torchs():
    # np.random.seed(0); np.random.choice(7, 7, replace=False), then choice(9, 3, replace=False) from the
    # same stream; torch.randperm(7, generator=torch.Generator().manual_seed(0)) (numpy 2.4, torch 2.14).
    rng = protocols._mt19937(0)
    assert protocols._numpy_choice(rng, 7, 7) == [6, 2, 1, 3, 0, 5, 4]
    assert protocols._numpy_choice(rng, 9, 3) == [3, 1, 7]
    assert protocols._torch_randperm(7, 0) == [4, 0, 5, 3, 2, 6, 1]
    assert protocols._mt19937(5489).getrandbits(32) == 3499211612  # MT19937's reference first output


def test_demonstrations_are_per_rank_streams_of_random_sample():
    got = [o[0] for o, _ in zip(demonstrations(10, 3, seed=4, world_size=2), range(5))]
    r0, r1 = random.Random(4), random.Random(5)
    assert got == [r0.sample(range(10), 3), r1.sample(range(10), 3), r0.sample(range(10), 3),
                   r1.sample(range(10), 3), r0.sample(range(10), 3)]
    zero = [o[0] for o, _ in zip(demonstrations(10, 0, seed=4), range(2))]
    r0 = random.Random(4)
    assert zero == [r0.sample(range(10), 2), r0.sample(range(10), 2)]
    # RICES: what was chosen, untouched; with ensembling, shuffled in place order after order.
    assert list(demonstrations(10, 2, seed=4, chosen=[[3, 1], [0, 2]])) == [[[3, 1]], [[0, 2]]]
    ens = list(demonstrations(10, 2, seed=4, ensembles=6, batch_size=2, n_queries=2, chosen=[[3, 1], [0, 2]]))
    r0, a, b, expect = random.Random(4), [3, 1], [0, 2], [[], []]
    for _ in range(2):  # min(6, 2!) orders
        for got_, x in zip(expect, (a, b)):
            r0.shuffle(x)
            got_.append(list(x))
    assert ens == expect


def test_bad_requests_are_one_clear_error():
    with pytest.raises(ArtifactError, match="does not evaluate imagenet.*KeyError"):
        openflamingo_split("imagenet", FIXTURES, "val")
    with pytest.raises(ArtifactError, match="cannot draw 99 of 13"):
        draw(13, 40, seed=0, num_samples=99)
    with pytest.raises(ArtifactError, match="4 demonstrations needed but the support set has 3"):
        next(demonstrations(3, 4, seed=0))


def test_the_commands_write_openflamingos_queries_support_and_prompts(tmp_path):
    case = json.loads((GOLDEN / "vqav2.json").read_text())["cases"][-1]  # seed 7, 4 shots, 2 ranks, 5 samples
    assert (case["seed"], case["shots"], case["world_size"], case["num_samples"]) == (7, 4, 2, 5)
    runner = CliRunner()
    q, s, p = tmp_path / "q.jsonl", tmp_path / "s.jsonl", tmp_path / "p.jsonl"
    r = runner.invoke(cli, ["data", "vqav2", str(FIXTURES / "vqav2"), "--split", "val", "--protocol", "openflamingo",
                             "--seed", "7", "--sample", "5", "--support", str(s), "--support-size", "16", "-o", str(q)])
    assert r.exit_code == 0, r.output
    support = [json.loads(line) for line in s.read_text().splitlines()]
    assert [x["question_id"] for x in support] == case["query_set"]
    assert all(x["answer"] == x["answers"][0] for x in support)
    r = runner.invoke(cli, ["prompt", "--protocol", "openflamingo", "--shots", str(s), "-k", "4", "--seed", "7",
                             "--world-size", "2", "--template", "openflamingo-vqa", "-o", str(p), str(q)])
    assert r.exit_code == 0, r.output
    prompts = [json.loads(line) for line in p.read_text().splitlines()]
    ids = {x["id"]: x["question_id"] for x in support}
    rank0 = [g for g in case["prompts"] if g["rank"] == 0]
    assert [(x["question_id"], [ids[i] for i in x["shots"]], x["prompt"]) for x in prompts[0::2]] == \
        [(g["query"], g["demos"][0], g["texts"][0]) for g in rank0]

    r = runner.invoke(cli, ["prompt", "--shots", str(s), "--world-size", "2", str(q)])
    assert r.exit_code != 0 and "--world-size is for --protocol openflamingo" in r.output
    r = runner.invoke(cli, ["data", "vqav2", str(FIXTURES / "vqav2"), "--split", "val", "--support", str(s)])
    assert r.exit_code != 0 and "--support is for --protocol openflamingo" in r.output
    r = runner.invoke(cli, ["data", "vqav2", str(FIXTURES / "vqav2"), "--split", "val", "--protocol", "openflamingo",
                             "--support", str(s), "--support-size", "x"])
    assert r.exit_code != 0 and "neither a positive number nor all" in r.output


def test_rices_takes_the_most_similar_most_similar_last_from_the_whole_support(tmp_path):
    import torch

    from flamingo_cli.formats.artifacts import FEATURES, POOLED, make_ref, save_tensors

    def record(name, vector, **fields):
        path = save_tensors(tmp_path / f"{name}.safetensors", {FEATURES: torch.zeros(1, 1, 2),
                                                                POOLED: torch.tensor(vector)}, {"encoder": "e"})
        return {"id": name, "features": make_ref(path, FEATURES), "question": f"q {name}", "answer": f"a {name}",
                **fields}

    support = [record("s0", [1.0, 0.0]), record("s1", [0.0, 1.0]), record("s2", [1.0, 1.0]), record("s3", [-1.0, 0.2])]
    queries = [record("q0", [1.0, 0.1]), record("q1", [0.1, 1.0])]
    s, q, p = tmp_path / "s.jsonl", tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    s.write_text("".join(json.dumps(x) + "\n" for x in support))
    q.write_text("".join(json.dumps(x) + "\n" for x in queries))
    runner = CliRunner()
    for k, expected in ((2, [["s2", "s0"], ["s2", "s1"]]), (0, [["s2", "s0"], ["s2", "s1"]]),
                        (3, [["s1", "s2", "s0"], ["s0", "s2", "s1"]])):
        r = runner.invoke(cli, ["prompt", "--protocol", "openflamingo", "--select", "rices", "--shots", str(s),
                                "-k", str(k), "--template", "openflamingo-vqa", "-o", str(p), str(q)])
        assert r.exit_code == 0, r.output
        prompts = [json.loads(line) for line in p.read_text().splitlines()]
        assert [x["shots"] for x in prompts] == expected
        assert prompts[0]["prompt"].count("<image>") == (k + 1 if k else 1)
    r = runner.invoke(cli, ["prompt", "--protocol", "openflamingo", "--select", "first", "--shots", str(s), str(q)])
    assert r.exit_code != 0 and "at random or by --select rices" in r.output
