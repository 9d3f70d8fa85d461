"""Evaluation protocols: which queries are asked, from which support set, with which demonstrations.

Two protocols, chosen with `--protocol` in `flamingo data` and `flamingo prompt`:

  flamingo      the paper's (the default): `benchmarks.sample` keeps a seeded subset of a split in
                file order; each query's shots depend only on (seed, query id) (inference.prompting).
  openflamingo  OpenFlamingo 2.0.1's open_flamingo/eval/evaluate.py, draw for draw (this module):
                its datasets' orders and fields, its evaluation subset and order, its query set (the
                support), its demonstrations per query, its zero-shot trick.

OpenFlamingo draws everything from three generators, and this module reproduces each one's
stream in pure Python (no numpy, no torch; tests/golden/openflamingo_eval/ holds what
OpenFlamingo's own code drew):

  numpy's global RandomState, seeded with the trial seed (evaluate_vqa and its siblings:
      `np.random.seed(seed)`): first `prepare_eval_samples` takes
      `np.random.choice(len(test), num_samples, replace=False)` (-1: the whole split, which is
      still a permutation of it), then `get_query_set` takes
      `np.random.choice(len(train), query_set_size, replace=False)` from the same stream, so the
      query set depends on the size of the evaluation split and on --num_samples. With --rices it
      takes no query set: RICES searches the whole train split.
  torch's CPU generator in DistributedSampler (shuffle=True, seed 0, epoch 0): the evaluation
      subset is permuted once more by `torch.randperm(n)`, and rank r of W processes positions
      r, r + W, r + 2W, ... of that order (the sampler pads the order to a multiple of W by
      repeating its head; OpenFlamingo scores those few queries twice, we once).
  Python's `random`, seeded with seed + rank (`utils.random_seed`): each query's demonstrations
      are `random.sample(query_set, k)`, one call per query in the rank's order, so they depend on
      the number of GPUs OpenFlamingo ran on but not on its batch size; zero-shot draws 2 and
      renders them text only (`compute_effective_num_shots`). With
      --classification_prompt_ensembling, each batch of the rank is then shuffled in place
      min(6, k!) times, query after query, so there the batch size matters too.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..formats.artifacts import ArtifactError
from .benchmarks import read_benchmark
from .benchmarks.files import load_json, top_list

PROTOCOLS = ("flamingo", "openflamingo")
# OpenFlamingo's evaluate.py defaults: --query_set_size, --trial_seeds, --batch_size.
QUERY_SET_SIZE = 2048
SEED = 42
BATCH_SIZE = 8
# compute_effective_num_shots: zero-shot prompts carry two text-only demonstrations.
ZERO_SHOT_DEMOS = 2
# evaluate_classification: at most this many orders with --classification_prompt_ensembling.
ENSEMBLE_ORDERS = 6
# Its native names for the benchmarks it evaluates, and the split of each that it evaluates on
# (open_flamingo/scripts/run_eval.sh: the VQA val sets, Karpathy test, Hateful Memes dev).
OPENFLAMINGO_BENCHMARKS = {"vqav2": "val", "okvqa": "val", "vizwiz": "val", "textvqa": "val",
                           "coco": "test", "flickr30k": "test", "hatefulmemes": "dev_seen"}
_VQA = ("vqav2", "okvqa", "vizwiz", "textvqa")


# -- the generators' streams ---------------------------------------------------------------

def _mt19937(seed: int) -> random.Random:
    """A Mersenne Twister seeded as numpy's legacy `np.random.seed(int)` and torch's
    `Generator.manual_seed` seed theirs (init_genrand), unlike Python's `random.seed`, which
    seeds by array: its getrandbits(32) are then their raw 32-bit outputs."""
    s = seed & 0xFFFFFFFF
    state = [s]
    for i in range(1, 624):
        s = (1812433253 * (s ^ (s >> 30)) + i) & 0xFFFFFFFF
        state.append(s)
    rng = random.Random()
    rng.setstate((3, (*state, 624), None))
    return rng


def _numpy_interval(rng: random.Random, high: int) -> int:
    """numpy's random_interval: a uniform int in [0, high] by masked rejection."""
    if high == 0:
        return 0
    mask = high
    for shift in (1, 2, 4, 8, 16):
        mask |= mask >> shift
    while True:
        value = rng.getrandbits(32) & mask
        if value <= high:
            return value


def _numpy_choice(rng: random.Random, n: int, size: int) -> list[int]:
    """Legacy `RandomState.choice(n, size, replace=False)`: the head of `permutation(n)`, which
    Fisher-Yates-shuffles arange(n) from its end."""
    if size > n:
        raise ArtifactError(f"cannot draw {size} of {n} examples without replacement (numpy would refuse too)")
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _numpy_interval(rng, i)
        order[i], order[j] = order[j], order[i]
    return order[:size]


def _torch_randperm(n: int, seed: int) -> list[int]:
    """`torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on the CPU (torch 2.0)."""
    rng = _mt19937(seed)
    order = list(range(n))
    for i in range(n - 1):
        z = rng.getrandbits(32) % (n - i)
        order[i], order[i + z] = order[i + z], order[i]
    return order


# -- datasets, subsets, query sets -------------------------------------------------------

