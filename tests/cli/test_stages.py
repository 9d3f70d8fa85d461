"""The stages as a user runs them: real processes, real pipes, on a tiny random checkpoint."""
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from flamingo_cli.formats.artifacts import save_tensors

BIN = Path(sys.executable).parent
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, lm_dir):
    """A working directory with images, a support set and a self-contained tiny checkpoint."""
    from flamingo_cli.formats.checkpoint import new_model, save_checkpoint
    from flamingo_cli.model.config import FlamingoConfig

    root = tmp_path_factory.mktemp("world")
    config = FlamingoConfig.from_yaml((Path(__file__).resolve().parents[2] / "stages/init/tiny.yaml").read_text())
    config.lm.path = str(lm_dir("llama"))
    model = new_model(config, seed=0)
    with torch.no_grad():
        for block in model.xattn.values():  # non-zero gates, so images change the answers
            block.attn_gate.fill_(0.5)
    save_checkpoint(model, root / "ckpt", embed_lm=True, embed_encoder=True)
    for sub in ("imgs", "data", "support"):
        (root / sub).mkdir()
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (48 + 8 * i, 40), colour).save(root / "imgs" / f"{i}-{colour}.png")
        Image.new("RGB", (40, 48 + 8 * i), colour).save(root / "data" / f"{colour}.jpg")
        Image.new("RGB", (56, 56), colour).save(root / "support" / f"{colour}.png")
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    support = [{"id": f"s-{c}", "image": f"support/{c}.png", "caption": f"a {c} square",
                "question": "What colour is it?", "answer": c} for c in COLOURS]
    (root / "support.jsonl").write_text("".join(json.dumps(r) + "\n" for r in support))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "FLAMINGO_CKPT": str(root / "ckpt"),
           "FLAMINGO_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1",
           # Stages in a pipe run side by side on few cores: one thread each avoids OpenMP spinning.
           "OMP_NUM_THREADS": "1"}
    env.pop("TQDM_DISABLE", None)
    sh("flamingo encode - < support.jsonl > shots.jsonl", root, env, check=True)
    return root, env


def sh(command, cwd, env, check=False, **kw):
    r = subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=cwd, env=env, capture_output=True,
                       text=True, **kw)
    if check:
        assert r.returncode == 0, f"{command}\n{r.stderr}"
    return r


def records(text):
    assert text.endswith("\n") and "\n\n" not in text
    return [json.loads(line) for line in text.splitlines()]


def test_the_five_pipelines_run_as_written(world):
    root, env = world
    r = sh("flamingo encode imgs/ | flamingo generate --shots shots.jsonl", root, env, check=True)
    out = records(r.stdout)
    assert [o["id"] for o in out] == [f"imgs/{i}-{c}.png" for i, c in enumerate(COLOURS)]
    assert all(isinstance(o["output"], str) and o["prompt"].count("<image>") == 5 for o in out)
    assert r.stderr == ""

    sh("flamingo encode --out feats/ data/*.jpg > feats.jsonl", root, env, check=True)
    feats = records((root / "feats.jsonl").read_text())
    assert all(o["features"].startswith("feats/") or "/feats/" in o["features"] for o in feats)
    # The VQA template needs a question: a jq-style filter between stages adds it.
    vqa = [{**o, "question": "What colour is it?"} for o in feats]
    (root / "feats.jsonl").write_text("".join(json.dumps(o) + "\n" for o in vqa))

    sh("flamingo prompt --shots shots.jsonl -k 4 --template vqa < feats.jsonl > prompts.jsonl", root, env, check=True)
    prompts = records((root / "prompts.jsonl").read_text())
    assert all(len(p["shots"]) == 4 and len(p["media"]) == 5 and p["template"] == "vqa" for p in prompts)
    assert prompts[0]["prompt"].endswith("<image>Question: What colour is it? Answer:")

    sh("flamingo generate --ckpt ckpt/ < prompts.jsonl > answers.jsonl", root, env, check=True)
    answers = records((root / "answers.jsonl").read_text())
    assert [a["id"] for a in answers] == [p["id"] for p in prompts]
    assert all(set(p) < set(a) and a["question"] == "What colour is it?" for p, a in zip(prompts, answers))

    sh("flamingo score --ckpt ckpt/ --candidates classes.txt < prompts.jsonl > ranked.jsonl", root, env, check=True)
    ranked = records((root / "ranked.jsonl").read_text())
    for r in ranked:
        assert list(r["scores"]) == ["red", "green", "blue"]
        assert r["prediction"] == max(r["scores"], key=r["scores"].get)
        assert all(v < 0 for v in r["scores"].values())


