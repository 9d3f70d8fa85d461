"""A stage run as several processes: its records dealt out a unit at a time, its outputs put
back in input order.

A unit is what a stage computes as one (a generate batch, a score group, an encode window), so
every record is computed exactly as it would be in one process, and the merged output is the
same bytes for any number of processes (a prompt's states do not depend on which prompts ran
before it: prefix_cache.py).

Two ways to run:
- torchrun or srun: the processes are the ranks of one torch.distributed group. Rank 0 reads the
  input, deals unit j to rank j % N, and writes every rank's output in input order, a round of N
  units at a time. Records are all the ranks exchange, so the group is gloo's whatever the device;
  each rank runs the model on its own device (cuda:LOCAL_RANK).
- --shard I/N: independent processes (a SLURM job array, make -j), each reading the whole input
  and keeping units j % N == I. Each output record carries its input position (INDEX) and its
  part (PART, "I/N"), by which merge_shards puts the parts' outputs back together and knows when
  one is missing.
"""
from __future__ import annotations

import atexit
import heapq
import itertools
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import ConfigError, FlamingoError
from ..formats.artifacts import ArtifactError

INDEX = "input_index"  # a --shard output record's position in the stage's input
PART = "input_shard"  # and the part ("I/N") that wrote it
# Rank 0 may wait on its input (a slow pipe) for long; a rank that dies ends the job anyway
# (torchrun and srun stop the others).
TIMEOUT = timedelta(hours=24)


class RankStopped(FlamingoError):
    """A rank other than 0 stopped because the run failed; rank 0 says why."""


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """'I/N', 0 <= I < N."""
        index, sep, count = text.partition("/")
        try:
            shard = cls(int(index), int(count))
        except ValueError:
            shard = None
        if not sep or shard is None or not 0 <= shard.index < shard.count:
            raise ConfigError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4")
        return shard


def launched() -> tuple[int, int, int] | None:
    """(rank, number of processes, local rank) when torchrun or srun started this process as one
    of several, else None. srun is known by its step's task count, not SLURM_NTASKS, which a batch
    script has too while it runs as one process."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return None


@dataclass
class Placement:
    """Where this process stands in a stage's run: alone, one rank of several, or one shard."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    shard: Shard | None = None

    @property
    def leader(self) -> bool:
        """Whether this process reads the input and writes the output (rank 0, or any shard)."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """A rank's own GPU when the stage asks for one without naming it."""
        return f"{device}:{self.local_rank}" if self.size > 1 and device in ("cuda", "xpu") else device

    def records(self, records: Iterable[dict]) -> Iterable[dict]:
        """The stage's input records; a shard's numbered by their position (INDEX) and its part (PART)."""
        if self.shard is None:
            return records
        part = f"{self.shard.index}/{self.shard.count}"
        return ({**record, INDEX: i, PART: part} for i, record in enumerate(records))

    def run(self, units: Iterable | None, work: Callable[[Any], Iterable]) -> Iterator:
        """The pieces work(unit) yields (a batch's records, say), for each of this process's units;
        on the leader, every unit's pieces in input order (a shard: its own units'). Alone, pieces
        come as work yields them; a rank sends a unit's pieces when the unit is done. Other ranks
        do the units dealt to them and yield nothing; `units` is read on the leader only."""
        if self.size > 1:
            return _deal(units, work, self.rank, self.size)
        if self.shard is not None:
            units = itertools.islice(units, self.shard.index, None, self.shard.count)
        return (piece for unit in units for piece in work(unit))


def placement(shard: Shard | None = None) -> Placement:
    """This process's Placement, joining the torch.distributed group when launched as one of
    several (MASTER_ADDR and MASTER_PORT: torchrun sets them, an srun script exports them)."""
    ranks = launched()
    if ranks is None:
        return Placement(shard=shard)
    if shard is not None:
        raise ConfigError("--shard splits a run into independent processes; under torchrun or srun the ranks "
                          "share the input already: use one or the other")
    import torch.distributed as dist

    rank, size, local_rank = ranks
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"running as rank {rank} of {size}, but {' and '.join(missing)} not set (torchrun sets "
                          "them; under srun, export the first node's address and a free port)")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=TIMEOUT)
        # Left to the interpreter's teardown, gloo's threads can outlive it: the process then
        # aborts ("terminate called without an active exception") after its work is done.
        atexit.register(_leave_group)
    return Placement(rank, size, local_rank)


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # a Python caller may have left it already
        dist.destroy_process_group()


