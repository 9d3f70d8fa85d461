import pytest

from flamingo_cli.errors import ConfigError
from flamingo_cli.formats.artifacts import ArtifactError
from flamingo_cli.inference.sharding import INDEX, PART, Placement, Shard, launched, merge_shards, placement


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "1/0", "0/2/3", "/"])
def test_a_shard_is_i_of_n_counted_from_zero(text):
    with pytest.raises(ConfigError, match="0 <= I < N"):
        Shard.parse(text)


def test_shard_parse():
    assert Shard.parse("2/5") == Shard(2, 5)


def test_launched_by_torchrun_or_srun_or_neither(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launched() is None
    monkeypatch.setenv("SLURM_NTASKS", "4")  # a batch script's own shell: one process
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert launched() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launched() == (3, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launched() == (1, 2, 1), "torchrun's variables win"


def test_shard_and_torchrun_together_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="one or the other"):
        placement(Shard(0, 2))


def test_a_rank_without_a_rendezvous_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ConfigError, match="MASTER_ADDR not set"):
        placement()


def test_a_shard_keeps_every_nth_unit_and_numbers_records_by_input_position():
    records = [{"id": str(i)} for i in range(7)]
    kept = []
    for i in range(3):
        place = Placement(shard=Shard(i, 3))
        numbered = list(place.records(records))
        assert [r[INDEX] for r in numbered] == list(range(7))
        units = [numbered[j:j + 2] for j in range(0, 7, 2)]  # 4 units of 2
        kept.append([r[INDEX] for r in place.run(units, lambda unit: unit)])
    assert kept == [[0, 1, 6], [2, 3], [4, 5]]


def test_alone_work_is_lazy_and_records_unchanged():
    seen = []

    def units():
        for i in range(3):
            seen.append(i)
            yield i

    place = Placement()
    assert list(place.records([{"id": "a"}])) == [{"id": "a"}]
    results = place.run(units(), lambda unit: [unit * 10])
    assert seen == []
    assert next(results) == 0 and seen == [0]
    assert list(results) == [10, 20]


def shard(indices, part="0/1"):
    return [{"id": f"r{i}", "x": i, INDEX: i, PART: part} for i in indices]


def test_merge_puts_shards_back_in_input_order_without_their_index():
    streams = [("b", shard([2, 3], "1/3")), ("a", shard([0, 1, 6], "0/3")), ("c", shard([4, 5], "2/3"))]
    merged = list(merge_shards(streams))
    assert merged == [{"id": f"r{i}", "x": i} for i in range(7)]


def test_a_shards_records_carry_its_part():
    assert {r[PART] for r in Placement(shard=Shard(1, 2)).records([{"id": "a"}, {"id": "b"}])} == {"1/2"}


def test_merge_takes_an_empty_part_for_the_one_not_seen():
    # 3 parts of 2 units: part 2/3 had none, and its file is empty
    merged = list(merge_shards([("a", shard([0], "0/3")), ("b", shard([1], "1/3")), ("c", [])]))
    assert [r["x"] for r in merged] == [0, 1]


@pytest.mark.parametrize("streams, message", [
    ([("a", [{"id": "r0"}])], "a: record r0 has no 'input_index': not a --shard output"),
    ([("a", [{"id": "r0", INDEX: True}])], "not a --shard output"),
    ([("a", shard([1, 0]))], "a: 'input_index' 0 after 1: not one shard's output, in order"),
    ([("a", shard([0, 2], "0/2")), ("b", shard([2], "1/2"))], "'input_index' 2 is in a too: the same shard twice?"),
    ([("a", [{"id": "r0", INDEX: 0}])], "a: record r0 has no 'input_shard' \\(I/N\\)"),
    ([("a", [{"id": "r0", INDEX: 0, PART: "5/2"}])], "a: record r0 has no 'input_shard'"),
    ([("a", shard([0], "0/3")), ("b", shard([2], "2/3"))],
     "2 files for 3 parts: no records of part 1/3: a part is missing"),
    ([("a", shard([0], "0/4")), ("b", []), ("c", shard([3], "3/4"))],
     "3 files for 4 parts: no records of part 1/4, 2/4 \\(and 1 file without records\\): a part is missing"),
    ([("a", shard([0], "0/2")), ("b", shard([1], "1/3"))], "b: part 1/3, but a is of 2 parts"),
    ([("a", shard([0], "0/2")), ("b", shard([2], "0/2"))], "b: part 0/2 is a too: the same part twice"),
    ([("a", shard([0], "0/1")), ("b", [])], "2 files for 1 parts: more files than parts"),
    ([("a", shard([0], "0/2") + shard([2], "1/2")), ("b", shard([1], "1/2"))], "a: record r2 is from part '1/2', the file's first from 0/2"),
])
def test_merge_refuses_what_is_not_a_set_of_shards(streams, message):
    with pytest.raises(ArtifactError, match=message.replace("?", r"\?")):
        list(merge_shards(streams))


def test_the_group_is_left_at_exit_even_if_the_caller_left_it_first():
    # At exit (atexit) the group must be destroyed while the interpreter is alive; a caller who
    # destroyed it already must not get an error then.
    import socket

    import torch.distributed as dist

    from flamingo_cli.inference.sharding import _leave_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    _leave_group()
    assert not dist.is_initialized()
    _leave_group()
