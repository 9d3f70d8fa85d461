"""The LM states of prompts' shared contexts, run once and reused by every prompt that has them.

A token's keys and values in the frozen LM depend only on the tokens before it and on the
images those tokens cross-attend to (their own <image>s: causal self-attention, per-image
cross-attention). In few-shot evaluation every prompt is a context (the demonstrations) and a
query that begins at the prompt's last <image>; with fixed demonstrations the contexts are the
same, so they run once and each query runs only its own tokens and image.

A prompt's states are always computed the same way, in two forwards: its context alone, then
its query continuing from the context's states. So they are the same bits whether the context
came from the cache, from another process (a sharded run) or was run just now: what a run
outputs does not depend on which prompts it saw before. Contexts are keyed by their token ids,
with an <image> keyed by its media entry; the cache is bounded in bytes and evicts the least
recently used context first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

State = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values (1, heads, tokens, head_dim)


def as_cache(states: State):
    """A transformers DynamicCache holding `states` as they are (no copy): a forward appends to
    it by concatenation, which leaves these tensors untouched."""
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[..., :0, :], v[..., :0, :]) for k, v in states])
    for layer, (k, v) in zip(cache.layers, states):
        layer.keys, layer.values = k, v
    return cache


def cache_states(cache) -> State:
    return [(layer.keys, layer.values) for layer in cache.layers]


def token_keys(ids: list[int], media: list[str], image_token_id: int) -> list:
    """What identifies each token's states: its id, or for an <image> its media entry."""
    images = iter(media)
    return [("image", next(images)) if t == image_token_id else t for t in ids]


class PrefixCache:
    """Context reuse for one model within one run, keeping at most `max_bytes` of states."""

    def __init__(self, model, max_bytes: int = 2 << 30):
        self.model = model
        self.max_bytes = max_bytes
        self.contexts: OrderedDict[tuple, State] = OrderedDict()  # least recently used first
        self.bytes = 0  # held
        self.hits = 0  # tokens whose states came from the cache
        self.misses = 0  # tokens run

    @torch.no_grad()
    def run(self, ids: list[int], media: list[str], visual: torch.Tensor | None, upto: int, *,
            logits: bool = False):
        """The states of ids[:upto] (one prompt; visual (1, m, l, d) its media) and, with `logits`,
        the logits at position upto - 1 (else None): the context's states from the cache (or run
        and kept), then the query's tokens run after them."""
        image = self.model.image_token_id
        ids = ids[:upto]
        if not ids:
            return [], None
        cut = context_length(ids, image)
        images = ids[:cut].count(image)
        states = []
        if cut:
            key = tuple(token_keys(ids[:cut], media[:images], image))
            states = self.contexts.get(key)
            if states is None:
                _, states = self._forward(ids[:cut], visual[:, :images] if images else None, 0, [])
                self.misses += cut
                self._keep(key, states)
            else:
                self.contexts.move_to_end(key)
                self.hits += cut
        last, states = self._forward(ids[cut:], visual, images, states)
        self.misses += len(ids) - cut
        return states, last if logits else None

    def _forward(self, ids, visual, images_before, states):
        model = self.model
        device = model.lm.get_input_embeddings().weight.device
        out = model(torch.tensor([ids], device=device), visual, images_before=torch.tensor([images_before]),
                    cache=as_cache(states) if states else None, use_cache=True)
        return out.logits[0, -1], cache_states(out.cache if hasattr(out, "cache") else out.past_key_values)

    def _keep(self, key: tuple, states: State) -> None:
        # Copies: a layer's keys may be a view of a larger projection, which should not stay alive.
        states = [(k.clone(), v.clone()) for k, v in states]
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in states)
        if size > self.max_bytes:
            return
        self.contexts[key] = states
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self.contexts.popitem(last=False)
            self.bytes -= sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in evicted)


def context_length(ids: list[int], image_token_id: int) -> int:
    """Where a prompt's query begins: at its last <image> (0 when it has none: all query)."""
    return max((i for i, t in enumerate(ids) if t == image_token_id), default=0)


def shared_context(prompts: list[tuple[list[int], list[str]]], image_token_id: int) -> int:
    """How many of these prompts' (ids, media) tokens are in a context an earlier prompt of the
    list has too. Only the list counts, not what a cache holds, so that whether a batch runs from
    its contexts (and so its outputs' last bits) depends on the batch alone."""
    seen, total = set(), 0
    for ids, media in prompts:
        cut = context_length(ids, image_token_id)
        key = tuple(token_keys(ids[:cut], media, image_token_id))
        total += cut if key in seen else 0
        seen.add(key)
    return total


def stack_states(rows: list[State], length: int) -> State:
    """One state per prompt -> the batch's, each row left-padded with zeros to `length` tokens
    (the padding is masked by the caller). Rows may be empty (a prompt with nothing to cache)."""
    shaped = next(states for states in rows if states)
    stacked = []
    for layer, pair in enumerate(shaped):
        k, v = (t.new_zeros(len(rows), *t.shape[1:-2], length, t.shape[-1]) for t in pair)
        for i, states in enumerate(rows):
            if states:
                n = states[layer][0].shape[-2]
                k[i, ..., length - n:, :], v[i, ..., length - n:, :] = states[layer][0][0], states[layer][1][0]
        stacked.append((k, v))
    return stacked
