"""The LM states of prompts already run, reused by later prompts that begin the same way.

A token's keys and values in the frozen LM depend only on the tokens before it and on the
images those tokens cross-attend to (their own <image>s: causal self-attention, per-image
cross-attention). So two prompts that share their first tokens and the media of the <image>s
among them share those tokens' states exactly: few-shot evaluation with fixed demonstrations
runs the demonstrations once, then only each query's own tokens and image.

States live in a radix tree whose edges are runs of tokens, keyed by token id, with an
<image> keyed by its media entry instead; each edge holds its tokens' keys and values for
every layer. It is bounded in bytes and evicts the least recently used leaves first.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(eq=False)
class _Node:
    keys: list  # the edge's token keys, from the parent to this node
    states: State | None  # their states; None at the root
    parent: "_Node | None" = None
    children: dict = field(default_factory=dict)  # first key of a child's edge -> child
    used: int = 0


class PrefixCache:
    """Prefix reuse for one model within one run, keeping at most `max_bytes` of states."""

    def __init__(self, model, max_bytes: int = 2 << 30):
        self.model = model
        self.max_bytes = max_bytes
        self.root = _Node([], None)
        self.tokens = 0  # held in the tree
        self.token_bytes = 0  # of one token's states, all layers (known from the first prompt)
        self.clock = 0
        self.hits = 0  # tokens whose states came from the cache
        self.misses = 0  # tokens run

    def run(self, ids: list[int], media: list[str], visual: torch.Tensor | None, upto: int, *,
            logits: bool = False):
        """The states of ids[:upto] (one prompt; visual (1, m, l, d) its media) and, with `logits`,
        the logits at position upto - 1 (else None). Only tokens past the longest cached prefix
        are run (at least the last, for its logits); the prompt's states are then cached."""
        keys = token_keys(ids[:upto], media, self.model.image_token_id)
        path, matched = self._match(keys[:upto - 1] if logits else keys)
        pieces = [node.states for node in path]
        if path and matched < sum(len(node.keys) for node in path):  # the match ends inside the last edge
            cut = matched - sum(len(node.keys) for node in path[:-1])
            pieces[-1] = [(k[..., :cut, :], v[..., :cut, :]) for k, v in pieces[-1]]
        states = _concat(pieces)
        last = None
        self.hits += matched
        if matched < upto:
            last, cache = self._forward(ids, visual, matched, upto, states)
            states = cache_states(cache)
            self.misses += upto - matched
            self._insert(keys, states)
        return states, last

    def reusable(self, prompts: list[tuple[list[int], list[str]]]) -> int:
        """How many of these prompts' tokens (ids, media) run would take from the cache or from
        an earlier prompt of the list: when few, running them batched, uncached, is faster."""
        keys = [token_keys(ids, media, self.model.image_token_id) for ids, media in prompts]
        total = 0
        for i, own in enumerate(keys):
            total += max([self._match(own)[1], *(_common(own, other) for other in keys[:i])])
        return total

    def _forward(self, ids, visual, start, upto, states):
        model = self.model
        images_before = torch.tensor([sum(t == model.image_token_id for t in ids[:start])])
        cache = as_cache(states) if states else None
        device = model.lm.get_input_embeddings().weight.device
        out = model(torch.tensor([ids[start:upto]], device=device), visual, images_before=images_before,
                    cache=cache, use_cache=True)
        return out.logits[0, -1], out.cache if hasattr(out, "cache") else out.past_key_values

    # -- the tree ---------------------------------------------------------------------

    def _match(self, keys: list) -> tuple[list[_Node], int]:
        """The nodes along the longest cached prefix of keys, and its length."""
        node, at, path = self.root, 0, []
        self.clock += 1
        while at < len(keys) and (child := node.children.get(keys[at])) is not None:
            same = _common(child.keys, keys[at:])
            child.used = self.clock
            path.append(child)
            at += same
            if same < len(child.keys):
                break
            node = child
        return path, at

    def _insert(self, keys: list, states: State) -> None:
        self.token_bytes = sum(k[..., :1, :].numel() * k.element_size() * 2 for k, _ in states)
        if self.max_bytes < self.token_bytes:
            return
        node, at = self.root, 0
        while at < len(keys):
            child = node.children.get(keys[at])
            if child is None:
                new = _Node(keys[at:], [(k[..., at:, :].clone(), v[..., at:, :].clone()) for k, v in states],
                            node, used=self.clock)
                node.children[keys[at]] = new
                self.tokens += len(new.keys)
                break
            same = _common(child.keys, keys[at:])
            if same < len(child.keys):
                child = self._split(child, same)
            node, at = child, at + same
        self._evict()

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut child's edge after `at` keys: a new node holding the first part, child the rest."""
        # Copies, not views: an evicted part must free its memory.
        head = _Node(child.keys[:at], [(k[..., :at, :].clone(), v[..., :at, :].clone()) for k, v in child.states],
                     child.parent, used=child.used)
        child.parent.children[head.keys[0]] = head
        child.keys = child.keys[at:]
        child.states = [(k[..., at:, :].clone(), v[..., at:, :].clone()) for k, v in child.states]
        child.parent = head
        head.children[child.keys[0]] = child
        return head

    def _evict(self) -> None:
        while self.tokens * self.token_bytes > self.max_bytes:
            leaf = min(self._leaves(), key=lambda n: n.used)
            del leaf.parent.children[leaf.keys[0]]
            self.tokens -= len(leaf.keys)

    def _leaves(self):
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                yield node


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


def _common(a: list, b: list) -> int:
    """The length of the common prefix of a and b."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _concat(pieces: list[State]) -> State:
    if not pieces:
        return []
    if len(pieces) == 1:
        return pieces[0]
    return [(torch.cat([p[i][0] for p in pieces], dim=-2), torch.cat([p[i][1] for p in pieces], dim=-2))
            for i in range(len(pieces[0]))]
