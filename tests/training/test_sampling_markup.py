"""The sampler writes a model's tokens as its config does at inference (config.model_text): an
IDEFICS-style model's image markup and end-of-chunk token, and the default config's sequences as before."""
import random

import pytest
import torch
from conftest import VISUAL_DIM, tiny_config

from flamingo_cli.errors import ConfigError
from flamingo_cli.inference.generation import tokenize_prompts
from flamingo_cli.model.config import IMAGE_TOKEN
from flamingo_cli.training.sampling import IGNORE, SamplingConfig, document_ids, interleaved_example, pair_example

FAKE = "<fake_token_around_image>"
CAPTION = "a red circle"
DOCUMENTS = [
    ["Intro text.", 0, "About the first picture.", 1, "More text."],
    [2, "a cat.", 0, 1],  # opens with an image, and two images follow one another
    ["What shape is it?", 0],
]


def idefics_like(lm_dir, eoc: str):
    """A tiny llama Flamingo configured as `flamingo import idefics` configures one: IDEFICS's
    markup around each image and its end-of-chunk token (<end_of_utterance>, or the LM's </s>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flamingo_cli.model.flamingo import Flamingo

    path = lm_dir("llama")
    config = tiny_config(path, reset_after_eos=True)
    config.special_tokens = [FAKE, IMAGE_TOKEN, *([eoc] if eoc != "</s>" else [])]
    config.end_of_chunk_token, config.image_markup = eoc, f"{FAKE}{IMAGE_TOKEN}{FAKE}"
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.add_bos_token = True  # as real Llama tokenizers do, so BOS is covered
    torch.manual_seed(0)
    return Flamingo(config, AutoModelForCausalLM.from_pretrained(path), tokenizer)


@pytest.fixture(params=["<end_of_utterance>", "</s>"])
def model(request, lm_dir):
    return idefics_like(lm_dir, request.param)


def as_prompt(segments) -> str:
    """A document written as prompt text with our markers, laid out as the sampler lays it out."""
    text = ""
    for segment in segments:
        text += segment if isinstance(segment, str) else ("<|endofchunk|>" if text else "") + IMAGE_TOKEN
    return text + "<|endofchunk|></s>"


def prompt_ids(model, text: str) -> list[int]:
    return tokenize_prompts(model, [text]).input_ids[0]


def markup_positions(model, ids) -> set[int]:
    fake = model.tokenizer.convert_tokens_to_ids(FAKE)
    return {i for i, token in enumerate(ids) if token in (fake, model.image_token_id)}


def assert_labels(model, example):
    """No loss on BOS, <image> or its markup; every other token is its own target."""
    ignored = {i for i, label in enumerate(example.labels) if label == IGNORE}
    assert ignored == {0} | markup_positions(model, example.input_ids)
    assert all(example.labels[i] == example.input_ids[i] for i in range(len(example.labels)) if i not in ignored)


@pytest.mark.parametrize("segments", DOCUMENTS)
def test_a_document_is_its_prompt_tokenized(model, segments):
    example = interleaved_example(model.tokenizer, segments, random.Random(0), SamplingConfig(), model.config)
    assert example.input_ids == prompt_ids(model, as_prompt(segments))
    # Not vacuous: the markup and the model's own end-of-chunk token are there, ours is not.
    tokens = model.tokenizer.convert_ids_to_tokens(example.input_ids)
    images = sum(isinstance(s, int) for s in segments)
    assert tokens.count(FAKE) == 2 * images and tokens.count(IMAGE_TOKEN) == images
    assert "<|endofchunk|>" not in tokens and tokens[-2:] == [model.config.end_of_chunk_token, "</s>"]
    assert example.media == [s for s in segments if isinstance(s, int)]
    assert_labels(model, example)


@pytest.mark.parametrize("p_space, caption", [(1.0, " " + CAPTION), (0.0, CAPTION)])
def test_a_pair_is_its_prompt_tokenized(model, p_space, caption):
    example = pair_example(model.tokenizer, CAPTION, random.Random(0), SamplingConfig(p_space=p_space), model.config)
    assert example.input_ids == prompt_ids(model, f"{IMAGE_TOKEN}{caption}<|endofchunk|></s>")
    assert example.input_ids[-2:] == [model.eoc_token_id, model.tokenizer.eos_token_id]
    assert example.media == [0] and example.next_image is False
    assert_labels(model, example)


def test_windows_keep_whole_markups(model):
    """The window counts markup tokens; an image's markup stays whole or goes with its image."""
    config = SamplingConfig(window=24, max_images=2)
    segments = [part for i in range(12) for part in (f"Output: {i} shapes, {12 - i} circles.", i)]
    body, _ = document_ids(model.tokenizer, segments, model.config)
    text = [t for i, t in enumerate(body) if i not in markup_positions(model, body)]
    fake, image = model.tokenizer.convert_tokens_to_ids(FAKE), model.image_token_id
    full = 0
    for seed in range(200):
        example = interleaved_example(model.tokenizer, segments, random.Random(seed), config, model.config)
        if example is None:
            continue
        ids = example.input_ids[1:]
        images = [i for i, t in enumerate(ids) if t == image]
        assert len(images) == len(example.media) <= config.max_images
        assert ids.count(fake) == 2 * len(images) and all(ids[i - 1] == ids[i + 1] == fake for i in images)
        assert example.media == sorted(example.media) and len(ids) <= config.window
        full += len(ids) == config.window
        # What is not markup is one stretch of the document's text, EOCs and EOS.
        rest = [t for i, t in enumerate(ids) if i not in markup_positions(model, ids)]
        assert any(text[s : s + len(rest)] == rest for s in range(len(text) - len(rest) + 1))
        assert_labels(model, example)
    assert full > 10  # windows of whole markups are the full window long: markup tokens are counted


