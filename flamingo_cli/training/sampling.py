"""Training documents -> token sequences, sampled as the paper samples them.

    M3W (interleaved):  ...text<EOC><image>text<EOC><image>text<EOC><EOS>
                        a random window of 256 tokens, its first 5 images kept
    pairs:              <BOS><image>caption<EOC><EOS>, a leading space on the caption w.p. 1/2

<image> and <|endofchunk|> (EOC) are spliced in by id, never produced by tokenizing text:
text is tokenized with the special tokens split, so a web page that literally contains
"<image>" can neither inject an image slot nor desynchronise `media` from the sequence.

Randomness comes only from the `random.Random` passed in, and each function draws a fixed
number of times (pairs: one; documents: two), so the trainer's per-sample seeded generator
reproduces the same samples bitwise when training resumes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..model.config import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

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


def pair_example(tokenizer, caption: str, rng: random.Random, config: SamplingConfig) -> Example:
    """`<BOS><image>caption<EOC><EOS>` for one image-text pair (BOS only where the tokenizer
    adds one). Draws once from `rng`: the leading-space coin."""
    image, eoc = _flamingo_ids(tokenizer)
    # The space makes the model robust to both ways a prompt may continue after <image>.
    if rng.random() < config.p_space:
        caption = " " + caption
    text = _text_ids(tokenizer, caption)[: config.max_caption_tokens]
    # A pair has its image before the text, so it needs no p_next coin.
    return _example(tokenizer, [image, *text, eoc, *_eos(tokenizer)], image, media=[0], next_image=False)


def interleaved_example(tokenizer, segments: list, rng: random.Random, config: SamplingConfig) -> Example | None:
    """A random window of an interleaved document. `segments` are text (str) and media
    (int: index into the document's media). Returns None when the window holds no image.
    Draws twice from `rng`, always in this order: the p_next coin, then the window start."""
    image, _ = _flamingo_ids(tokenizer)
    next_image = rng.random() < config.p_next
    body, doc_media = document_ids(tokenizer, segments)

    # One draw even when the document fits, so every document consumes the same draws.
    start = int(rng.random() * (max(len(body) - config.window, 0) + 1))
    window = body[start : start + config.window]
    window_media = doc_media[body[:start].count(image) :]

    ids, media = [], []
    for token in window:
        if token == image:
            if len(media) == config.max_images:
                continue  # only the first max_images images of a window are kept
            media.append(window_media[len(media)])
        ids.append(token)
    if not media:
        return None
    return _example(tokenizer, ids, image, media, next_image)


def document_ids(tokenizer, segments: list) -> tuple[list[int], list[int]]:
    """The whole document's tokens (no BOS) and the medium of each <image>, in order:
    EOC goes before each image (none at the very start) and at the end, then EOS."""
    image, eoc = _flamingo_ids(tokenizer)
    ids, media = [], []
    for segment in segments:
        if isinstance(segment, str):
            ids += _text_ids(tokenizer, segment)
        elif isinstance(segment, int) and not isinstance(segment, bool):
            # EOC closes the chunk before the image; an image opening the document closes nothing.
            ids += [eoc, image] if ids else [image]
            media.append(segment)
        else:
            raise TypeError(f"a document segment is text (str) or a media index (int), got {type(segment).__name__}")
    return ids + [eoc, *_eos(tokenizer)], media


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


def _example(tokenizer, ids: list[int], image: int, media: list[int], next_image: bool) -> Example:
    """Prepends BOS where the tokenizer adds one and labels the sequence: no loss on BOS
    (nothing predicts it) or on <image> (the model is handed images, it does not write them);
    text, EOC (the model must learn to end chunks) and EOS keep theirs."""
    labels = [IGNORE if token == image else token for token in ids]
    if _adds_bos(tokenizer):
        ids, labels = [tokenizer.bos_token_id, *ids], [IGNORE, *labels]
    return Example(input_ids=ids, labels=labels, media=media, next_image=next_image)


def _flamingo_ids(tokenizer) -> tuple[int, int]:
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, END_OF_CHUNK_TOKEN])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(f"the tokenizer lacks {IMAGE_TOKEN} or {END_OF_CHUNK_TOKEN}; build the Flamingo model first")
    return ids[0], ids[1]


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _adds_bos(tokenizer) -> bool:
    # Asked of the tokenizer itself, since whether it adds BOS is per family (Llama does, GPT-2 not).
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]
