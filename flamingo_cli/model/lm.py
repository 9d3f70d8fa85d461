"""Adapting a frozen transformers causal LM: its decoder layers, and the new token rows.

Works for any causal LM whose stack of decoder layers can be found: the ModuleList
holding exactly `num_hidden_layers` modules (LLaMA/Mistral/Qwen2 `model.layers`,
GPT-2 `transformer.h`, OPT `model.decoder.layers`, GPT-NeoX `gpt_neox.layers`, ...).
"""
from __future__ import annotations

import torch
from torch import nn

PAD_TOKEN = "<PAD>"


def text_config(lm: nn.Module):
    config = lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# What families call the most positions they take (LLaMA, OPT, ...; GPT-2; MPT; others).
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def context_length(lm: nn.Module) -> int | None:
    config = text_config(lm)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers, found by its length rather than by family-specific names."""
    n = getattr(text_config(lm), "num_hidden_layers", None)
    candidates = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot find the decoder layers of {type(lm).__name__}: expected one ModuleList of "
            f"num_hidden_layers={n} modules, found {len(candidates)}"
        )
    return candidates[0]


def xattn_layer_indices(num_layers: int, every: int, placement: str) -> list[int]:
    """LM layers that get a GATED XATTN-DENSE block in front of them."""
    if placement == "paper":
        return [i for i in range(num_layers) if i % every == 0]
    return [i for i in range(num_layers) if (i + 1) % every == 0]


def add_special_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add Flamingo's tokens to the tokenizer where missing; returns their ids, which must
    be contiguous (they get trainable rows). <PAD> in the list becomes the pad token."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if PAD_TOKEN in tokens and tokenizer.pad_token is None:
        tokenizer.pad_token = PAD_TOKEN
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise ValueError(f"special tokens {tokens} have non-contiguous ids {ids} in this tokenizer")
    return ids


class NewTokenRows(nn.Module):
    """The trainable embedding rows of the tokens Flamingo adds. The LM's own rows stay frozen.

    `ids` are the new tokens' ids, contiguous from `first_id`. Input and output rows are
    separate parameters unless the LM ties its embeddings, in which case they are one.
    """

    def __init__(self, *, first_id: int, count: int, dim_in: int, dim_out: int | None, init_in: torch.Tensor,
                 init_out: torch.Tensor | None):
        super().__init__()
        self.first_id = first_id
        self.count = count
        self.input = nn.Parameter(init_in.expand(count, dim_in).clone())
        self.output = None if dim_out is None else nn.Parameter(init_out.expand(count, dim_out).clone())

    @property
    def output_rows(self) -> torch.Tensor:
        return self.input if self.output is None else self.output


class EmbeddingWithNewRows(nn.Module):
    """Frozen base embedding plus the new rows: ids in [first_id, first_id+count) read the new rows."""

    def __init__(self, base: nn.Embedding, rows: NewTokenRows):
        super().__init__()
        self.base = base
        object.__setattr__(self, "rows", rows)  # owned (and saved) by the Flamingo model, not by the LM

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        r = self.rows
        offset = ids - r.first_id
        is_new = (offset >= 0) & (offset < r.count)
        out = self.base(torch.where(is_new, 0, ids).clamp(max=self.base.num_embeddings - 1))
        offset, is_new = offset.to(out.device), is_new.to(out.device)  # a device map's hook may move ids
        if is_new.any():
            new = r.input.to(out.device, out.dtype)[offset.clamp(0, r.count - 1)]
            out = torch.where(is_new.unsqueeze(-1), new, out)
        return out


class HeadWithNewRows(nn.Module):
    """Frozen LM head plus logits for the new tokens, placed at their ids; one logit per
    tokenizer id. Rows an LM pads its vocabulary with (MPT, Pythia) are dropped, as
    OpenFlamingo's resize to the tokenizer drops them: no tokenizer id can name them."""

    def __init__(self, base: nn.Linear, rows: NewTokenRows, vocab_size: int):
        super().__init__()
        self.base = base
        self.vocab_size = vocab_size
        object.__setattr__(self, "rows", rows)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.rows
        logits = self.base(h)
        h = h.to(logits.device)  # the head's, under a device map
        vocab, end = logits.shape[-1], r.first_id + r.count
        parts = [logits[..., : min(r.first_id, vocab)]]
        if r.first_id > vocab:  # tokenizer ids with no LM row (e.g. a pad the LM never saw): never predicted
            parts.append(logits.new_full((*logits.shape[:-1], r.first_id - vocab), torch.finfo(logits.dtype).min))
        parts.append((h @ r.output_rows.to(h.device, h.dtype).T).to(logits.dtype))
        parts.append(logits[..., end:self.vocab_size])
        return torch.cat(parts, dim=-1)


def attach_new_token_rows(lm: nn.Module, first_id: int, count: int, vocab_size: int) -> NewTokenRows:
    """Route the LM's embedding and head through new trainable rows for ids
    [first_id, first_id+count), with logits for the vocab_size ids of the tokenizer.
    New rows start at the mean of the LM's own rows."""
    emb = lm.get_input_embeddings()
    head = lm.get_output_embeddings()
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ValueError(f"{type(lm).__name__}: expected nn.Embedding input and nn.Linear output embeddings")
    tied = head.weight is emb.weight
    with torch.no_grad():
        rows = NewTokenRows(
            first_id=first_id, count=count, dim_in=emb.embedding_dim,
            dim_out=None if tied else head.in_features,
            init_in=emb.weight.float().mean(0, keepdim=True),
            init_out=None if tied else head.weight.float().mean(0, keepdim=True),
        )
    lm.set_input_embeddings(EmbeddingWithNewRows(emb, rows))
    lm.set_output_embeddings(HeadWithNewRows(head, rows, max(vocab_size, first_id + count)))
    return rows