def test_the_default_config_writes_what_it_always_did(make_model):
    model = make_model("llama")
    model.tokenizer.add_bos_token = True
    tokenizer, config = model.tokenizer, model.config
    for segments in DOCUMENTS:
        example = interleaved_example(tokenizer, segments, random.Random(0), SamplingConfig(), config)
        assert example == interleaved_example(tokenizer, segments, random.Random(0), SamplingConfig())
        assert example.input_ids == prompt_ids(model, as_prompt(segments))
    pair = pair_example(tokenizer, CAPTION, random.Random(0), SamplingConfig(p_space=0.0), config)
    assert pair == pair_example(tokenizer, CAPTION, random.Random(0), SamplingConfig(p_space=0.0))
    assert tokenizer.decode(pair.input_ids) == f"<s>{IMAGE_TOKEN}{CAPTION}<|endofchunk|></s>"


def test_without_the_models_config_its_tokenizer_is_refused(lm_dir):
    model = idefics_like(lm_dir, "</s>")
    with pytest.raises(ConfigError, match="sample with its config"):
        pair_example(model.tokenizer, CAPTION, random.Random(0), SamplingConfig())


def test_a_training_step_on_an_idefics_like_model(model, tmp_path):
    """Shards of pairs and documents through ExampleStream and Trainer.accumulate: no sample is
    skipped, and the loss counts exactly the tokens that are not markup."""
    import webdataset as wds

    from flamingo_cli.formats.artifacts import feature_sample
    from flamingo_cli.training.data import ExampleStream, parse_specs
    from flamingo_cli.training.trainer import TrainConfig, Trainer

    model.encoder_id = "tiny-encoder"  # what load_checkpoint sets; the features below claim it
    features = torch.randn(4, 1, 4, VISUAL_DIM)
    records = {"pairs": [{"caption": CAPTION}] * 2, "docs": [{"segments": s} for s in DOCUMENTS[:2]]}
    for name, rows in records.items():
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as sink:
            for i, record in enumerate(rows):
                sink.write(feature_sample(f"{i:04d}", record, list(features[:3]), model.encoder_id))
    specs = parse_specs([f"{n}={tmp_path}/{n}.tar" for n in records], [], ["pairs=2", "docs=2"])
    sampling = SamplingConfig(window=64, max_images=3)

    def no_skips(message):
        raise AssertionError(message)

    streams = {s.name: ExampleStream(s, model.tokenizer, sampling, seed=0, log=no_skips, model_config=model.config)
               for s in specs}
    trainer = Trainer(model.train(), specs, sampling, TrainConfig(), tmp_path / "run")
    losses, tokens, examples = trainer.accumulate(streams)
    assert examples == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    expected = [pair_example(model.tokenizer, CAPTION, random.Random(f"0\0pairs\0{i}"), sampling, model.config)
                for i in range(2)]
    expected += [interleaved_example(model.tokenizer, s, random.Random(f"0\0docs\0{i}"), sampling, model.config)
                 for i, s in enumerate(DOCUMENTS[:2])]
    assert tokens == sum(sum(label != IGNORE for label in e.labels[1:]) for e in expected)
    assert all(s.stats.bad == 0 for s in streams.values())