def test_stages_write_their_first_records_while_the_input_is_still_arriving(world):
    """Records fed through a pipe that stays open: each stage answers the first batch before
    the rest exists (encode reads 8 batches ahead, to keep its decoding workers busy)."""
    root, env = world
    encoded = records((root / "shots.jsonl").read_text())
    prompts = records(sh("flamingo prompt --shots shots.jsonl --template vqa -k 2 < shots.jsonl", root, env,
                         check=True).stdout)
    images = [{"id": f"i{i}", "image": f"imgs/{i % 6}-{COLOURS[i % 6]}.png"} for i in range(10)]
    for command, inputs, ahead in [
        ("flamingo encode -q --batch-size 1 -", images, 8),
        ("flamingo resample -q", encoded, 1),
        ("flamingo prompt --shots shots.jsonl -k 2", encoded, 1),
        ("flamingo generate -q --num-beams 1 --max-new-tokens 2 --batch-size 1", prompts, 1),
        ("flamingo score -q --candidates classes.txt --batch-size 3", prompts, 1),  # 3 candidates: 1 record
    ]:
        stage = subprocess.Popen(["bash", "-c", command], cwd=root, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        lines = [json.dumps(r).encode() + b"\n" for r in inputs]
        stage.stdin.write(b"".join(lines[:ahead]))
        stage.stdin.flush()
        ready, _, _ = select.select([stage.stdout], [], [], 120)
        assert ready, f"{command}: nothing written while its input was still open"
        first = json.loads(stage.stdout.readline())
        stage.stdin.write(b"".join(lines[ahead:]))
        stage.stdin.close()
        rest = stage.stdout.read().decode().splitlines()
        assert stage.wait() == 0, stage.stderr.read().decode()
        assert first["id"] == inputs[0]["id"] and len(rest) + 1 == len(inputs), command


def test_head_1_gets_one_record_and_a_quiet_exit_0(world):
    root, env = world
    r = sh("flamingo encode --batch-size 2 imgs/ | head -1", root, env)
    assert r.returncode == 0 and r.stderr == ""
    assert len(records(r.stdout)) == 1
    r = sh("flamingo encode --batch-size 1 imgs/ imgs/ imgs/ | flamingo resample | head -1", root, env)
    assert r.returncode == 0 and r.stderr == "" and "visual" in records(r.stdout)[0]


def test_encoding_is_cached_by_content_and_leaves_the_working_directory_clean(world, tmp_path):
    root, env = world
    shutil.copy(root / "imgs" / "0-red.png", tmp_path / "copy-of-red.png")
    first = records(sh(f"flamingo encode imgs/0-red.png {tmp_path}/copy-of-red.png", root, env, check=True).stdout)
    assert first[0]["features"] == first[1]["features"], "same bytes, same encoder -> same file"
    cache = sorted((root / "cache").rglob("*.safetensors"))
    before = {p: p.stat().st_mtime_ns for p in cache}
    again = records(sh("flamingo encode imgs/0-red.png", root, env, check=True).stdout)
    assert again[0]["features"] == first[0]["features"]
    assert {p: p.stat().st_mtime_ns for p in sorted((root / "cache").rglob("*.safetensors"))} == before
    assert not list(tmp_path.glob("*.safetensors")) and not list(root.glob("*.safetensors"))


def test_resampled_support_is_reused_and_equals_resampling_on_the_fly(world):
    root, env = world
    chain = "flamingo encode - < support.jsonl | flamingo resample > support.visual.jsonl"  # as the README says
    assert chain in (Path(__file__).resolve().parents[2] / "README.md").read_text()
    sh(chain, root, env, check=True)
    resampled = records((root / "support.visual.jsonl").read_text())
    assert [r["id"] for r in resampled] == [f"s-{c}" for c in COLOURS]
    assert all(r["visual"].endswith("#visual") and r["caption"] for r in resampled)
    a = sh("flamingo encode imgs/ | flamingo generate --shots shots.jsonl --select first -k 2", root, env, check=True)
    b = sh("flamingo encode imgs/ | flamingo generate --shots support.visual.jsonl --select first -k 2", root, env,
           check=True)
    outputs = lambda text: [r["output"] for r in records(text)]  # noqa: E731
    assert outputs(a.stdout) == outputs(b.stdout)
    assert all(m.endswith("#visual") for m in records(b.stdout)[0]["media"][:2])


def test_same_seed_gives_byte_identical_stdout(world):
    root, env = world
    sh("flamingo encode imgs/ > queries.jsonl", root, env, check=True)
    cmd = "flamingo {} --shots shots.jsonl -k 3 --select random --seed {} < queries.jsonl"
    a, b = (sh(cmd.format("generate", 7), root, env, check=True).stdout for _ in range(2))
    assert a == b
    c = sh(cmd.format("prompt", 8), root, env, check=True).stdout
    assert [r["shots"] for r in records(a)] != [r["shots"] for r in records(c)]


def test_rices_puts_the_most_similar_shot_last(world):
    root, env = world
    r = sh("flamingo encode data/red.jpg | flamingo prompt --shots shots.jsonl -k 3 --select rices", root, env,
           check=True)
    assert records(r.stdout)[0]["shots"][-1] == "s-red"


def test_score_uses_record_candidates_and_template_candidates(world):
    root, env = world
    meme = {"id": "m1", "image": "imgs/0-red.png", "text": "hello", "candidates": ["yes", "no", "maybe"]}
    (root / "memes.jsonl").write_text(json.dumps(meme) + "\n")
    shots = [{"id": f"h{i}", "image": f"support/{c}.png", "text": "hi", "label": "no"} for i, c in enumerate(COLOURS)]
    (root / "hm-shots.jsonl").write_text("".join(json.dumps(s) + "\n" for s in shots))
    r = sh("flamingo prompt --shots hm-shots.jsonl -k 2 --template hatefulmemes < memes.jsonl"
           " | flamingo score", root, env, check=True)
    assert list(records(r.stdout)[0]["scores"]) == ["yes", "no", "maybe"]
    r = sh("flamingo prompt --shots hm-shots.jsonl -k 2 --template hatefulmemes < memes.jsonl"
           " | python -c \"import sys, json; [print(json.dumps({k: v for k, v in json.loads(l).items()"
           " if k != 'candidates'})) for l in sys.stdin]\" | flamingo score", root, env, check=True)
    assert list(records(r.stdout)[0]["scores"]) == ["yes", "no"]


def test_output_file_is_atomic(world):
    root, env = world
    (root / "half").mkdir(exist_ok=True)
    shutil.copy(root / "imgs" / "0-red.png", root / "half" / "a.png")
    (root / "half" / "b.png").write_bytes(b"not an image")
    r = sh("flamingo encode --batch-size 1 -o half.jsonl half/", root, env)
    assert r.returncode == 1 and "half/b.png: not an image" in r.stderr
    assert not (root / "half.jsonl").exists() and not list(root.glob(".half.jsonl*"))
    # On stdout, the records of finished batches stay whole and valid.
    r = sh("flamingo encode --batch-size 1 half/", root, env)
    assert r.returncode == 1 and [o["id"] for o in records(r.stdout)] == ["half/a.png"]
    r = sh("flamingo encode --batch-size 1 --skip-bad -o half.jsonl half/", root, env, check=True)
    assert [o["id"] for o in records((root / "half.jsonl").read_text())] == ["half/a.png"]
    assert "skipped 1 unreadable file(s)" in r.stderr
    # A bad line after good ones, reached mid-stream: the same two outcomes.
    good = (root / "shots.jsonl").read_text().splitlines()[0]
    (root / "late.jsonl").write_text(good + '\n{"id": \n')
    r = sh("flamingo resample -o late.out.jsonl late.jsonl", root, env)
    assert r.returncode == 1 and "late.jsonl: line 2: malformed JSON" in r.stderr
    assert not (root / "late.out.jsonl").exists() and not list(root.glob(".late.out.jsonl*"))
    r = sh("flamingo resample late.jsonl", root, env)
    assert r.returncode == 1 and [o["id"] for o in records(r.stdout)] == [json.loads(good)["id"]]


def _bad_inputs(root):
    """(name, shell command, text the one-line error must contain)."""
    good = records((root / "shots.jsonl").read_text())[0]["features"]
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    trunc = root / "trunc.safetensors"
    trunc.write_bytes(Path(good.split("#")[0]).read_bytes()[:100])
    encoder = json.loads((root / "shots.jsonl").read_text().splitlines()[0])["encoder"]
    save_tensors(root / "narrow.safetensors", {"features": torch.zeros(1, 4, 7)}, {"encoder": encoder})
    save_tensors(root / "foreign.safetensors", {"features": torch.zeros(1, 4, 64)}, {"encoder": "resnet50@0123"})
    (root / "no-config").mkdir(exist_ok=True)
    (root / "latin1.jsonl").write_bytes(b'\n{"id": "caf\xe9"}\n{"id": "a"}\n')  # the bad line is the first record
    (root / "bomb.png").write_bytes(_png_header(30000, 30000))
    (root / "notes.png").write_text("not an image")
    (root / "half.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(200))

    def prompt(media, text="<image>Output:"):
        return json.dumps({"id": "q1", "prompt": text, "media": media}).replace('"', '\\"')

    return [
        ("missing image", "flamingo encode imgs/nope.png", "imgs/nope.png: No such file or directory"),
        ("corrupt image", "flamingo encode corrupt.png", "corrupt.png: cannot decode image (Truncated File Read)"),
        ("truncated safetensors", f'echo "{prompt([f"{trunc}#features"])}" | flamingo generate',
         "trunc.safetensors: not a readable safetensors file"),
        ("wrong feature dim", f'echo "{prompt([f"{root}/narrow.safetensors#features"])}" | flamingo generate',
         "narrow.safetensors#features: features must be (frames, tokens, 64), got (1, 4, 7)"),
        ("encoder mismatch", f'echo "{prompt([f"{root}/foreign.safetensors#features"])}" | flamingo generate',
         "foreign.safetensors#features: made by encoder resnet50@0123, but this checkpoint's encoder is"),
        ("malformed JSON line", "printf '\\n{\"id\": 2\\n' | flamingo resample", "<stdin>: line 2: malformed JSON"),
        ("image count != media count",
         f'echo "{prompt([good], "<image>a<|endofchunk|><image>b")}" | flamingo generate',
         "q1: prompt has 2 <image> marker(s) but media lists 1"),
        ("unknown template", "flamingo prompt --template nope --shots shots.jsonl < shots.jsonl", "nope"),
        ("checkpoint without config", "flamingo generate --ckpt no-config < shots.jsonl",
         "no-config: not a checkpoint directory (no config.yaml)"),
        ("empty stdin", "flamingo resample < /dev/null", "<stdin>: no records"),
        ("non-UTF-8 stdin", "cat latin1.jsonl | flamingo prompt --shots shots.jsonl", "<stdin>: line 2: not UTF-8 text"),
        ("non-UTF-8 file", "flamingo resample latin1.jsonl", "latin1.jsonl: line 2: not UTF-8 text"),
        ("decompression bomb", "flamingo encode bomb.png",
         "bomb.png: the image claims 30000x30000 = 900,000,000 pixels, over the limit of 89,478,485"),
        ("not a video", "flamingo encode half.webm", "half.webm: not a video ("),
        ("not an image, as a prompt's media", f'echo "{prompt(["notes.png"])}" | flamingo generate',
         "notes.png: not an image"),
        ("prompt past the context", f'echo "{prompt([good], "<image>" + "What colour is it? " * 200)}" '
         "| flamingo generate", "q1: the prompt is "),
        ("full disk, -o", "flamingo prompt --shots shots.jsonl -o /dev/full < shots.jsonl",
         "/dev/full: cannot write (No space left on device)"),
        ("full disk, stdout", "flamingo prompt --shots shots.jsonl < shots.jsonl > /dev/full",
         "<stdout>: cannot write (No space left on device)"),
    ]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with almost no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case", range(18))
def test_bad_input_is_one_line_exit_1_and_no_traceback(world, case):
    root, env = world
    name, command, message = _bad_inputs(root)[case]
    r = sh(command, root, env)
    assert r.returncode == 1, name
    assert r.stdout == "", name
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), f"{name}: {r.stderr!r}"
    assert message in r.stderr, name
    assert "Traceback" not in r.stderr and "object at 0x" not in r.stderr


@pytest.mark.parametrize("case", [1, 4])
def test_debug_shows_the_traceback(world, case):
    root, env = world
    name, command, _ = _bad_inputs(root)[case]
    assert "Traceback" in sh(command, root, {**env, "FLAMINGO_DEBUG": "1"}).stderr, name
    flag = command.replace("| flamingo ", "| flamingo --debug ") if "|" in command else \
        command.replace("flamingo ", "flamingo --debug ", 1)
    assert "Traceback" in sh(flag, root, env).stderr, name


def test_no_input_on_a_terminal_exits_2_with_a_hint(world):
    root, env = world
    primary, secondary = pty.openpty()
    try:
        r = subprocess.run([str(BIN / "flamingo"), "resample"], stdin=secondary, cwd=root, env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        os.close(primary)
        os.close(secondary)
    assert r.returncode == 2 and r.stdout == ""
    assert "no input" in r.stderr and "- means stdin" in r.stderr


def test_dash_means_stdin_and_stdout(world):
    root, env = world
    a = sh("flamingo resample - -o - < shots.jsonl", root, env, check=True).stdout
    b = sh("cat shots.jsonl | flamingo resample", root, env, check=True).stdout
    assert a == b and len(records(a)) == len(COLOURS)


def test_stages_that_do_not_shard_refuse_under_torchrun_politely(world):
    root, env = world
    r = sh("flamingo prompt --shots shots.jsonl < shots.jsonl", root, {**env, "WORLD_SIZE": "2", "RANK": "1"})
    assert r.returncode == 2 and r.stdout == "" and "runs as one process" in r.stderr


TORCHRUN = "torchrun --standalone --nproc_per_node 2 --no-python flamingo"
# Small batches, so the ranks get several units each (an encode window is 8 batches).
SHARDED = {
    "encode": "encode imgs/ support.jsonl --batch-size 1",
    "generate": "generate feats.jsonl --shots shots.jsonl -k 2 --batch-size 2 --max-new-tokens 4",
    "score": "score prompts.jsonl --candidates classes.txt --batch-size 3",
    "resample": "resample shots.jsonl",
}


@pytest.fixture(scope="module")
def sharded_inputs(world):
    root, env = world
    sh("flamingo encode imgs/ > feats.jsonl", root, env, check=True)
    sh("flamingo prompt feats.jsonl --shots shots.jsonl -k 2 > prompts.jsonl", root, env, check=True)
    return root, env


@pytest.mark.parametrize("stage", list(SHARDED))
def test_under_torchrun_the_output_is_the_bytes_of_one_process(sharded_inputs, stage):
    root, env = sharded_inputs
    one = sh(f"flamingo {SHARDED[stage]}", root, env, check=True)
    two = sh(f"{TORCHRUN} {SHARDED[stage]}", root, env, check=True)
    assert len(records(one.stdout)) >= 6
    assert two.stdout == one.stdout
    assert "Error" not in two.stderr


@pytest.mark.parametrize("stage", ["generate", "score"])
def test_shards_merged_are_the_bytes_of_one_process(sharded_inputs, stage):
    root, env = sharded_inputs
    one = sh(f"flamingo {SHARDED[stage]}", root, env, check=True).stdout
    # In a directory of their own, as a job array writes them: media paths are relative to each file.
    parts = [f"parts-{stage}/part{i}.jsonl" for i in range(3)]
    (root / f"parts-{stage}").mkdir(exist_ok=True)
    indices = []
    for i, part in enumerate(parts):
        sh(f"flamingo {SHARDED[stage]} --shard {i}/3 -o {part}", root, env, check=True)
        indices.append([r["input_index"] for r in records((root / part).read_text())])
    assert all(indices), "every part has work"
    assert sorted(sum(indices, [])) == list(range(len(records(one)))), "each input in exactly one part"
    merged = sh(f"flamingo merge {' '.join(reversed(parts))}", root, env, check=True).stdout
    assert merged == one
    twice = sh(f"flamingo merge {parts[0]} {parts[0]}", root, env)
    assert twice.returncode == 1 and "twice" in twice.stderr and "Traceback" not in twice.stderr
    short = sh(f"flamingo merge {parts[0]} {parts[2]} -o merged.jsonl", root, env)
    assert short.returncode == 1 and len(short.stderr.splitlines()) == 1, short.stderr
    assert "2 files for 3 parts: no records of part 1/3" in short.stderr and not (root / "merged.jsonl").exists()
    plain = sh("flamingo merge shots.jsonl", root, env)
    assert plain.returncode == 1 and "not a --shard output" in plain.stderr
    bad = sh(f"flamingo {SHARDED[stage]} --shard 3/3", root, env)
    assert bad.returncode == 1 and "0 <= I < N" in bad.stderr


def test_under_torchrun_a_bad_record_stops_the_run_after_what_came_before_it(sharded_inputs):
    root, env = sharded_inputs
    lines = (root / "prompts.jsonl").read_text().splitlines(keepends=True)
    (root / "bad-prompts.jsonl").write_text("".join(lines[:5]) + "{bad\n" + "".join(lines[5:]))
    command = "score bad-prompts.jsonl --candidates classes.txt --batch-size 3"
    one = sh(f"flamingo {command}", root, env)
    two = sh(f"{TORCHRUN} {command}", root, env)
    assert one.returncode == two.returncode == 1
    assert two.stdout == one.stdout and len(records(one.stdout)) == 5
    errors = [line for line in two.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: bad-prompts.jsonl: line 6: malformed JSON (Expecting property name enclosed in double "
                      "quotes)"], "rank 0 says it once"


@pytest.mark.parametrize("bad", [2, 3], ids=["rank-0-unit", "rank-1-unit"])
def test_under_torchrun_a_unit_that_fails_stops_every_rank_after_what_came_before_it(sharded_inputs, bad):
    # One record per unit here, dealt 0, 1, 0, 1, ...: record 2 fails on rank 0, record 3 on rank 1,
    # while the other rank's unit of the round succeeds (the failure once left rank 0 waiting forever).
    root, env = sharded_inputs
    prompts = records((root / "prompts.jsonl").read_text())
    prompts[bad]["media"][-1] = str(root / "gone.safetensors") + "#features"
    (root / "gone-prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    command = "score gone-prompts.jsonl --candidates classes.txt --batch-size 3"
    one = sh(f"flamingo {command}", root, env)
    two = sh(f"{TORCHRUN} {command}", root, env, timeout=300)
    assert one.returncode == two.returncode == 1
    assert two.stdout == one.stdout and len(records(one.stdout)) == bad
    errors = [line for line in two.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "gone.safetensors" in errors[0], two.stderr
    assert "flamingo_cli/" not in two.stderr, "no rank's traceback"


def test_generate_prompt_and_score_read_the_shards_encode_wds_writes(world):
    root, env = world
    sh("flamingo encode imgs/ > feats.jsonl", root, env, check=True)
    sh("flamingo encode feats.jsonl --wds shards/q-%06d.tar --shard-size 4 -o /dev/null", root, env, check=True)
    shards = "'shards/q-{000000..000001}.tar'"
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["q-000000.tar", "q-000001.tar"]
    generate = "--shots shots.jsonl -k 2 --max-new-tokens 4 --batch-size 2"
    from_records = records(sh(f"flamingo generate feats.jsonl {generate}", root, env, check=True).stdout)
    from_shards = records(sh(f"flamingo generate {shards} {generate}", root, env, check=True).stdout)
    assert len(from_shards) == 6
    assert [(r["id"], r["output"]) for r in from_shards] == [(r["id"], r["output"]) for r in from_records]
    score = "flamingo prompt {} --shots shots.jsonl -k 2 | flamingo score --candidates classes.txt"
    scored = [records(sh(score.format(source), root, env, check=True).stdout) for source in ("feats.jsonl", shards)]
    assert [(r["id"], r["scores"]) for r in scored[1]] == [(r["id"], r["scores"]) for r in scored[0]]
    # the features were unpacked once, into the cache, by content: a second read writes nothing
    unpacked = sorted((root / "cache" / "shards").rglob("*.safetensors"))
    assert len(unpacked) == 6
    stamps = [p.stat().st_mtime_ns for p in unpacked]
    sh(f"flamingo generate {shards} {generate}", root, env, check=True)
    assert [p.stat().st_mtime_ns for p in unpacked] == stamps


def test_encode_reads_img2dataset_shards(world):
    # img2dataset's layout: KEY.jpg, KEY.txt (the caption), KEY.json (its metadata), in numbered tars.
    import io

    from safetensors.torch import load_file

    root, env = world
    (root / "jpgs").mkdir()
    for n, chunk in enumerate([COLOURS[:3], COLOURS[3:]]):
        members = {}
        for colour in chunk:
            key = f"{n:05d}{COLOURS.index(colour):04d}"
            buffer = io.BytesIO()
            Image.new("RGB", (40, 32), colour).save(buffer, "JPEG")
            (root / "jpgs" / f"{key}.jpg").write_bytes(buffer.getvalue())
            members.update({f"{key}.jpg": buffer.getvalue(), f"{key}.txt": f"a {colour} square".encode(),
                            f"{key}.json": json.dumps({"key": key, "url": f"http://x/{colour}.jpg"}).encode()})
        _tar(root / f"raw-{n:05d}.tar", members)
    got = records(sh("flamingo encode 'raw-{00000..00001}.tar'", root, env, check=True).stdout)
    assert [r["id"] for r in got] == [f"{n:05d}{i:04d}" for n, i in [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]]
    assert got[1]["caption"] == f"a {COLOURS[1]} square" and got[1]["url"] == f"http://x/{COLOURS[1]}.jpg"
    files = {Path(r["image"]).stem: r for r in records(sh("flamingo encode jpgs/", root, env, check=True).stdout)}
    for record in got:
        mine = load_file(record["features"].split("#")[0])["features"]
        theirs = load_file(files[record["id"]]["features"].split("#")[0])["features"]
        assert torch.equal(mine, theirs), "the same image, from a shard or a file, encodes the same"


@pytest.mark.parametrize("make, problem", [
    (None, "bad-00000.tar: no such shard (and 1 more)"),
    (lambda p: p.write_bytes(b"not a tar archive" * 64), "bad-00000.tar: not a readable shard"),
    (lambda p: _tar(p, {"k1.txt": b"a caption"}), "bad-00000.tar:k1: no media"),
])
def test_bad_shards_are_one_line_naming_them(world, make, problem):
    root, env = world  # shared with the tests above: names of its own
    for old in root.glob("bad-*.tar"):
        old.unlink()
    if make is not None:
        make(root / "bad-00000.tar")
        _tar(root / "bad-00001.tar", {})
    r = sh("flamingo encode 'bad-{00000..00001}.tar'", root, env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].startswith(f"Error: {problem}"), r.stderr


def _tar(path, members):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_preset_then_environment_then_flag(world, tmp_path):
    root, env = world
    preset = tmp_path / "prompt.yaml"
    preset.write_text("k: 1\nselect: first\n")
    cmd = f"flamingo prompt --config {preset} --shots shots.jsonl < shots.jsonl"
    shots = lambda r: len(records(r.stdout)[0]["shots"])  # noqa: E731
    assert shots(sh(cmd, root, env, check=True)) == 1
    assert shots(sh(cmd, root, {**env, "FLAMINGO_PROMPT_K": "2"}, check=True)) == 2
    assert shots(sh(cmd + " -k 3", root, {**env, "FLAMINGO_PROMPT_K": "2"}, check=True)) == 3
    preset.write_text("kk: 1\n")
    r = sh(cmd, root, env)
    assert r.returncode == 2 and "unknown option(s) kk" in r.stderr


def test_stage_help_does_not_import_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom flamingo_cli.cli import cli\n"
            "for stage in ['encode', 'resample', 'prompt', 'generate', 'score', 'init']:\n"
            "    r = CliRunner().invoke(cli, [stage, '--help'])\n"
            "    assert r.exit_code == 0 and 'Usage:' in r.output, stage\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_jq_filters_between_stages(world):
    root, env = world
    r = sh("flamingo encode imgs/ | jq -c 'select(.id | test(\"red|blue\"))'"
           " | flamingo generate --shots shots.jsonl -k 1 | jq -r .id", root, env, check=True)
    assert r.stdout.split() == ["imgs/0-red.png", "imgs/2-blue.png"]


def _stderr_on_a_terminal(args, cwd, env):
    import fcntl
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # an 100-column terminal
    with open(cwd / "shots.jsonl", "rb") as stdin:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    stdout = proc.stdout.read()
    proc.wait(timeout=120)
    os.close(primary)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_progress_bars_only_on_a_terminal_and_never_on_stdout(world):
    root, env = world
    code, stdout, stderr = _stderr_on_a_terminal([str(BIN / "flamingo"), "resample"], root, env)
    assert code == 0 and "resample" in stderr and "rec" in stderr
    assert len(records(stdout)) == len(COLOURS)
    code, stdout, stderr = _stderr_on_a_terminal([str(BIN / "flamingo"), "resample", "--quiet"], root, env)
    assert code == 0 and stderr == "" and len(records(stdout)) == len(COLOURS)


def test_output_to_a_device_writes_through_and_never_replaces_it():
    import stat

    from flamingo_cli.formats.artifacts import open_output

    with open_output("/dev/null") as f:
        f.write('{"id": 1}\n')
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_encode_max_pixels_defaults_to_the_library_limit():
    from flamingo_cli.cli.encode import encode
    from flamingo_cli.inference.media import MAX_PIXELS

    assert {p.name: p.default for p in encode.params}["max_pixels"] == MAX_PIXELS


def _wait_for(condition, process, seconds=120):
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline, "the stage did not get going"
        time.sleep(0.05)


def test_a_signal_mid_run_exits_as_shells_expect_and_leaves_only_whole_output(world):
    """SIGTERM (timeout, SLURM) during generate -o FILE: exit 143, the temp file beside FILE goes
    and no partial FILE appears. Ctrl-C during generate to stdout: exit 130, and every record
    written before it is whole."""
    root, env = world
    features = records((root / "shots.jsonl").read_text())[0]["features"]
    (root / "many.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": "<image>Output:", "media": [features]}) + "\n" for i in range(2000)))
    command = [str(BIN / "flamingo"), "generate", "-q", "--batch-size", "1", "many.jsonl"]

    p = subprocess.Popen([*command, "-o", "out.jsonl"], cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: list(root.glob(".out.jsonl.*.tmp")), p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert (p.returncode, out, err) == (143, "", "flamingo: terminated\n")
    assert not list(root.glob(".out.jsonl*")) and not (root / "out.jsonl").exists()

    with open(root / "stdout.jsonl", "w") as sink:
        # As from a terminal: a suite started in the background (`make test &`) hands its children
        # SIGINT ignored, and Python, as it should, then never turns Ctrl-C into KeyboardInterrupt.
        p = subprocess.Popen(command, cwd=root, env=env, stdout=sink, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _wait_for(lambda: (root / "stdout.jsonl").read_text().count("\n") >= 2, p)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    assert (p.returncode, err) == (130, "flamingo: interrupted\n")
    assert 2 <= len(records((root / "stdout.jsonl").read_text())) < 2000


def test_records_without_an_id_are_named_by_their_line_and_told_once(world):
    """The one rule for every stage: no id means SOURCE:LINE, said once per source; an id that is
    neither a string nor an integer is an error."""
    root, env = world
    shots = records((root / "shots.jsonl").read_text())
    anonymous = "".join(json.dumps({k: v for k, v in s.items() if k != "id"}) + "\n" for s in shots[:3])
    (root / "anonymous.jsonl").write_text(anonymous)
    r = sh("flamingo prompt -k 2 --shots shots.jsonl < anonymous.jsonl", root, env, check=True)
    out = records(r.stdout)
    assert [o["id"] for o in out] == ["stdin:1", "stdin:2", "stdin:3"]
    assert len({tuple(o["shots"]) for o in out}) > 1  # seeded by their own ids, not all alike
    assert r.stderr == "flamingo: <stdin>: records without an 'id' are named by their line (stdin:1, ...)\n"
    r = sh("flamingo prompt -k 2 --shots anonymous.jsonl anonymous.jsonl", root, env, check=True)
    assert [o["id"] for o in records(r.stdout)] == ["anonymous.jsonl:1", "anonymous.jsonl:2", "anonymous.jsonl:3"]
    assert r.stderr.count("records without an 'id'") == 2  # the queries' file and the shots' file
    r = sh("""printf '{"id": ["a"], "image": "x.png"}\\n' | flamingo encode""", root, env)
    assert r.returncode == 1
    assert r.stderr == """Error: <stdin>: line 1: 'id' must be a non-empty string or an integer, got ["a"]\n"""


def test_media_paths_in_a_records_file_are_relative_to_that_file(world):
    """Paths in a records file are relative to the file (in a pipe, to the current directory), so
    the same prompts work from any directory, and a file written with -o reads back from anywhere."""
    root, env = world
    away = root / "away" / "deeper"
    away.mkdir(parents=True, exist_ok=True)
    (root / "queries.jsonl").write_text('{"id": "q", "image": "imgs/0-red.png"}\n')
    prompt = "flamingo prompt -k 2"
    here = records(sh(f"{prompt} --shots support.jsonl queries.jsonl", root, env, check=True).stdout)[0]
    assert all(Path(root, m).is_file() for m in here["media"])

    absolute = records(sh(f"{prompt} --shots {root}/support.jsonl ../../queries.jsonl", away, env, check=True).stdout)
    assert absolute[0]["media"] == [str(root / m) for m in here["media"][:-1]] + ["../../" + here["media"][-1]]
    piped = records(sh(f"{prompt} --shots <(cat support.jsonl) queries.jsonl", root, env, check=True).stdout)
    assert piped[0]["media"] == here["media"]  # a pipe has no directory of its own

    (away / "out").mkdir(exist_ok=True)
    sh(f"{prompt} --shots ../../support.jsonl -o out/prompts.jsonl ../../queries.jsonl", away, env, check=True)
    written = records((away / "out/prompts.jsonl").read_text())[0]
    assert written["media"] == ["../../../" + m for m in here["media"]]
    answer = "flamingo generate --max-new-tokens 3 -q"
    from_root = records(sh(f"{prompt} --shots support.jsonl queries.jsonl | {answer}", root, env, check=True).stdout)
    from_file = records(sh(f"{answer} away/deeper/out/prompts.jsonl", root, env, check=True).stdout)
    assert [r["output"] for r in from_file] == [r["output"] for r in from_root]


def test_videos_flow_through_every_stage_beside_images(world):
    """encode takes videos (files, directories mixed with images, `video` records); prompts mix
    videos and images; a video path in a prompt is sampled as encode samples it by default."""
    from conftest import write_video

    from flamingo_cli.formats.artifacts import load_ref

    root, env = world
    clips = root / "clips"
    clips.mkdir(exist_ok=True)
    write_video(clips / "a.mp4", [0, 1, 2, 3, 4, 5, 6, 7], fps=4)
    write_video(clips / "b.gif", [3, 2, 1, 0], fps=2)
    Image.new("RGB", (40, 40), "red").save(clips / "c.png")
    out = records(sh("flamingo encode --frames 6 --fps 2 clips/", root, env, check=True).stdout)
    assert [(r["id"], "video" in r) for r in out] == [("clips/a.mp4", True), ("clips/b.gif", True),
                                                     ("clips/c.png", False)]
    assert [load_ref(r["features"])[0].shape[0] for r in out] == [6, 6, 1]

    shots = [{"id": "s-a", "video": "clips/a.mp4", "caption": "colours change"},
             {"id": "s-c", "image": "clips/c.png", "caption": "a red square"}]
    (root / "video_shots.jsonl").write_text("".join(json.dumps(s) + "\n" for s in shots))
    answer = "flamingo generate --shots video_shots.jsonl -k 2 --max-new-tokens 4 -q"
    raw = records(sh(f"flamingo encode clips/b.gif | {answer}", root, env, check=True).stdout)
    assert set(raw[0]["media"][:2]) == {"clips/a.mp4", "clips/c.png"} and raw[0]["media"][2].endswith("#features")
    # The same prompt from pre-encoded shots (encode's default sampling) and a resampled query
    # answers the same.
    sh("flamingo encode video_shots.jsonl -o video_shots.feats.jsonl", root, env, check=True)
    encoded = records(sh(f"flamingo encode clips/b.gif | flamingo resample | "
                         f"{answer.replace('video_shots', 'video_shots.feats')}", root, env, check=True).stdout)
    assert load_ref(encoded[0]["visual"])[0].shape[0] == 16  # the checkpoint's latents, as for an image
    assert [r["output"] for r in encoded] == [r["output"] for r in raw]
    scored = records(sh("flamingo encode clips/b.gif | flamingo prompt --shots video_shots.feats.jsonl -k 2 "
                        "| flamingo score --candidates classes.txt -q", root, env, check=True).stdout)
    assert set(scored[0]["scores"]) == {"red", "green", "blue"}


def test_unreadable_videos_are_skipped_and_counted(world, tmp_path):
    from conftest import write_video

    root, env = world
    write_video(tmp_path / "good.webm", [0, 1, 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "noise.avi").write_bytes(bytes(range(256)) * 4)
    r = sh(f"flamingo encode --skip-bad {tmp_path}", root, env, check=True)
    assert [o["id"] for o in records(r.stdout)] == [str(tmp_path / "good.webm")]
    assert r.stderr == (f"flamingo encode: skipped 2 unreadable file(s); first: {tmp_path}/empty.mp4: empty file, "
                        "not a video\n")


def test_a_full_cache_and_a_sigterm_during_encode_wds_leave_nothing_partial(world, tmp_path):
    """A feature file the storage refuses (a file-size limit standing in for a full
    FLAMINGO_CACHE) is one line naming it, with no temp file left; SIGTERM while encode --wds
    writes its shards exits 143 and leaves only complete shards, no temp files."""
    import tarfile

    root, env = world
    r = sh(f"trap '' XFSZ; ulimit -f 1; FLAMINGO_CACHE={tmp_path}/cache flamingo encode -q --workers 0 imgs/0-red.png", root, env)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"Error: {tmp_path}/cache/") and r.stderr.endswith(": cannot write (File too large)\n")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []

    (tmp_path / "many.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "image": str(root / "imgs/0-red.png"), "caption": "red"}) + "\n"
        for i in range(3000)))
    shards = tmp_path / "shards"
    p = subprocess.Popen([str(BIN / "flamingo"), "encode", "-q", "--wds", f"{shards}/s-%06d.tar", "--shard-size", "1",
                          "-o", str(tmp_path / "out.jsonl"), str(tmp_path / "many.jsonl")],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: shards.exists() and len(list(shards.glob("s-*.tar"))) >= 2, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert (p.returncode, out, err) == (143, "", "flamingo: terminated\n")
    written = sorted(shards.iterdir())
    assert written and all(s.name.endswith(".tar") for s in written), [s.name for s in written]  # no .tmp
    for shard in written:
        with tarfile.open(shard) as tar:
            assert len(tar.getmembers()) == 2  # the record and its features: complete
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".out.jsonl*"))
