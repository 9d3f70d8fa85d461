"""Close-ended scoring: rank candidate answers to a prompt by their log-likelihood.

The prompt (with its images) is the expensive part and is the same for every
candidate, so it runs through the model once; each candidate is then scored as a
continuation of that cached prefix, a chunk of candidates per batched forward.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from .generation import check_context, check_prompt_record, tokenize_prompts
from .media import pad_media
from .prefix_cache import PrefixCache, as_cache, stack_states

NORMALIZATIONS = ("sum", "mean")
CONTINUATION = " {candidate}<|endofchunk|>"


@torch.no_grad()
def score_candidates(model, prompt_ids: torch.Tensor, visual: torch.Tensor | None, candidates: list[str], *,
                     normalize: str = "sum", batch_size: int = 32, continuation: str = CONTINUATION,
                     name: str = "<prompt>", prefix_cache=None, media: list[str] | None = None) -> list[float]:
    """Log-likelihood of each candidate as the continuation of one prompt.

    prompt_ids (1, T); visual (1, m, l, d) or None. Each candidate is tokenized as
    `continuation.format(candidate=c)`, so by default its closing <|endofchunk|> (the model's
    end-of-chunk token) is scored too: that is what tells "red" from a prefix of "red circle".
    normalize: "sum" (total log-likelihood) or "mean" (per candidate token). A prompt whose
    longest candidate would run past the LM's context is an error naming it (`name`).
    With a PrefixCache (and the prompt's `media` entries, which identify its images) a context
    (the tokens before the prompt's last <image>) already run is not run again; the scores are
    the same bits either way.
    """
    _normalized([], [], normalize)
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must be one prompt of shape (1, T), got {tuple(prompt_ids.shape)}")
    token_ids = _candidate_tokens(model, candidates, continuation)
    check_context(model, name, prompt_ids.shape[1], max(map(len, token_ids), default=0), "its longest candidate takes")
    prompt = _run_prompt(model, prompt_ids[0].tolist(), visual, prefix_cache, media)
    return _normalized(_score_prompts(model, [prompt], token_ids, batch_size)[0], token_ids, normalize)


def score_record(model, record: dict, media, candidates: list[str], **options) -> dict:
    """The `score` stage for one prompt record: the record plus `scores` {candidate: log-likelihood}
    and `prediction` (the best). options: those of score_records."""
    return next(score_records(model, [record], media, candidates=candidates, **options))


def score_records(model, records: Iterable[dict], media, *, candidates: list[str] | None = None,
                  continuation: str | None = None, normalize: str = "sum", batch_size: int = 32,
                  prefix_cache=None) -> Iterator[dict]:
    """The `score` stage: each prompt record scored against `candidates` if given, else its own
    `candidates` field, else its template's; a template's continuation replaces the default.

    Consecutive records with the same candidates are scored together (score_groups), batch_size
    (prompt, candidate) rows per forward; each prompt runs once (with a PrefixCache, only its query
    when its context ran before). Records come out in input order, a group at a time."""
    _normalized([], [], normalize)
    for group, (choices, cont) in _keyed_groups(records, candidates, continuation, batch_size):
        yield from _score_group(model, group, media, choices, cont, normalize, batch_size, prefix_cache)


def score_groups(records: Iterable[dict], *, candidates: list[str] | None = None, continuation: str | None = None,
                 batch_size: int = 32) -> Iterator[list[dict]]:
    """The groups score_records scores together, as they fill: runs of consecutive records with
    the same candidates and continuation, cut when they hold batch_size (prompt, candidate) pairs.
    A group given back to score_records is scored as one, exactly as within the whole input."""
    return (group for group, _ in _keyed_groups(records, candidates, continuation, batch_size))


def _keyed_groups(records, candidates, continuation, batch_size):
    from ..formats.artifacts import ArtifactError
    from .prompting import load_template

    templates = {}

    def task(record):
        name = record.get("template")
        if name and name not in templates:
            templates[name] = load_template(name)
        template = templates.get(name)
        choices = candidates or record.get("candidates") or (template.candidates if template else None)
        if not choices:
            raise ArtifactError(f"{record.get('id', '<record>')}: no candidates (use --candidates FILE "
                                "or a 'candidates' field)")
        return tuple(choices), continuation or (template.continuation if template else CONTINUATION)

    group, key = [], None
    for record in records:
        this = task(record)
        if group and this != key:
            yield group, key
            group = []
        group.append(record)
        key = this
        if len(group) * len(key[0]) >= batch_size:  # full: answer now, not when the next record arrives
            yield group, key
            group = []
    if group:
        yield group, key


def _score_group(model, records, media, candidates, continuation, normalize, batch_size, prefix_cache) -> list[dict]:
    token_ids = _candidate_tokens(model, candidates, continuation)
    longest = max(map(len, token_ids))
    prompts = []
    with torch.no_grad():
        for record in records:
            text, entries = check_prompt_record(record)
            ids = tokenize_prompts(model, [text], bos=record.get("bos", True)).input_ids[0]
            check_context(model, record.get("id", "<record>"), len(ids), longest, "its longest candidate takes")
            visual = media.visuals(entries).unsqueeze(0) if entries else None
            prompts.append(_run_prompt(model, ids, visual, prefix_cache, entries))
        totals = _score_prompts(model, prompts, token_ids, batch_size)
    out = []
    for record, values in zip(records, totals):
        scores = dict(zip(candidates, _normalized(values, token_ids, normalize)))
        out.append({**record, "scores": scores, "prediction": rank(scores)})
    return out


def rank(scores: dict[str, float]) -> str:
    """The best-scoring candidate; on a tie the first in the dict's (candidate) order."""
    return max(scores, key=scores.__getitem__)  # max keeps the first of equal maxima


def candidate_ids(model, continuation: str, candidate: str) -> list[int]:
    """Token ids of one candidate's continuation, without BOS/EOS: it continues the prompt."""
    ids = tokenize_prompts(model, [continuation.format(candidate=candidate)], bos=False).input_ids[0]
    if not ids:
        raise ValueError(f"candidate {candidate!r} has no tokens with continuation {continuation!r}")
    return ids


@dataclass
class _Prompt:
    """What every chunk reuses from the prompt's single run."""
    states: list  # per layer: keys, values (1, heads, length, head_dim); never mutated
    first: torch.Tensor  # (V,) log-probs of the token after the prompt, i.e. of each candidate's first token
    images: int  # what phi continues from (_images_before), so candidates attend to the right image
    visual: torch.Tensor | None  # (1, m, l, d)
    length: int


def _run_prompt(model, ids: list[int], visual, prefix_cache, media) -> _Prompt:
    if prefix_cache is None:
        prefix_cache = PrefixCache(model, max_bytes=0)  # runs the prompt as a cache would, keeps nothing
    if media is None:
        media = [f"#{i}" for i in range(ids.count(model.image_token_id))]
    states, logits = prefix_cache.run(ids, media, visual, len(ids), logits=True)
    return _Prompt(states, logits.float().log_softmax(-1), _images_before(model, ids), visual, len(ids))


def _images_before(model, ids: list[int]) -> int:
    """The prompt's <image> count; 0 where the model resets after end-of-sequence and the prompt
    ends after one with no <image> since: its candidates (which hold no <image>) attend to none."""
    image, reset = model.image_token_id, model.reset_token_id
    last = {t: i for i, t in enumerate(ids) if t in (image, reset)}  # each token's last position
    if reset is not None and last.get(reset, -1) > last.get(image, -1):
        return 0
    return ids.count(image)


def _candidate_tokens(model, candidates, continuation) -> list[list[int]]:
    return [candidate_ids(model, continuation, c) for c in candidates]


def _normalized(totals: list[float], token_ids: list[list[int]], normalize: str) -> list[float]:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if normalize == "mean":
        return [total / len(ids) for total, ids in zip(totals, token_ids)]
    return totals


def _score_prompts(model, prompts: list[_Prompt], token_ids: list[list[int]], batch_size: int) -> list[list[float]]:
    """Summed log-probs of every candidate after every prompt: [prompt][candidate].

    The prompts' states are stacked once, left-padded; each forward then runs a chunk of
    candidates against all of them. Under SDPA attention a chunk is one sequence per prompt,
    its candidates laid end to end, each attending to the prompt and to its own earlier tokens
    (a block-causal mask), so the prompt's states are read, never copied per candidate. Other
    attention implementations take one row per (prompt, candidate) instead."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = len(prompts)
    device = prompts[0].first.device
    totals = torch.stack([p.first for p in prompts])[:, [ids[0] for ids in token_ids]]  # (g, n)
    stack = _Stack(prompts)
    per_chunk = max(1, batch_size // g)
    # The flat layout puts a chunk's candidates in one sequence: a reset token in one would cut the
    # candidates after it off their image, so candidates holding one go one row each.
    resets = model.reset_token_id is not None and any(model.reset_token_id in ids[:-1] for ids in token_ids)
    run = _flat_chunk if model.lm.config._attn_implementation == "sdpa" and not resets else _row_chunk
    # Only candidates of 2+ tokens need a forward: the last token of each predicts nothing we score.
    # In token order, candidates that share a prefix fall in one chunk, where the trie runs it once.
    todo = sorted((j for j, ids in enumerate(token_ids) if len(ids) > 1), key=lambda j: token_ids[j])
    visual_kv = {}  # the chunks attend to the same images: each is projected once, by the first chunk
    for start in range(0, len(todo), per_chunk):
        chunk = todo[start:start + per_chunk]
        totals[:, chunk] += run(model, stack, [token_ids[j] for j in chunk], device, visual_kv)
    return totals.tolist()


class _Stack:
    """The group's prompt states left-padded to one length, with their padding mask."""

    def __init__(self, prompts: list[_Prompt]):
        self.prompts = prompts
        self.length = max(p.length for p in prompts)
        # One prompt's states are used as they are: no copy.
        self.states = prompts[0].states if len(prompts) == 1 else stack_states([p.states for p in prompts],
                                                                                self.length)
        device = prompts[0].first.device
        self.valid = torch.stack([torch.arange(self.length, device=device) >= self.length - p.length
                                  for p in prompts])  # (g, P)
        self.lengths = torch.tensor([p.length for p in prompts], device=device)
        self.images = torch.tensor([p.images for p in prompts], device=device)
        visuals = [p.visual[0] for p in prompts if p.visual is not None]
        if not visuals:
            self.visual = None
        elif len(prompts) == 1:
            self.visual = prompts[0].visual
        else:
            none = visuals[0].new_zeros(0, *visuals[0].shape[1:])
            self.visual = pad_media([none if p.visual is None else p.visual[0] for p in prompts])


def _flat_chunk(model, stack: _Stack, chunk: list[list[int]], device, visual_kv: dict) -> torch.Tensor:
    """(g, len(chunk)) summed log-probs of candidate tokens 2.. of each candidate after each prompt.

    The chunk's candidates are one sequence per prompt laid out as a trie: a prefix that several
    candidates share ("a red" of "a red circle" and "a red square") is one position, attending to
    the prompt and to its own earlier tokens (its ancestors), and its log-probs serve them all."""
    g, P = len(stack.prompts), stack.length
    nodes: dict[tuple[int, ...], int] = {}  # each candidate's input prefix -> its position
    tokens, parents, depth = [], [], []
    for ids in chunk:
        for d in range(len(ids) - 1):
            key = tuple(ids[:d + 1])
            if key not in nodes:
                nodes[key] = len(tokens)
                tokens.append(ids[d])
                parents.append(nodes[key[:-1]] if d else -1)
                depth.append(d)
    q = len(tokens)
    own = torch.zeros(q, q, dtype=torch.bool)
    for i, parent in enumerate(parents):  # parents come first: a prefix is added before its extensions
        if parent >= 0:
            own[i] = own[parent]
        own[i, i] = True
    own = own.to(device)
    at = torch.tensor([nodes[tuple(ids[:d + 1])] for ids in chunk for d in range(len(ids) - 1)], device=device)
    targets = torch.tensor([t for ids in chunk for t in ids[1:]], device=device)
    owner = torch.tensor([j for j, ids in enumerate(chunk) for _ in ids[:-1]], device=device)
    mask = torch.cat([stack.valid[:, None, :].expand(g, q, P), own.expand(g, q, q)], dim=-1)[:, None]
    out = model(torch.tensor([tokens], device=device).expand(g, q), stack.visual, attention_mask=mask,
                position_ids=stack.lengths[:, None] + torch.tensor(depth, device=device),
                images_before=stack.images, cache=as_cache(stack.states), use_cache=True, visual_kv=visual_kv)
    logp = out.logits.float().log_softmax(-1)[:, at, targets]  # (g, tokens scored)
    return torch.zeros(g, len(chunk), device=device).index_add_(1, owner, logp)


def _row_chunk(model, stack: _Stack, chunk: list[list[int]], device, visual_kv: dict) -> torch.Tensor:
    """As _flat_chunk, one right-padded row per (prompt, candidate) on a 2D padding mask."""
    g, k = len(stack.prompts), len(chunk)
    ids, valid = _right_pad(chunk, model.pad_token_id, device)
    rows = torch.arange(g, device=device).repeat_interleave(k)
    inputs, mask = ids[:, :-1].repeat(g, 1), valid[:, :-1].repeat(g, 1)
    states = [(key[rows], value[rows]) for key, value in stack.states]  # copies: this path cannot share them
    # Rows of several prompts pick their images afresh (a new tensor per chunk): no K/V to keep.
    visual, kept = (stack.visual, visual_kv) if g == 1 or stack.visual is None else (stack.visual[rows], None)
    out = model(inputs, visual, attention_mask=torch.cat([stack.valid[rows], mask], dim=1).long(),
                position_ids=stack.lengths[rows, None] + torch.arange(inputs.shape[1], device=device),
                images_before=stack.images[rows], cache=as_cache(states), use_cache=True, visual_kv=kept)
    logp = out.logits.float().log_softmax(-1).gather(-1, ids[:, 1:].repeat(g, 1)[..., None]).squeeze(-1)
    return torch.where(valid[:, 1:].repeat(g, 1), logp, 0.0).sum(1).view(g, k)


def _right_pad(chunk: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, L) ids padded on the right, and which of them are real tokens. Right padding keeps
    every candidate's positions contiguous with the prompt's."""
    length = max(len(ids) for ids in chunk)
    ids = torch.tensor([tokens + [pad_id] * (length - len(tokens)) for tokens in chunk], device=device)
    valid = torch.tensor([[True] * len(tokens) + [False] * (length - len(tokens)) for tokens in chunk], device=device)
    return ids, valid
