"""Close-ended scoring: rank candidate answers to a prompt by their log-likelihood.

The prompt (with its images) is the expensive part and is the same for every
candidate, so it runs through the model once; each candidate is then scored as a
continuation of that cached prefix, a chunk of candidates per batched forward.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .generation import check_context, check_prompt_record

NORMALIZATIONS = ("sum", "mean")
CONTINUATION = " {candidate}<|endofchunk|>"


@torch.no_grad()
def score_candidates(model, prompt_ids: torch.Tensor, visual: torch.Tensor | None, candidates: list[str], *,
                     normalize: str = "sum", batch_size: int = 32, continuation: str = CONTINUATION,
                     name: str = "<prompt>") -> list[float]:
    """Log-likelihood of each candidate as the continuation of one prompt.

    prompt_ids (1, T); visual (1, m, l, d) or None. Each candidate is tokenized as
    `continuation.format(candidate=c)`, so by default its closing <|endofchunk|> is
    scored too: that is what tells "red" from a prefix of "red circle".
    normalize: "sum" (total log-likelihood) or "mean" (per candidate token). A prompt whose
    longest candidate would run past the LM's context is an error naming it (`name`).
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be one prompt of shape (1, T), got {tuple(prompt_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    token_ids = [candidate_ids(model.tokenizer, continuation, c) for c in candidates]
    check_context(model, name, prompt_ids.shape[1], max(map(len, token_ids), default=0), "its longest candidate takes")

    prefix = model(prompt_ids, visual, use_cache=True)
    prompt = _Prompt(
        cache=prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values,  # renamed in transformers 5
        first=prefix.logits[0, -1].float().log_softmax(-1),
        images=(prompt_ids == model.image_token_id).sum(1),
        visual=visual,
    )
    # Chunks of candidates of similar length waste little compute on padding.
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    totals = [0.0] * len(token_ids)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        for i, total in zip(rows, _chunk_log_likelihoods(model, prompt, [token_ids[i] for i in rows])):
            totals[i] = total
    if normalize == "mean":
        return [total / len(ids) for total, ids in zip(totals, token_ids)]
    return totals


def score_record(model, record: dict, media, candidates: list[str], *, continuation: str = CONTINUATION,
                 normalize: str = "sum", batch_size: int = 32, device: str = "cpu",
                 dtype: torch.dtype | None = None) -> dict:
    """The `score` stage for one prompt record: the record plus `scores` {candidate: log-likelihood}
    and `prediction` (the best)."""
    text, entries = check_prompt_record(record)
    ids = model.tokenizer(text, return_tensors="pt").input_ids.to(device)
    visual = media.visuals(entries).unsqueeze(0) if entries else None
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype is not None):
        values = score_candidates(model, ids, visual, list(candidates), normalize=normalize,
                                  batch_size=batch_size, continuation=continuation,
                                  name=record.get("id", "<record>"))
    scores = dict(zip(candidates, values))
    return {**record, "scores": scores, "prediction": rank(scores)}


def score_records(model, records: Iterable[dict], media, *, candidates: list[str] | None = None,
                  **options) -> Iterator[dict]:
    """The `score` stage: each prompt record scored against `candidates` if given, else its own
    `candidates` field, else its template's; a template's continuation replaces the default.
    options: those of score_record (normalize, batch_size, device, dtype)."""
    from ..formats.artifacts import ArtifactError
    from .prompting import load_template

    templates = {}
    for record in records:
        name = record.get("template")
        if name and name not in templates:
            templates[name] = load_template(name)
        template = templates.get(name)
        choices = candidates or record.get("candidates") or (template.candidates if template else None)
        if not choices:
            raise ArtifactError(f"{record.get('id', '<record>')}: no candidates (use --candidates FILE "
                                "or a 'candidates' field)")
        extra = {"continuation": template.continuation} if template else {}
        yield score_record(model, record, media, list(choices), **{**options, **extra})


def rank(scores: dict[str, float]) -> str:
    """The best-scoring candidate; on a tie the first in the dict's (candidate) order."""
    return max(scores, key=scores.__getitem__)  # max keeps the first of equal maxima


def candidate_ids(tokenizer, continuation: str, candidate: str) -> list[int]:
    """Token ids of one candidate's continuation, without BOS/EOS: it continues the prompt."""
    ids = tokenizer(continuation.format(candidate=candidate), add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"candidate {candidate!r} has no tokens with continuation {continuation!r}")
    return ids


@dataclass
class _Prompt:
    """What every chunk reuses from the single prompt forward."""
    cache: object  # KV cache of the prompt, batch 1; never mutated
    first: torch.Tensor  # (V,) log-probs of the token after the prompt, i.e. of each candidate's first token
    images: torch.Tensor  # (1,) <image> tokens in the prompt, so phi continues from the right image
    visual: torch.Tensor | None


def _chunk_log_likelihoods(model, prompt: _Prompt, chunk: list[list[int]]) -> list[float]:
    """Summed log-probs of each candidate's tokens, one forward for the whole chunk."""
    k = len(chunk)
    ids, valid = _right_pad(chunk, model.pad_token_id, prompt.first.device)
    total = prompt.first[ids[:, 0]]
    if ids.shape[1] > 1:
        # The last token of a candidate predicts nothing we score, so it is not run.
        inputs, mask = ids[:, :-1], valid[:, :-1].long()
        cache = prompt.cache
        out = model(
            inputs,
            None if prompt.visual is None else prompt.visual.expand(k, -1, -1, -1),
            attention_mask=torch.cat([mask.new_ones(k, cache.get_seq_length()), mask], dim=1),
            images_before=prompt.images.expand(k),
            cache=_repeat_cache(cache, k),
            use_cache=True,  # as in incremental decoding: the chunk continues the cached prompt
        )
        # Position j of the chunk predicts candidate token j + 1.
        logp = out.logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        total = total + torch.where(valid[:, 1:], logp, 0.0).sum(1)
    return total.tolist()


def _repeat_cache(cache, k: int):
    """The prompt's cache repeated k times along the batch: a copy, as the forward appends to
    it in place and later chunks need the prompt's cache as it was."""
    chunk_cache = copy.deepcopy(cache)
    chunk_cache.batch_repeat_interleave(k)
    return chunk_cache


def _right_pad(chunk: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, L) ids padded on the right, and which of them are real tokens. Right padding keeps
    every candidate's positions contiguous with the prompt's."""
    length = max(len(ids) for ids in chunk)
    ids = torch.tensor([tokens + [pad_id] * (length - len(tokens)) for tokens in chunk], device=device)
    valid = torch.tensor([[True] * len(tokens) + [False] * (length - len(tokens)) for tokens in chunk], device=device)
    return ids, valid
