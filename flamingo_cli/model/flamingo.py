"""The Flamingo model: frozen vision encoder -> Perceiver Resampler -> frozen LM with
GATED XATTN-DENSE blocks in front of every N-th decoder layer.

    p(y | x) = prod_l p(y_l | y_<l, x_<=l)

The LM is left structurally untouched: each block runs in a forward pre-hook of its
decoder layer, so the LM's own forward, KV cache and `generate` work unchanged.
The media a call is conditioned on never live on the modules: they travel in a
context variable set for the duration of one forward or generate call, so two models,
two threads, or two calls with different media cannot interfere.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import IMAGE_TOKEN, FlamingoConfig
from .lm import (PAD_TOKEN, add_special_tokens, attach_new_token_rows, context_length, decoder_layers, text_config,
                 xattn_layer_indices)
from .masking import image_index
from .resampler import PerceiverResampler
from .vision_encoder import VisionEncoder
from .xattn import GatedXAttnDense


@dataclass
class MediaContext:
    """What one call is conditioned on."""
    visual: torch.Tensor | None  # (bv, m, l, d) visual tokens of every image in the sequences
    phi: torch.Tensor  # (b, t) image index of the positions [start, start + t) known when the call began
    start: int = 0
    chunk_phi: torch.Tensor | None = None  # phi of the chunk the LM is running now
    kv: dict = field(default_factory=dict)  # per block: its visual K/V, computed once per call
    rows: torch.Tensor | None = None  # (b,) each sequence's row of visual (beams share their prompt's)


# model key -> its MediaContext, for the calls running in this thread / task.
_ACTIVE: ContextVar[dict] = ContextVar("flamingo_media", default={})


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


class Flamingo(nn.Module):
    def __init__(self, config: FlamingoConfig, lm: nn.Module, tokenizer, encoder: VisionEncoder | None = None):
        """Wraps `lm` in place (hooks, new token rows) and adds Flamingo's tokens to `tokenizer`."""
        super().__init__()
        config.validate()
        if getattr(lm, "_flamingo_wrapped", False):
            raise ValueError("this LM instance is already part of a Flamingo model; load a fresh one")
        self.config = config
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.resampler = PerceiverResampler(config.resampler)

        if tokenizer.pad_token is None and PAD_TOKEN not in config.special_tokens:
            config = copy.deepcopy(config)
            config.special_tokens = [*config.special_tokens, PAD_TOKEN]
            self.config = config
        new_ids = add_special_tokens(tokenizer, config.special_tokens)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eoc_token_id = tokenizer.convert_tokens_to_ids(config.end_of_chunk_token)
        if config.end_of_chunk_token not in tokenizer.get_vocab():
            raise ValueError(f"end_of_chunk_token {config.end_of_chunk_token!r} is neither in special_tokens "
                             "nor a token of this LM's tokenizer")
        self.pad_token_id = tokenizer.pad_token_id
        # The token after which text attends to no image until the next <image> (None: no such token).
        self.reset_token_id = tokenizer.eos_token_id if config.xattn.reset_after_eos else None
        if config.xattn.reset_after_eos and self.reset_token_id is None:
            raise ValueError("xattn.reset_after_eos needs an end-of-sequence token, and this LM's tokenizer has none")

        layers = decoder_layers(lm)
        hidden = text_config(lm).hidden_size
        self.xattn = nn.ModuleDict({
            str(i): GatedXAttnDense(dim=hidden, dim_visual=config.resampler.dim, config=config.xattn)
            for i in xattn_layer_indices(len(layers), config.xattn.every, config.xattn.placement)
        })
        self.new_tokens = attach_new_token_rows(lm, new_ids[0], len(new_ids), len(tokenizer))
        self.lm = lm.requires_grad_(False).eval()
        lm._flamingo_wrapped = True
        self._cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

        self.activation_checkpointing = False
        lm.register_forward_pre_hook(self._locate_chunk, with_kwargs=True)
        for i in self.xattn:
            layers[int(i)].register_forward_pre_hook(self._block_hook(i), with_kwargs=True)

    # -- conditioning -----------------------------------------------------------------

    @contextlib.contextmanager
    def _conditioned(self, ctx: MediaContext):
        token = _ACTIVE.set({**_ACTIVE.get(), id(self): ctx})
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def _context(self) -> MediaContext | None:
        return _ACTIVE.get().get(id(self))

    def _locate_chunk(self, module, args, kwargs):
        """Before each LM call: the image index of the tokens it is about to run."""
        ctx = self._context()
        if ctx is None:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        t = ids.shape[1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        pos = torch.arange(t, device=ctx.phi.device) + _cache_length(kwargs) - ctx.start
        # Positions past the known ones are generated tokens: never <image>, so they keep the last phi
        # (after a generated end-of-sequence token too, as IDEFICS's generate reuses the last mask row).
        ctx.chunk_phi = ctx.phi[:, pos.clamp(0, ctx.phi.shape[1] - 1)]
        return None

    def _block_hook(self, i: str):
        def hook(module, args, kwargs):
            y = args[0] if args else kwargs["hidden_states"]
            ctx = self._context()
            block = self.xattn[i]
            dtype = block.ff_gate.dtype
            device = block.ff_gate.device  # its layer's, when a device map spreads the LM
            visual, phi, rows, kv = None, None, None, None
            if ctx is not None and ctx.visual is not None:
                visual, phi, kv = ctx.visual.to(device, dtype), ctx.chunk_phi.to(device), ctx.kv
                rows = None if ctx.rows is None else ctx.rows.to(device)
            y = y.to(device)
            if self.activation_checkpointing and torch.is_grad_enabled():
                # Explicit inputs: the recomputation in backward runs outside this call's media context.
                # No K/V cache: the recomputation must redo exactly what the forward did.
                y = checkpoint(block, y.to(dtype), visual, phi, rows, None, use_reentrant=False).to(y.dtype)
            else:
                y = block(y.to(dtype), visual, phi, rows, kv).to(y.dtype)
            if args:
                return (y, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": y}
        return hook

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Trade compute for memory in training: keep only the inputs of each decoder layer and
        each GATED XATTN-DENSE block, and recompute their insides in backward. The layer's own
        forward is checkpointed (not its __call__), so the block hooks run once, in forward."""
        for layer in decoder_layers(self.lm):
            if enabled and "forward" not in layer.__dict__:
                layer.forward = functools.partial(_checkpointed, layer.forward)
            elif not enabled:
                layer.__dict__.pop("forward", None)
        self.activation_checkpointing = enabled

    def follow_lm_devices(self) -> None:
        """After transformers placed the LM across devices (a device map): each block moves to its
        decoder layer's device, and the resampler and new token rows to the input embedding's.
        Media and hidden states then move to a block as it runs (a no-op on one device)."""
        layers = decoder_layers(self.lm)
        for i, block in self.xattn.items():
            block.to(_execution_device(layers[int(i)], self.input_device))
        self.resampler.to(self.input_device)
        self.new_tokens.to(self.input_device)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the input embedding's device (its execution device when offloaded)."""
        return _execution_device(self.lm.get_input_embeddings(), torch.device("cpu"))

    @property
    def context_length(self) -> int | None:
        """The most positions the LM takes, prompt and generated tokens together (None: unstated)."""
        return context_length(self.lm)

    # -- media ------------------------------------------------------------------------

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (b, [f,] 3, h, w) -> frozen features (b, f, n, d)."""
        if self.encoder is None:
            raise ValueError("this model was loaded without its vision encoder")
        return self.encoder(pixels)

    def resample(self, features: torch.Tensor) -> torch.Tensor:
        """features (b, f, n, d) -> visual tokens (b, num_latents, d); or (b, m, f, n, d) -> (b, m, l, d)."""
        dtype = self.resampler.latents.dtype
        return self.resampler(features.to(dtype))

    # -- text -------------------------------------------------------------------------

    def _check_media(self, phi: torch.Tensor, visual: torch.Tensor | None) -> None:
        images = int(phi.max()) if phi.numel() else 0
        have = 0 if visual is None else visual.shape[1]
        if images > have:
            raise ValueError(f"the text refers to {images} <image>(s) but {have} visual input(s) were given")
        if visual is not None and (visual.ndim != 4 or visual.shape[-1] != self.config.resampler.dim
                                   or visual.shape[0] not in (1, phi.shape[0])):
            raise ValueError(f"visual tokens must be (batch or 1, media, tokens, {self.config.resampler.dim}) "
                             f"for a batch of {phi.shape[0]}, got {tuple(visual.shape)}")

    def forward(self, input_ids: torch.Tensor, visual: torch.Tensor | None = None, *,
                features: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                images_before: torch.Tensor | None = None, next_image: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = False,
                visual_kv: dict | None = None):
        """Next-token logits for input_ids (b, t) conditioned on visual tokens (b, m, l, d); visual
        (1, m, l, d) is one set of media shared by every sequence.

        With a `cache` from an earlier call, input_ids continue that sequence and
        `images_before` (b,) counts the <image> tokens already in it. Under xattn.reset_after_eos
        only resets within input_ids are seen: where the earlier part ended after an end-of-sequence
        token with no <image> since, pass images_before 0 (exact while input_ids hold no <image>).
        `next_image` (b,) bool makes a training sequence's text attend to the next image instead
        (the paper's p_next).
        Instead of visual tokens, `features` (b, m, f, n, d) may be given; they are resampled
        here, inside the forward, which is what sharded (FSDP) training needs. attention_mask
        may be the LM's 2D padding mask or a 4D (b, 1, t, cache + t) additive mask, passed as is.
        `visual_kv`, a dict given to consecutive calls on the same `visual` tensor, keeps the
        images' cross-attention K/V between them, so each image is projected once (score's chunks).
        Returns the LM's output (`.logits`, and the cache when use_cache).
        """
        if features is not None:
            visual = self.resample(features)
        phi = image_index(input_ids, self.image_token_id, images_before, next_image, self.reset_token_id)
        self._check_media(phi, visual)
        ctx = MediaContext(visual=visual, phi=phi, start=_cache_length({"cache": cache}),
                           kv={} if visual_kv is None else visual_kv)
        extra = {} if position_ids is None else {"position_ids": position_ids}
        with self._conditioned(ctx):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           **{self._cache_kw: cache}, use_cache=use_cache, **extra)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, visual: torch.Tensor | None = None, *,
                 attention_mask: torch.Tensor | None = None, num_beams: int = 3, max_new_tokens: int = 20,
                 length_penalty: float = 1.0, cache=None) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search with transformers' own `generate`, stopping at the
        end-of-chunk token (config.end_of_chunk_token) or the LM's end-of-sequence token. Returns the
        new token ids (b, <= max_new_tokens), padded with pad_token_id.

        The prompt is prefilled here once for all beams, then its cache is repeated per beam;
        the images' cross-attention K/V are computed once and shared by a prompt's beams.
        `cache` (b rows) may already hold the first tokens of every (left-padded) prompt, as a
        prefix cache provides it: only the rest is run.
        """
        from transformers import DynamicCache

        b, n = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        phi = image_index(input_ids, self.image_token_id, reset_token_id=self.reset_token_id)
        self._check_media(phi, visual)
        cache = DynamicCache() if cache is None else cache
        kv = {}
        done = cache.get_seq_length()
        if done < n - 1:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            with self._conditioned(MediaContext(visual=visual, phi=phi, kv=kv)):
                self.lm(input_ids=input_ids[:, done:n - 1], attention_mask=attention_mask[:, :n - 1],
                        position_ids=positions[:, done:n - 1], **{self._cache_kw: cache}, use_cache=True)
        if num_beams > 1:
            cache.batch_repeat_interleave(num_beams)
        rows = torch.arange(b, device=input_ids.device).repeat_interleave(num_beams)
        ctx = MediaContext(visual=visual, phi=phi[rows], kv=kv, rows=rows if visual is not None and len(visual) > 1
                           else None)
        eos = [self.eoc_token_id]
        if self.tokenizer.eos_token_id not in (None, self.eoc_token_id):  # IDEFICS's chunks end at its EOS
            eos.append(self.tokenizer.eos_token_id)
        with self._conditioned(ctx):
            out = self.lm.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=num_beams,
                max_new_tokens=max_new_tokens, length_penalty=length_penalty, eos_token_id=eos,
                pad_token_id=self.pad_token_id, suppress_tokens=[self.image_token_id], use_cache=True,
                **{self._cache_kw: cache},
            )
        return out[:, n:]

    # -- training ---------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Flamingo":
        super().train(mode)
        self.lm.eval()  # frozen: no dropout in the LM, whatever the blocks do
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Resampler, GATED XATTN-DENSE blocks and the new token rows: what a checkpoint stores."""
        return {
            f"{prefix}.{name}": p
            for prefix in ("resampler", "xattn", "new_tokens")
            for name, p in getattr(self, prefix).state_dict().items()
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for prefix in ("resampler", "xattn", "new_tokens") for p in getattr(self, prefix).parameters()]


def _execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where a module runs: accelerate's hook says so for a placed or offloaded module (whose
    weights may wait on the meta device); otherwise where its weights are."""
    for part in module.modules():
        device = getattr(getattr(part, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    weights = next((p for p in module.parameters() if p.device.type != "meta"), None)
    return default if weights is None else weights.device


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL; labels of -100 (padding, <image>, ...) carry no loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
