"""Training documents -> token sequences, sampled as the paper samples them.

    M3W (interleaved):  ...text<EOC><image>text<EOC><image>text<EOC><EOS>
                        a random window of 256 tokens, its first 5 images kept
    pairs:              <BOS><image>caption<EOC><EOS>, a leading space on the caption w.p. 1/2

<image> and <|endofchunk|> (EOC) are written as the model's config writes them at inference
(FlamingoConfig.model_text: IDEFICS's markup around each image, its own end-of-chunk token), so a
model trains on the sequences it is prompted with. They are spliced in by id, never produced by
tokenizing the document's text: text is tokenized with the special tokens split, so a web page
that literally contains "<image>" can neither inject an image slot nor desynchronise `media`
from the sequence.

Randomness comes only from the `random.Random` passed in, and each function draws a fixed
number of times (pairs: one; documents: two), so the trainer's per-sample seeded generator
reproduces the same samples bitwise when training resumes.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..model.config import IMAGE_TOKEN, FlamingoConfig

IGNORE = -100  # label of positions that carry no loss (`lm_loss` ignores it)


@dataclass
class SamplingConfig:
    window: int = 256  # tokens per interleaved sample (the paper's random window)
    max_images: int = 5  # images kept per window: the first ones
    p_next: float = 0.5  # per document: text attends to the next image instead of the previous
    p_space: float = 0.5  # pairs: leading space on the caption with this probability
    max_caption_tokens: int = 32  # pairs: caption tokens kept
    video_frames: int = 8  # raw training videos: frames per clip, from a window at a seeded random start
    video_fps: float = 1.0  # ... this many frames a second (the paper: 8 at 1 FPS)

    def __post_init__(self):
        if self.window < 1 or self.max_images < 1 or self.max_caption_tokens < 1 or self.video_frames < 1:
            raise ValueError("window, max_images, max_caption_tokens and video_frames must be >= 1")
        if self.video_fps <= 0:
            raise ValueError("video_fps must be > 0")
        if not (0.0 <= self.p_next <= 1.0 and 0.0 <= self.p_space <= 1.0):
            raise ValueError("p_next and p_space must be probabilities in [0, 1]")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE where there is no loss
    media: list[int]  # indices into the document's media, in the order of their <image> tokens
    next_image: bool  # True: text attends to the next image; False: to the previous one


@dataclass
class _Marks:
    """A model's ids for what the sampler splices in."""
    markup: list[int]  # an image as the model reads it: [image] alone, or its markup around it
    eoc: int  # the end of a chunk


def pair_example(tokenizer, caption: str, rng: random.Random, config: SamplingConfig,
                 model_config: FlamingoConfig | None = None) -> Example:
    """`<BOS><image>caption<EOC><EOS>` for one image-text pair (BOS only where the tokenizer
    adds one), written as `model_config` writes it (None: the default config). Draws once from
    `rng`: the leading-space coin."""
    marks = _marks(tokenizer, model_config)
    # The space makes the model robust to both ways a prompt may continue after <image>.
    if rng.random() < config.p_space:
        caption = " " + caption
    text = _text_ids(tokenizer, caption)[: config.max_caption_tokens]
    tail = [*text, marks.eoc, *_eos(tokenizer)]
    # A pair has its image before the text, so it needs no p_next coin.
    return _example(tokenizer, marks.markup + tail, [0] * len(marks.markup) + [None] * len(tail), media=[0],
                    next_image=False)


