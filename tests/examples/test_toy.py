"""The toy world (examples/toy), its recipe at a tiny size, and the bundled default model it trained."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "examples" / "toy"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(TOY))

import world  # noqa: E402


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "FLAMINGO_CKPT"}
    return {**env, "PATH": f"{BIN}:{env['PATH']}", **extra}


# -- the world ------------------------------------------------------------------------------

def test_held_out_words_and_combinations_never_reach_training_text(tmp_path):
    held_out_labels = set(world.HELD_OUT_LABELS)
    held_out_captions = {world.Item(c, s, 0).caption for c, s in world.HELD_OUT_COMBOS}
    held_out_items = {f"{c} {s}" for c, s in world.HELD_OUT_COMBOS}
    assert not held_out_labels & set(world.TRAIN_LABELS)
    assert not set(world.TEST_COMBOS) & set(world.TRAIN_COMBOS)

    assert not held_out_labels & set(world.TEXT_LABELS) and set(world.TRAIN_LABELS) < set(world.TEXT_LABELS)

    rng = random.Random(0)
    vocabulary = world.WORDS + world.SYLLABLES + world.TRAIN_LABELS
    words = set()
    for _ in range(3000):
        text = world.lm_sample(rng, vocabulary)
        assert not set(text.split()) & held_out_labels, text
        assert not any(item in text for item in held_out_items), text
        words |= set(text.split())
    # the LM's episodes bind words beyond the documents' 400, so it must copy them, not recall them
    assert len(words & (set(world.TEXT_LABELS) - set(world.TRAIN_LABELS))) > 1000

    subprocess.run([sys.executable, str(TOY / "make_data.py"), str(tmp_path), "--pairs", "200", "--docs", "100",
                    "--videos", "40"], check=True)
    for line in (tmp_path / "vtp.jsonl").read_text().splitlines():
        assert not set(re.findall(r"\w+", json.loads(line)["caption"])) & held_out_labels
    rng = random.Random(1)
    for clip in (world.random_clip(rng) for _ in range(500)):  # before and after a change: training combinations
        assert (clip.colour, clip.shape) in world.TRAIN_COMBOS and (clip.becomes or clip.colour, clip.shape) in world.TRAIN_COMBOS
    for line in (tmp_path / "pairs.jsonl").read_text().splitlines():
        assert json.loads(line)["caption"] not in held_out_captions
    located = [json.loads(line) for line in (tmp_path / "contrastive.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [(r["id"], r["image"]) for r in located] == [(r["id"], r["image"]) for r in pairs]
    assert all(r["caption"].startswith(p["caption"] + " at the ") for r, p in zip(located, pairs))
    for line in (tmp_path / "docs.jsonl").read_text().splitlines():
        doc = json.loads(line)
        texts = [s for s in doc["segments"] if isinstance(s, str)]
        assert len(doc["images"]) == len(texts) and all(isinstance(s, int) for s in doc["segments"][::2])
        for text in texts:
            assert not set(re.findall(r"\w+", text)) & held_out_labels
            assert not any(c in text for c in held_out_captions)


def test_label_words_tokenize_into_known_syllables():
    tokenizer = world.build_tokenizer()
    for word in world.HELD_OUT_LABELS[:50]:
        pieces = tokenizer.tokenize(word)
        assert len(pieces) == 2 and tokenizer.unk_token not in pieces
        assert tokenizer.decode(tokenizer(word).input_ids) == word
    ids = tokenizer("Output: a red circle").input_ids
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == "Output : a red circle"


def test_the_vocabulary_has_each_word_once_and_video_text_tokenizes():
    tokenizer = world.build_tokenizer()
    assert len(tokenizer) == len(set(tokenizer.get_vocab()))
    ids = tokenizer("Question: Which way does it slide? Answer: left . a red circle becomes blue").input_ids
    assert tokenizer.unk_token_id not in ids and max(ids) < len(tokenizer)


def test_clips_move_or_change_colour_in_the_order_their_answer_says():
    import numpy as np

    def near(image, colour):
        return np.linalg.norm(np.asarray(image, float) - np.array(world.COLOURS[colour]), axis=-1) < 60

    def centroid(image, colour):
        ys, xs = np.nonzero(near(image, colour))
        return xs.mean(), ys.mean()

    for direction, (dx, dy) in world.DIRECTIONS.items():
        frames = world.Clip("yellow", "square", 7, direction=direction).frames()
        (x0, y0), (x1, y1) = centroid(frames[0], "yellow"), centroid(frames[-1], "yellow")
        assert np.sign(round(x1 - x0)) == dx and np.sign(round(y1 - y0)) == dy, direction
    frames = world.Clip("red", "circle", 7, becomes="blue").frames()
    assert len(frames) == world.VIDEO_FRAMES
    assert near(frames[0], "red").sum() > 20 and near(frames[0], "blue").sum() == 0
    assert near(frames[-1], "blue").sum() > 20 and near(frames[-1], "red").sum() == 0
    assert [np.asarray(f).tobytes() for f in frames] == [np.asarray(f).tobytes() for f in
                                                         world.Clip("red", "circle", 7, becomes="blue").frames()]


def test_a_located_caption_says_where_the_shape_is_drawn():
    import numpy as np

    rng = random.Random(3)
    for item in (world.random_item(rng) for _ in range(40)):
        pixels = np.asarray(item.image(), float)
        ys, xs = np.nonzero(np.linalg.norm(pixels - np.array(world.COLOURS[item.colour]), axis=-1) < 60)
        x, y = item.centre
        # the drawn shape's centroid is where centre says, to within a pixel or two of 32
        assert abs(xs.mean() + 0.5 - x * world.IMAGE_SIZE) < 2 and abs(ys.mean() + 0.5 - y * world.IMAGE_SIZE) < 2
        row, column = item.place.split()
        assert world.ROWS.index(row) == min(2, int(3 * y)) and world.COLUMNS.index(column) == min(2, int(3 * x))
        assert item.located_caption == f"{item.caption} at the {row} {column}"
    tokenizer = world.build_tokenizer()
    assert tokenizer.unk_token_id not in tokenizer("a red circle at the centre middle").input_ids


def test_images_are_a_pure_function_of_the_item():
    item = world.Item("red", "circle", 42)
    assert item.image().tobytes() == world.Item("red", "circle", 42).image().tobytes()
    assert item.image().tobytes() != world.Item("red", "circle", 43).image().tobytes()
    assert item.image().size == (world.IMAGE_SIZE, world.IMAGE_SIZE)


# -- the recipe -----------------------------------------------------------------------------

def test_tiny_recipe_runs_end_to_end(tmp_path):
    """Every step of `make -C examples/toy` (data, LM, contrastive encoder, init, feature shards,
    pretrain, evaluation) at a size that takes about a minute."""
    out, results = tmp_path / "out", tmp_path / "results"
    sizes = dict(OUT=out, RESULTS=results, PYTHON=sys.executable, PAIRS=48, DOCS=16, LM_STEPS=2,
                 LM_EVAL_EPISODES=2, CONTRASTIVE_STEPS=2, CONTRASTIVE_BATCH=16, PRETRAIN_STEPS=2, DOCS_BATCH=4,
                 PAIRS_BATCH=4, SAVE_EVERY=1, SHARD_SIZE=32, EVAL_N=1, EVAL_CAPTIONS=2, VIDEOS=8, VTP_BATCH=4,
                 EVAL_VIDEOS=2, PROBE_IMAGES=16, PROBE_MAX_ERROR=1000)
    r = subprocess.run(["make", "-C", str(TOY), "all", "eval", *(f"{k}={v}" for k, v in sizes.items())],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]

    icl = json.loads((out / "lm" / "icl.json").read_text())
    assert icl["steps"] == 2 and 0 <= icl["held_out_labels_2way_4shot_generate"] <= 1
    metrics = [json.loads(line) for line in (out / "encoder" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    probe = json.loads((out / "encoder" / "probe.json").read_text())
    assert probe["images"] == 16 and probe["ratio"] > 0
    run_metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in run_metrics] == [1, 2] and set(run_metrics[0]["loss"]) == {"docs", "pairs", "vtp"}

    from safetensors.torch import load_file

    from flamingo_cli.formats.checkpoint import load_checkpoint

    model = load_checkpoint(out / "run" / "checkpoint")
    trained = load_file(str(out / "encoder" / "encoder.safetensors"))
    for name, tensor in model.encoder.model.state_dict().items():
        assert (tensor == trained[name]).all(), f"the checkpoint's encoder is not the contrastive one: {name}"
    summary = json.loads((results / "results.json").read_text())
    assert {"held_out_images", "held_out_combos", "curves", "ablation_gates_0", "video"} <= set(summary)
    assert {"0_shots", "4_shots", "time_embeddings_zeroed", "shuffled_frames", "8_frames"} <= set(summary["video"]["direction"])
    assert set(summary["curves"]["labels_2way"]) == {"0", "1", "2", "4"}
    assert (results / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| task from context |" in (results / "results.md").read_text()


# -- the bundled default model --------------------------------------------------------------

RESULTS = json.loads((TOY / "results" / "results.json").read_text())
VIDEO_RESULTS = json.loads((TOY / "results-video" / "results.json").read_text())


def test_bundled_model_reaches_the_stated_caption_accuracy():
    """The README's caption exact match on 50 fixed held-out images, minus a small margin."""
    import evaluate

    from flamingo_cli.formats.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint
    from flamingo_cli.inference.media import MediaResolver

    model = load_checkpoint(BUNDLED_CHECKPOINT).eval()
    runner = evaluate.Runner(model, MediaResolver(model))
    images = evaluate.MediaFiles(Path(os.environ.get("TMPDIR", "/tmp")) / "flamingo-toy-test-images")
    support = evaluate.items(evaluate.SEEDS["support"], 64)
    accuracy = evaluate.caption_accuracy(runner, images, 50, support)
    stated = RESULTS["fixed_captions"]
    assert stated["n"] == 50
    assert accuracy >= stated["accuracy"] - 0.04, (accuracy, stated)
    assert f"{100 * stated['accuracy']:.0f}%" in (ROOT / "README.md").read_text()