def openflamingo_split(bench: str, root: str | Path, split: str) -> list[dict]:
    """The records of `split` as OpenFlamingo's dataset classes hold them (eval_datasets.py):
    in their order, with the answer a demonstration shows. VQA: the file's order, and `answer`
    is the first human answer (`x["answers"][0]`); COCO: Karpathy's "train" without "restval"
    (CaptionDataset keeps split == "train"); captions and Hateful Memes as our readers give them."""
    if bench not in OPENFLAMINGO_BENCHMARKS:
        why = (" (OpenFlamingo 2.0.1's evaluate_classification reads batch['ocr'], which its ImageNet dataset "
               "lacks, so its ImageNet evaluation stops with a KeyError)" if bench == "imagenet" else "")
        raise ArtifactError(f"--protocol openflamingo: OpenFlamingo 2.0.1 does not evaluate {bench}{why}; it "
                            f"evaluates {', '.join(OPENFLAMINGO_BENCHMARKS)}")
    records = read_benchmark(bench, root, split)
    if bench in _VQA:
        return [{**r, "answer": r["answers"][0]} for r in records]
    if bench == "coco" and split == "train":
        path = Path(root) / "dataset_coco.json"
        restval = {item.get("cocoid") for item in top_list(load_json(path), "images", path)
                   if isinstance(item, dict) and item.get("split") == "restval"}
        return [r for r in records if r["image_id"] not in restval]
    return records


@dataclass(frozen=True)
class Draw:
    """Indices into the evaluation split (`queries`, in OpenFlamingo's evaluation order: rank r of
    W takes positions r, r + W, ...) and into the train split (`support`, the query set, in the
    order random.sample indexes it)."""

    queries: list[int]
    support: list[int]


def draw(n_eval: int, n_train: int, *, seed: int, num_samples: int | None = None,
         query_set_size: int | None = QUERY_SET_SIZE) -> Draw:
    """OpenFlamingo's evaluation subset and query set for one trial seed. `num_samples` None is
    its -1, the whole split; `query_set_size` None is --rices: the whole train split, in order,
    drawn from no generator."""
    n = n_eval if num_samples is None else num_samples
    rng = _mt19937(seed)
    subset = _numpy_choice(rng, n_eval, n)
    queries = [subset[i] for i in _torch_randperm(n, 0)]
    support = list(range(n_train)) if query_set_size is None else _numpy_choice(rng, n_train, query_set_size)
    return Draw(queries, support)


# -- demonstrations ----------------------------------------------------------------------

def effective_shots(k: int) -> int:
    return k if k > 0 else ZERO_SHOT_DEMOS


def orders_per_query(k: int, ensembles: int) -> int:
    """How many orders of its demonstrations a query is scored with: 1, or with prompt
    ensembling min(ensembles, k'!) for k' effective shots (OpenFlamingo: ensembles = 6)."""
    return min(ensembles, math.factorial(effective_shots(k))) if ensembles > 1 else 1


def demonstrations(n_support: int, k: int, *, seed: int, world_size: int = 1, batch_size: int = BATCH_SIZE,
                   ensembles: int = 1, n_queries: int | None = None,
                   chosen: Iterable[list[int]] | None = None) -> Iterator[list[list[int]]]:
    """For each query in evaluation order (position p is run by rank p % world_size), the orders
    of its demonstrations: indices into the support (query set), one list per order.

    Without `chosen`, each query draws `random.sample` of effective_shots(k) from the support
    with its rank's generator, seeded seed + rank. With `chosen` (RICES: each query's
    demonstrations, most similar last), nothing is drawn. With ensembles > 1 (OpenFlamingo's
    --classification_prompt_ensembling), each of orders_per_query orders is the previous one
    shuffled in place, batch by batch of `batch_size` queries per rank, which needs `n_queries`
    (the last batches hold the sampler's padding, which draws too). Random draws without
    ensembling never end: zip them with the queries."""
    if world_size < 1 or batch_size < 1 or ensembles < 1:
        raise ValueError("world_size, batch_size and ensembles must be >= 1")
    kk = effective_shots(k)
    if kk > n_support:
        raise ArtifactError(f"{kk} demonstrations needed but the support set has {n_support}")
    rngs = [random.Random(seed + rank) for rank in range(world_size)]

    def sample(rank: int) -> list[int]:
        return rngs[rank].sample(range(n_support), kk)

    permutations = orders_per_query(k, ensembles)
    if permutations == 1:
        if chosen is not None:
            yield from ([list(c)] for c in chosen)
            return
        p = 0
        while True:
            yield [sample(p % world_size)]
            p += 1
    if n_queries is None:
        raise ValueError("prompt ensembling needs n_queries")
    fixed = None if chosen is None else [list(c) for c in chosen]
    yield from _ensembled(n_queries, sample, fixed, rngs, world_size, batch_size, permutations)


def _ensembled(n: int, sample: Callable[[int], list[int]], fixed: list[list[int]] | None, rngs: list[random.Random],
               world_size: int, batch_size: int, permutations: int) -> Iterator[list[list[int]]]:
    """evaluate_classification's loop, rank by rank and batch by batch: a batch's demonstrations
    are drawn, then shuffled in place once per order, query after query. The sampler pads the
    order to a multiple of world_size with its head (position p >= n is query p % n), and those
    queries draw and shuffle too."""
    total = -(-n // world_size) * world_size
    orders: list[list[list[int]]] = [[] for _ in range(n)]
    for rank in range(world_size):
        positions = range(rank, total, world_size)
        for start in range(0, len(positions), batch_size):
            batch = positions[start:start + batch_size]
            demos = [sample(rank) if fixed is None else list(fixed[p % n]) for p in batch]
            kept: list[list[list[int]]] = [[] for _ in batch]
            for _ in range(permutations):
                for i, d in enumerate(demos):
                    rngs[rank].shuffle(d)
                    kept[i].append(list(d))
            for p, got in zip(batch, kept):
                if p < n:
                    orders[p] = got
    yield from orders