def interleaved_example(tokenizer, segments: list, rng: random.Random, config: SamplingConfig,
                        model_config: FlamingoConfig | None = None) -> Example | None:
    """A random window of an interleaved document. `segments` are text (str) and media
    (int: index into the document's media). Returns None when the window holds no image.
    The window counts every token, an image's markup included. It keeps an image whose whole
    markup it holds, the first max_images of them, and drops the others' markup tokens (an image
    cut at an edge goes), so no markup is left half or without its image. Draws twice from
    `rng`, always in this order: the p_next coin, then the window start."""
    marks = _marks(tokenizer, model_config)
    next_image = rng.random() < config.p_next
    body, owners, doc_media = _document(tokenizer, segments, marks)

    # One draw even when the document fits, so every document consumes the same draws.
    start = int(rng.random() * (max(len(body) - config.window, 0) + 1))
    ids, owners = body[start : start + config.window], owners[start : start + config.window]
    # An image is in the window with its whole markup or not at all; the first max_images are kept.
    counts = Counter(owner for owner in owners if owner is not None)
    held = [owner for owner, count in counts.items() if count == len(marks.markup)][: config.max_images]
    if not held:
        return None
    kept = [i for i, owner in enumerate(owners) if owner is None or owner in held]
    return _example(tokenizer, [ids[i] for i in kept], [owners[i] for i in kept], [doc_media[o] for o in held],
                    next_image)


def document_ids(tokenizer, segments: list, model_config: FlamingoConfig | None = None) -> tuple[list[int], list[int]]:
    """The whole document's tokens (no BOS) and the medium of each <image>, in order:
    EOC goes before each image (none at the very start) and at the end, then EOS."""
    ids, _, media = _document(tokenizer, segments, _marks(tokenizer, model_config))
    return ids, media


def _document(tokenizer, segments: list, marks: _Marks) -> tuple[list[int], list[int | None], list[int]]:
    """document_ids, plus the owner of each token: the number of the image (0, 1, ... in the
    document) whose markup it is, None for text, EOC and EOS."""
    ids, owners, media = [], [], []

    def add(tokens: list[int], owner: int | None = None) -> None:
        ids.extend(tokens)
        owners.extend([owner] * len(tokens))

    for segment in segments:
        if isinstance(segment, str):
            add(_text_ids(tokenizer, segment))
        elif isinstance(segment, int) and not isinstance(segment, bool):
            # EOC closes the chunk before the image; an image opening the document closes nothing.
            # So images are never adjacent here, and markup is never shared between two.
            add([marks.eoc] if ids else [])
            add(marks.markup, owner=len(media))
            media.append(segment)
        else:
            raise TypeError(f"a document segment is text (str) or a media index (int), got {type(segment).__name__}")
    add([marks.eoc, *_eos(tokenizer)])
    return ids, owners, media


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pads examples to the longest: input_ids, attention_mask and labels (B, T) long,
    next_image (B,) bool, media the examples' lists as they are."""
    length = max(len(e.input_ids) for e in examples)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)

    return {
        "input_ids": pad([e.input_ids for e in examples], pad_id),
        "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
        "labels": pad([e.labels for e in examples], IGNORE),
        "next_image": torch.tensor([e.next_image for e in examples], dtype=torch.bool),
        "media": [e.media for e in examples],
    }


def _example(tokenizer, ids: list[int], owners: list[int | None], media: list[int], next_image: bool) -> Example:
    """Prepends BOS where the tokenizer adds one and labels the sequence: no loss on BOS
    (nothing predicts it) or on an image's tokens, <image> and its markup (the model is handed
    images, it does not write them); text, EOC (the model must learn to end chunks) and EOS
    keep theirs."""
    labels = [token if owner is None else IGNORE for token, owner in zip(ids, owners)]
    if _adds_bos(tokenizer):
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE, *labels]
    return Example(input_ids=ids, labels=labels, media=media, next_image=next_image)


def _marks(tokenizer, model_config: FlamingoConfig | None) -> _Marks:
    config = model_config or FlamingoConfig()
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, config.end_of_chunk_token])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        # Not a bad sample (those are skipped): every sample would fail alike, so the run stops.
        raise ConfigError(f"the tokenizer lacks {IMAGE_TOKEN} or {config.end_of_chunk_token}; build the Flamingo "
                         "model first, and sample with its config")
    # The markup is tokenized as inference tokenizes a prompt's <image>: it is ours, not the document's text.
    markup = tokenizer(config.model_text(IMAGE_TOKEN), add_special_tokens=False).input_ids
    return _Marks(markup=markup, eoc=ids[1])


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _adds_bos(tokenizer) -> bool:
    # Asked of the tokenizer itself, since whether it adds BOS is per family (Llama does, GPT-2 not).
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]