def test_bundled_model_reaches_the_stated_video_accuracy():
    """The README's 4-shot video accuracy on 24 fixed held-out clips (both questions), minus 2 clips."""
    import evaluate
    import video_evidence

    from flamingo_cli.formats.checkpoint import load_checkpoint
    from flamingo_cli.inference.media import MediaResolver

    model = load_checkpoint("toy-video").eval()
    runner = evaluate.Runner(model, MediaResolver(model))
    clips = evaluate.MediaFiles(Path(os.environ.get("TMPDIR", "/tmp")) / "flamingo-toy-test-videos")
    stated = VIDEO_RESULTS["video"]["fixed_videos"]
    assert stated["n"] == 24
    accuracy = video_evidence.fixed_accuracy(runner, clips, stated["n"])
    assert accuracy >= stated["accuracy"] - 2 / 24, (accuracy, stated)
    assert f"clips the test suite checks: {100 * stated['accuracy']:.0f}%" in (ROOT / "README.md").read_text()


def test_bundled_models_by_name_unless_a_directory_has_the_name(tmp_path, monkeypatch):
    from flamingo_cli.formats.checkpoint import BUNDLED, BUNDLED_CHECKPOINT, checkpoint_path

    assert checkpoint_path("toy") == BUNDLED_CHECKPOINT and (checkpoint_path("toy-video") / "config.yaml").is_file()
    assert BUNDLED["toy-video"] != BUNDLED_CHECKPOINT
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy-video").mkdir()
    assert checkpoint_path("toy-video") == Path("toy-video")


