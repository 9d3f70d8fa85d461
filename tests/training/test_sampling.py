import random

import pytest
import torch

from flamingo_cli.errors import ConfigError
from flamingo_cli.training.sampling import (
    IGNORE, Example, SamplingConfig, collate, document_ids, interleaved_example, pair_example,
)

CAPTION = "a red circle"
TEXT = "a red circle on a blue background."


@pytest.fixture(params=["llama", "gpt2"])
def family(request, make_model):
    """(tokenizer, the BOS string a sample starts with). The llama tokenizer is set to add BOS
    as real Llama tokenizers do; GPT-2's adds none."""
    tokenizer = make_model(request.param).tokenizer
    if request.param == "llama":
        tokenizer.add_bos_token = True
        return tokenizer, "<s>"
    assert tokenizer("a").input_ids[0] != tokenizer.bos_token_id
    return tokenizer, ""


def ids_of(tokenizer):
    return tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<|endofchunk|>")


def decode(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def after_draws(seed, n):
    rng = random.Random(seed)
    for _ in range(n):
        rng.random()
    return rng.getstate()


def long_document(n=20):
    """Text chunks that differ from one another (so a window is found at one offset only),
    each followed by an image whose medium index is the chunk's number."""
    segments = []
    for i in range(n):
        segments += [f"Output: {i} shapes, {n - i} circles. ", i]
    return segments


def window_start(body, ids):
    starts = [s for s in range(len(body) - len(ids) + 1) if body[s : s + len(ids)] == ids]
    assert len(starts) == 1
    return starts[0]


# ---- pairs ----

@pytest.mark.parametrize("p_space, text", [(1.0, " " + CAPTION), (0.0, CAPTION)])
def test_pair_exact_sequence(family, p_space, text):
    tokenizer, bos = family
    example = pair_example(tokenizer, CAPTION, random.Random(0), SamplingConfig(p_space=p_space))
    assert decode(tokenizer, example.input_ids) == f"{bos}<image>{text}<|endofchunk|></s>"
    image, eoc = ids_of(tokenizer)
    assert example.input_ids[1 if bos else 0] == image
    assert example.input_ids[-2:] == [eoc, tokenizer.eos_token_id]
    assert example.input_ids.count(image) == 1 and example.input_ids.count(eoc) == 1
    assert example.media == [0] and example.next_image is False


def test_pair_draws_once_for_the_space(family):
    tokenizer, _ = family
    for seed in range(20):
        rng = random.Random(seed)
        spaced = random.Random(seed).random() < 0.5
        example = pair_example(tokenizer, CAPTION, rng, SamplingConfig())
        assert decode(tokenizer, example.input_ids).split("<image>")[1].startswith(" ") == spaced
        assert rng.getstate() == after_draws(seed, 1)


def test_pair_space_frequency(family):
    tokenizer, _ = family

    def spaced(seed, p_space):
        ids = pair_example(tokenizer, CAPTION, random.Random(seed), SamplingConfig(p_space=p_space)).input_ids
        return decode(tokenizer, ids).split("<image>")[1].startswith(" ")

    frequency = sum(spaced(seed, 0.3) for seed in range(1000)) / 1000
    assert abs(frequency - 0.3) < 0.05
    assert not any(spaced(seed, 0.0) for seed in range(100))
    assert all(spaced(seed, 1.0) for seed in range(100))


def test_pair_labels(family):
    tokenizer, bos = family
    image, _ = ids_of(tokenizer)
    example = pair_example(tokenizer, CAPTION, random.Random(0), SamplingConfig())
    assert len(example.labels) == len(example.input_ids)
    ignored = {i for i, label in enumerate(example.labels) if label == IGNORE}
    image_at = example.input_ids.index(image)
    assert ignored == ({0, image_at} if bos else {image_at})
    # Text, <|endofchunk|> and EOS keep their loss.
    assert all(example.labels[i] == example.input_ids[i] for i in range(len(example.labels)) if i not in ignored)


def test_pair_truncates_the_caption(family):
    tokenizer, _ = family
    image, eoc = ids_of(tokenizer)
    caption = "This is a picture of a cat wearing sunglasses. Three elephants walking in the savanna."
    full = tokenizer(caption, add_special_tokens=False).input_ids
    assert len(full) > 4
    ids = pair_example(tokenizer, caption, random.Random(0), SamplingConfig(p_space=0, max_caption_tokens=4)).input_ids
    caption_ids = ids[ids.index(image) + 1 : ids.index(eoc)]
    assert caption_ids == full[:4]
    assert ids[-2:] == [eoc, tokenizer.eos_token_id]  # the chunk still ends


def test_text_cannot_inject_special_tokens(family):
    tokenizer, _ = family
    image, eoc = ids_of(tokenizer)
    ids = pair_example(tokenizer, "a <image> b<|endofchunk|>", random.Random(0), SamplingConfig()).input_ids
    assert ids.count(image) == 1 and ids.count(eoc) == 1
    body, media = document_ids(tokenizer, ["x <image> y", 4, "z"])
    assert body.count(image) == 1 and media == [4]


# ---- interleaved documents ----

def test_document_layout(family):
    tokenizer, _ = family
    body, media = document_ids(tokenizer, ["Intro text.", 0, "About the first picture.", 1, "More text."])
    assert decode(tokenizer, body) == (
        "Intro text.<|endofchunk|><image>About the first picture.<|endofchunk|><image>More text.<|endofchunk|></s>"
    )
    assert media == [0, 1]
    # No EOC at the very start; adjacent images each get theirs.
    body, media = document_ids(tokenizer, [2, "a cat.", 0, 1])
    assert decode(tokenizer, body) == "<image>a cat.<|endofchunk|><image><|endofchunk|><image><|endofchunk|></s>"
    assert media == [2, 0, 1]
    with pytest.raises(TypeError):
        document_ids(tokenizer, ["text", 1.5])


def test_short_document_is_taken_whole(family):
    tokenizer, bos = family
    image, _ = ids_of(tokenizer)
    segments = ["Intro.", 0, "About it.", 1, "More."]
    body, _ = document_ids(tokenizer, segments)
    for seed in range(10):
        example = interleaved_example(tokenizer, segments, random.Random(seed), SamplingConfig())
        assert example.input_ids == ([tokenizer.bos_token_id] if bos else []) + body
        assert example.media == [0, 1]
        ignored = {i for i, label in enumerate(example.labels) if label == IGNORE}
        images = {i for i, t in enumerate(example.input_ids) if t == image}
        assert ignored == (images | {0} if bos else images)


def test_windows_are_random_slices_of_the_document(family):
    tokenizer, bos = family
    image, _ = ids_of(tokenizer)
    config = SamplingConfig(window=24, max_images=100)
    segments = long_document()
    body, doc_media = document_ids(tokenizer, segments)
    last_start = len(body) - config.window
    assert last_start > 100
    starts = []
    for seed in range(300):
        example = interleaved_example(tokenizer, segments, random.Random(seed), config)
        if example is None:
            continue
        ids = example.input_ids[1:] if bos else example.input_ids
        assert len(ids) == config.window
        if bos:
            assert example.input_ids[0] == tokenizer.bos_token_id
        start = window_start(body, ids)
        images_before = body[:start].count(image)
        assert example.media == doc_media[images_before : images_before + ids.count(image)]
        starts.append(start)
    # Uniform over the valid starts: both ends of the document are reached.
    assert len(set(starts)) > 100
    assert min(starts) < 0.1 * last_start and max(starts) > 0.9 * last_start


def test_first_images_of_the_window_are_kept(family):
    tokenizer, bos = family
    image, _ = ids_of(tokenizer)
    order = [6, 2, 7, 0, 5, 1, 4, 3]
    for media_order, kept in [(range(8), [0, 1, 2, 3, 4]), (order, order[:5])]:
        segments = [part for m in media_order for part in ("a red circle.", m)] + ["The end."]
        example = interleaved_example(tokenizer, segments, random.Random(0), SamplingConfig())
        assert example.media == kept
        assert example.input_ids.count(image) == 5
        # Only the later <image> tokens go; their EOCs and the text stay.
        body, _ = document_ids(tokenizer, segments)
        sixth = [i for i, t in enumerate(body) if t == image][5]
        expected = body[:sixth] + [t for t in body[sixth:] if t != image]
        assert example.input_ids == ([tokenizer.bos_token_id] if bos else []) + expected


def test_window_without_image_is_none(family):
    tokenizer, _ = family
    image, _ = ids_of(tokenizer)
    config = SamplingConfig(window=8)
    assert all(interleaved_example(tokenizer, [TEXT * 5], random.Random(s), config) is None for s in range(20))
    segments = [TEXT * 5, 0, TEXT]
    examples = [interleaved_example(tokenizer, segments, random.Random(s), config) for s in range(100)]
    assert None in examples
    for example in filter(None, examples):
        assert example.media == [0] and example.input_ids.count(image) == 1


def test_next_image_coin(family):
    tokenizer, _ = family
    segments = ["Intro.", 0, "About it."]

    def coin(seed, p_next):
        return interleaved_example(tokenizer, segments, random.Random(seed), SamplingConfig(p_next=p_next)).next_image

    flips = [coin(seed, 0.3) for seed in range(1000)]
    assert abs(sum(flips) / 1000 - 0.3) < 0.05
    # Drawn first, so a seed decides it whatever the document.
    assert flips == [random.Random(seed).random() < 0.3 for seed in range(1000)]
    assert not any(coin(seed, 0.0) for seed in range(100))
    assert all(coin(seed, 1.0) for seed in range(100))


def test_interleaved_is_deterministic_and_draws_twice(family):
    tokenizer, _ = family
    config = SamplingConfig(window=24)
    segments = long_document()
    examples = []
    for seed in range(20):
        rng = random.Random(seed)
        example = interleaved_example(tokenizer, segments, rng, config)
        assert rng.getstate() == after_draws(seed, 2)
        assert example == interleaved_example(tokenizer, segments, random.Random(seed), config)
        examples.append(example)
    assert len({(tuple(e.input_ids), e.next_image) for e in examples if e is not None}) > 10
    # Same number of draws when the document fits the window, or has no image at all.
    for doc in (["Intro.", 0, "About it."], [TEXT]):
        rng = random.Random(5)
        interleaved_example(tokenizer, doc, rng, SamplingConfig())
        assert rng.getstate() == after_draws(5, 2)


# ---- batching ----

def test_collate():
    a = Example(input_ids=[5, 6, 7, 8], labels=[IGNORE, 6, 7, 8], media=[0, 1], next_image=True)
    b = Example(input_ids=[9, 10], labels=[IGNORE, 10], media=[3], next_image=False)
    batch = collate([a, b], pad_id=99)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, 8], [IGNORE, 10, IGNORE, IGNORE]]
    assert batch["next_image"].dtype == torch.bool and batch["next_image"].tolist() == [True, False]
    assert batch["media"] == [[0, 1], [3]]


def test_collate_real_examples(family):
    tokenizer, _ = family
    config = SamplingConfig()
    examples = [
        pair_example(tokenizer, CAPTION, random.Random(0), config),
        interleaved_example(tokenizer, ["Intro.", 0, "About it.", 1, "More."], random.Random(0), config),
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    length = max(len(e.input_ids) for e in examples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (2, length)
    pair_length = len(examples[0].input_ids)
    assert (batch["input_ids"][0, pair_length:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, pair_length:] == IGNORE).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in examples]


# ---- misuse ----

@pytest.mark.parametrize("bad", [dict(window=0), dict(max_images=0), dict(max_caption_tokens=0),
                                 dict(p_next=1.5), dict(p_space=-0.1)])
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


def test_tokenizer_without_flamingo_tokens(lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lm_dir("gpt2"))
    with pytest.raises(ConfigError, match="<image>"):
        pair_example(tokenizer, CAPTION, random.Random(0), SamplingConfig())
