"""The `generate` stage as a library function: prompt records in, records with `output` out."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch

from ..formats.artifacts import ArtifactError
from ..model.config import IMAGE_TOKEN
from .media import MediaResolver, pad_media
from .prefix_cache import as_cache, shared_context, stack_states


def check_prompt_record(record: dict) -> tuple[str, list[str]]:
    """A prompt record's text and media, with as many media entries as <image> markers."""
    rid = record.get("id", "<record>")
    prompt, media = record.get("prompt"), record.get("media", [])
    if not isinstance(prompt, str):
        raise ArtifactError(f"{rid}: no 'prompt' text (build prompts with flamingo prompt, or pass --shots)")
    if not isinstance(media, list) or not all(isinstance(m, str) for m in media):
        raise ArtifactError(f"{rid}: 'media' must be a list of references or image paths")
    if prompt.count(IMAGE_TOKEN) != len(media):
        raise ArtifactError(f"{rid}: prompt has {prompt.count(IMAGE_TOKEN)} {IMAGE_TOKEN} marker(s) "
                            f"but media lists {len(media)}")
    return prompt, media


def tokenize_prompts(model, texts: list[str], **options):
    """The one place prompt text becomes tokens: written with our markers (<image>, <|endofchunk|>),
    it is tokenized as the model reads them (config.model_text: IDEFICS's image markup, say).
    options: the tokenizer's."""
    return model.tokenizer([model.config.model_text(text) for text in texts], **options)


def check_context(model, name: str, prompt_tokens: int, more: int, what: str) -> None:
    """The prompt and what follows it must fit the LM's context: past it, positions the LM was
    never trained on give garbage, with only a transformers warning to show for it."""
    limit = model.context_length
    if limit is not None and prompt_tokens + more > limit:
        raise ArtifactError(f"{name}: the prompt is {prompt_tokens} tokens and {what} "
                            f"{more} more: {prompt_tokens + more} is over the LM's context of {limit} tokens "
                            "(use fewer shots)")


def generate_records(model, records: Iterable[dict], media: MediaResolver, *, num_beams: int = 3,
                     max_new_tokens: int = 20, length_penalty: float = 1.0, device: str = "cpu",
                     prefix_cache=None) -> list[dict]:
    """One batch: left-padded prompts, each with its own media, decoded together. With a
    PrefixCache a prompt's context (its tokens before its last <image>) is run once per run,
    so prompts with the same demonstrations compute only their queries."""
    records = list(records)
    tokenizer = model.tokenizer
    texts, entries, visuals = [], [], []
    for record in records:
        prompt, media_entries = check_prompt_record(record)
        texts.append(prompt)
        entries.append(media_entries)
        visuals.append(media.visuals(media_entries))
    tokenizer.padding_side = "left"
    batch = tokenize_prompts(model, texts, return_tensors="pt", padding=True).to(device)
    for record, length in zip(records, batch.attention_mask.sum(1).tolist()):
        check_context(model, record.get("id", "<record>"), length, max_new_tokens, "--max-new-tokens allows")
    visual = pad_media(visuals)
    cache = None if prefix_cache is None else _cached_prompts(prefix_cache, batch, entries, visuals)
    new = model.generate(batch.input_ids, visual, attention_mask=batch.attention_mask, num_beams=num_beams,
                         max_new_tokens=max_new_tokens, length_penalty=length_penalty, cache=cache)
    outputs = tokenizer.batch_decode(new, skip_special_tokens=True, **decode_options(tokenizer))
    return [{**record, "output": text.strip()} for record, text in zip(records, outputs)]


def _cached_prompts(prefix_cache, batch, entries: list[list[str]], visuals: list[torch.Tensor]):
    """A cache holding all but the last token of every left-padded prompt of the batch, each
    prompt's states from the prefix cache. None (the batch is then prefilled as one) when no
    prompt has more than one token, or when less than half the tokens of several prompts would be
    shared within the batch: prompts run one by one cost more than in a batch."""
    n = batch.input_ids.shape[1]
    prompts = [(ids[mask.bool()].tolist()[:-1], media_entries)
               for ids, mask, media_entries in zip(batch.input_ids, batch.attention_mask, entries)]
    if len(prompts) > 1 and 2 * shared_context(prompts, prefix_cache.model.image_token_id) < sum(
            len(ids) for ids, _ in prompts):
        return None
    rows = [prefix_cache.run(ids, media_entries, visual.unsqueeze(0) if len(visual) else None, len(ids))[0]
            for (ids, media_entries), visual in zip(prompts, visuals)]
    return as_cache(stack_states(rows, n - 1)) if any(rows) else None


def decode_options(tokenizer) -> dict:
    """transformers 5 skips the space clean-up for BPE tokenizers (it corrupts them), with a
    warning each time a tokenizer's config asks for it, as many hub tokenizers' do: for BPE,
    ask for what is done anyway."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    if backend is not None and type(backend.model).__name__ == "BPE" and not forced:
        return {"clean_up_tokenization_spaces": False}
    return {}


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Lists of `size` items (the last may be shorter), taken from `items` as they come."""
    items = iter(items)
    while batch := list(itertools.islice(items, size)):
        yield batch