def _deal(units: Iterable | None, work: Callable[[Any], Iterable], rank: int, size: int) -> Iterator:
    """Rounds of one scatter (a unit, or nothing, for each rank) and one gather (the results).
    Every rank takes part in both in every round, whatever happened to its unit: a failed unit
    is a result too (the pieces it yielded, and why it failed), so rank 0 writes what came before
    the failure, as one process would, and then tells the others to stop."""
    import torch.distributed as dist

    source = iter(units) if rank == 0 else None
    stopped = False
    failure = None

    def stop(message: str | None) -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            with _peer_lost(rank):
                dist.scatter_object_list([None], [("stop", message)] * size, src=0)

    try:
        while True:
            if rank == 0:
                dealt = []
                try:
                    if failure is None:
                        dealt.extend(itertools.islice(source, size))
                except Exception as e:  # unreadable input: what came before it is still done and written
                    failure = e
                if not dealt:
                    stop(None if failure is None else _reason(failure, rank))
                    if failure is not None:
                        raise failure
                    return
                orders = [("unit", unit) for unit in dealt] + [("idle", None)] * (size - len(dealt))
            order = [None]
            with _peer_lost(rank):
                dist.scatter_object_list(order, orders if rank == 0 else None, src=0)
            kind, payload = order[0]
            if kind == "stop":
                stopped = True
                if payload is not None:
                    raise RankStopped(payload)
                return
            pieces, reason = [], None
            if kind == "unit":
                try:
                    pieces.extend(work(payload))
                except Exception as e:
                    if rank == 0:
                        failure = e
                    elif not isinstance(e, FlamingoError):
                        traceback.print_exc(file=sys.stderr)
                    reason = _reason(e, rank)
            results = [None] * size if rank == 0 else None
            with _peer_lost(rank):
                dist.gather_object((pieces, reason), results, dst=0)
            if rank == 0:
                for i, (done, reason) in enumerate(results):
                    yield from done
                    if reason is not None:
                        stop(reason)
                        raise failure if i == 0 else FlamingoError(reason)
    except GeneratorExit:  # the reader has what it wanted (`| head -1`) or could not write: the others end quietly
        if rank == 0:
            stop(None)
        raise


def _reason(error: Exception, rank: int) -> str:
    """An error as the line rank 0 prints: a FlamingoError names its input already."""
    if isinstance(error, FlamingoError):
        return str(error)
    return f"rank {rank} failed: {type(error).__name__}: {error}"


@contextmanager
def _peer_lost(rank: int):
    """A rank whose peers are gone (rank 0 failed before dealing) stops as one line, not a traceback."""
    try:
        yield
    except RuntimeError as e:
        raise RankStopped(f"rank {rank}: lost contact with the other ranks ({str(e).splitlines()[0]})") from None


def merge_shards(streams: list[tuple[str, Iterable[dict]]]) -> Iterator[dict]:
    """The records of --shard outputs (name, records) in input order, without INDEX and PART:
    streamed, each part's records already in order. Before any record is yielded, the parts are
    checked to be all N of one run (a part with no records counts for one not seen); a record
    without INDEX or PART, a part twice or missing, or a position out of order or seen twice is an
    error naming the file."""
    streams = [(name, _peek(records)) for name, records in streams]
    _check_parts([(name, first) for name, (first, _) in streams])

    def numbered(name, first, records):
        last = -1
        for record in records:
            index = record.get(INDEX)
            if isinstance(index, bool) or not isinstance(index, int):
                raise ArtifactError(f"{name}: record {record.get('id', '?')} has no '{INDEX}': not a --shard output")
            if record.get(PART) != first[PART]:
                raise ArtifactError(f"{name}: record {record.get('id', '?')} is from part {record.get(PART)!r}, the "
                                    f"file's first from {first[PART]}: not one part's output")
            if index <= last:
                raise ArtifactError(f"{name}: '{INDEX}' {index} after {last}: not one shard's output, in order")
            last = index
            yield index, name, record

    last, last_name = -1, None
    merged = heapq.merge(*(numbered(n, first, r) for n, (first, r) in streams), key=lambda t: t[0])
    for index, name, record in merged:
        if index == last:
            raise ArtifactError(f"{name}: '{INDEX}' {index} is in {last_name} too: the same shard twice?")
        last, last_name = index, name
        yield {k: v for k, v in record.items() if k not in (INDEX, PART)}


def _peek(records: Iterable[dict]) -> tuple[dict | None, Iterator[dict]]:
    records = iter(records)
    first = next(records, None)
    return first, records if first is None else itertools.chain([first], records)


def _check_parts(firsts: list[tuple[str, dict | None]]) -> None:
    """The files are the N parts of one run: every part I/N once, a file with no records standing
    for one the others do not show (a part can have no units)."""
    seen: dict[int, str] = {}
    count = None
    for name, first in firsts:
        if first is None:
            continue
        if INDEX not in first:
            raise ArtifactError(f"{name}: record {first.get('id', '?')} has no '{INDEX}': not a --shard output")
        try:
            part = Shard.parse(str(first[PART]))
        except (KeyError, ConfigError):
            raise ArtifactError(f"{name}: record {first.get('id', '?')} has no '{PART}' (I/N): not a --shard "
                                "output of this version") from None
        if count is not None and part.count != count:
            raise ArtifactError(f"{name}: part {part.index}/{part.count}, but {seen[min(seen)]} is of {count} parts")
        count = part.count
        if part.index in seen:
            raise ArtifactError(f"{name}: part {part.index}/{count} is {seen[part.index]} too: the same part twice?")
        seen[part.index] = name
    if count is None:
        return
    missing = [i for i in range(count) if i not in seen]
    empty = sum(first is None for _, first in firsts)
    got = f"{len(firsts)} file{'s' * (len(firsts) != 1)} for {count} parts"
    if len(firsts) > count:
        raise ArtifactError(f"{got}: more files than parts")
    if len(missing) > empty:
        lacking = ", ".join(f"{i}/{count}" for i in missing)
        where = f" (and {empty} file{'s' * (empty != 1)} without records)" if empty else ""
        raise ArtifactError(f"{got}: no records of part {lacking}{where}: a part is missing (a part that failed "
                            "leaves no file: rerun it)")