def test_make_demo_prints_what_the_readme_shows():
    """The demo's lines, stdout only (the notices go to stderr), equal the README's block."""
    r = subprocess.run(["make", "-s", "demo"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("It prints each image's file name")[1].split("```")[1].strip("\n").splitlines()
    assert r.stdout.splitlines() == [line for line in shown if not line.startswith("== ")], r.stdout


def test_stages_default_to_the_bundled_model_and_say_so(tmp_path):
    image = TOY / "images" / "purple-cross.png"
    r = subprocess.run(["bash", "-c", f"set -euo pipefail; flamingo encode {image} "
                        f"| flamingo generate --shots {TOY / 'shots.jsonl'} -k 4"],
                       cwd=ROOT, env=_env(FLAMINGO_CACHE=str(tmp_path / "cache")), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "bundled toy model" in r.stderr
    (record,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert record["output"] == "a purple cross"
    quiet = subprocess.run(["bash", "-c", f"set -euo pipefail; flamingo encode -q {image} "
                            f"| flamingo generate -q --shots {TOY / 'shots.jsonl'} -k 4"],
                           cwd=ROOT, env=_env(FLAMINGO_CACHE=str(tmp_path / "cache")), capture_output=True, text=True)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, r.stdout, "")


def test_pretrain_still_needs_an_explicit_checkpoint(tmp_path):
    r = subprocess.run([str(BIN / "flamingo"), "pretrain", "--run-dir", str(tmp_path / "run"), "--data", "x=y.tar"],
                       env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr
