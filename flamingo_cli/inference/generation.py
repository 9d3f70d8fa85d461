"""The `generate` stage as a library function: prompt records in, records with `output` out."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

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
    if not isinstance(record.get("bos", True), bool):
        raise ArtifactError(f"{rid}: 'bos' must be true or false")
    return prompt, media


def tokenize_prompts(model, texts: list[str], *, bos: bool | list[bool] = True, **options):
    """The one place prompt text becomes tokens: written with our markers (<image>, <|endofchunk|>),
    it is tokenized as the model reads them (config.model_text: IDEFICS's image markup, say).
    bos: whether each text begins with the LM's beginning-of-sequence token (a prompt record's
    `bos`, false where its template says so). options: the tokenizer's."""
    texts = [model.config.model_text(text) for text in texts]
    flags = [bos] * len(texts) if isinstance(bos, bool) else list(bos)
    if len(set(flags)) <= 1:
        return model.tokenizer(texts, add_special_tokens=flags[0] if flags else True, **options)
    # Texts that differ in their BOS are tokenized one by one, then padded together.
    encoded = [model.tokenizer(text, add_special_tokens=flag) for text, flag in zip(texts, flags)]
    return model.tokenizer.pad(encoded, padding=True, return_tensors=options.get("return_tensors"))


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
    batch = tokenize_prompts(model, texts, bos=[r.get("bos", True) for r in records], return_tensors="pt",
                             padding=True).to(device)
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


def stream_record(model, record: dict, media: MediaResolver, *, max_new_tokens: int = 20, device: str = "cpu",
                  prefix_cache=None, stop_at: Sequence[str] = ()) -> Iterator[str]:
    """One prompt record's greedy answer as pieces of text, each given out as soon as the tokens
    produced so far settle it: joined, they are the `output` generate_records gives the record
    with num_beams=1, cut before the first of `stop_at` (cut_text), where decoding stops too.

    The tokens are generate's: the prompt runs once (from the prefix cache as there), then each
    model.generate call continues the same KV cache by one token, the step transformers' own
    loop takes. The text is the growing sequence decoded whole each time (so a word made of
    several tokens, or a character of several bytes, comes out right), less what a later token
    may still change: trailing whitespace, an incomplete character, the start of a stop marker."""
    from transformers import DynamicCache

    prompt, entries = check_prompt_record(record)
    visuals = [media.visuals(entries)]
    batch = tokenize_prompts(model, [prompt], bos=record.get("bos", True), return_tensors="pt").to(device)
    ids = batch.input_ids
    check_context(model, record.get("id", "<record>"), ids.shape[1], max_new_tokens, "--max-new-tokens allows")
    cache = None if prefix_cache is None else _cached_prompts(prefix_cache, batch, [entries], visuals)
    cache = DynamicCache() if cache is None else cache
    visual = pad_media(visuals)
    tokenizer = model.tokenizer
    ends = {tokenizer.convert_tokens_to_ids(model.config.end_of_chunk_token), tokenizer.eos_token_id} - {None}
    new, given = [], ""
    for _ in range(max_new_tokens):
        token = model.generate(ids, visual, num_beams=1, max_new_tokens=1, cache=cache)[:, -1:]
        if int(token) in ends:
            break
        ids = torch.cat([ids, token], dim=1)
        new.append(int(token))
        # A trailing U+FFFD stands for a character whose other bytes are still to come.
        text = tokenizer.decode(new, skip_special_tokens=True, **decode_options(tokenizer)).rstrip("\ufffd")
        done = any(marker and marker in text for marker in stop_at)
        settled = cut_text(text, stop_at) if done else _settled(text, stop_at)
        if settled.startswith(given) and len(settled) > len(given):
            yield settled[len(given):]
            given = settled
        if done:
            return
    final = cut_text(tokenizer.decode(new, skip_special_tokens=True, **decode_options(tokenizer)), stop_at)
    if final.startswith(given) and len(final) > len(given):
        yield final[len(given):]


def _settled(text: str, stop_at: Sequence[str]) -> str:
    """The part of a growing answer's text (stripped) that more tokens will not change."""
    text = text.strip()
    held = max((n for marker in stop_at for n in range(min(len(marker), len(text)), 0, -1)
                if text.endswith(marker[:n])), default=0)
    return text[:len(text) - held].rstrip()


def cut_text(text: str, markers: Sequence[str]) -> str:
    """The text before the first of `markers` (e.g. the model starting a new round), stripped."""
    ends = [i for i in (text.find(m) for m in markers if m) if i >= 0]
    return text[:min(ends, default=len(text))].strip()
