"""Golden outputs from the real OpenFlamingo, for tests/importers/test_openflamingo.py.

Runs in its own virtual environment with OpenFlamingo's pinned stack, offline, on the CPU:

    python3.11 -m venv /tmp/ofvenv
    /tmp/ofvenv/bin/pip install open-flamingo==2.0.1 transformers==4.33.3 open_clip_torch==2.20.0 \
        "numpy<2" timm==0.9.16
    /tmp/ofvenv/bin/python tests/golden/make_openflamingo_golden.py tests/golden/openflamingo

For each LM family it builds a tiny random OpenFlamingo with OpenFlamingo's own
`create_model_and_transforms`: a tiny LM from a config with a locally built tokenizer
(`save_pretrained`), and a tiny open_clip ViT with QuickGELU (as OpenAI's CLIP weights use)
registered from a config, `pretrained=None`. Gates are set non-zero so the images matter.
It then writes what our importer and our model must reproduce:

    clip.pt, images/*.png            the open_clip weights (as open_clip saves them) and the input images
    vision_tokens.safetensors        OpenFlamingo's vision features of the images (before the perceiver)
    <family>/lm/                     the LM and tokenizer, save_pretrained
    <family>/checkpoint.pt           the trainable checkpoint, exactly as OpenFlamingo's training saves it
    <family>/expected.safetensors    perceiver output, logits, greedy and 3-beam generations
    <family>/meta.json               prompts, token ids, settings

Determinism note: for an LM with an untied head (LLaMA here), OpenFlamingo resizes the head at
load time, drawing the new tokens' output rows at random, and never saves them. This script sets
those rows to the mean of the head's original rows, which is what our importer sets them to.
"""
from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MptConfig,
                          MptForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast)

# OpenFlamingo's training utilities import wandb at module level; saving needs none of it.
sys.modules.setdefault("wandb", types.ModuleType("wandb"))
from open_flamingo import create_model_and_transforms  # noqa: E402
from open_flamingo.train.train_utils import filter_state_dict_to_trainable  # noqa: E402

CLIP_NAME = "tiny-clip-quickgelu"
CLIP_CONFIG = {
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 16, "head_width": 8, "patch_size": 14},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
CORPUS = [
    "a red circle on a blue square", "a green triangle near a yellow star", "the cat sat on the mat",
    "Output: a photo of a dog", "Question: what colour is it? Short answer: red", "two birds and a tree",
    "an image of a small house with a garden", "the quick brown fox jumps over the lazy dog",
]
SHOTS = [
    "<image>Output:a red circle<|endofchunk|><image>Output:a green star<|endofchunk|><image>Output:",
    "<image>Question:what is it? Short answer:a dog<|endofchunk|><image>Question:colour? Short answer:blue"
    "<|endofchunk|><image>Question:what is it? Short answer:",
]
MAX_NEW_TOKENS = 6
# Larger than the usual 0.02, so a random LM's next token depends on its context, not only on its biases.
INIT = 0.2


def tokenizer(with_pad: bool) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained here, with BOS prepended like LLaMA's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>"] + (["<pad>"] if with_pad else [])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>" if with_pad else None)


def lm_for(family: str, vocab: int):
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=4, num_attention_heads=4,
                                            max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                                            initializer_range=INIT))
    if family == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=32,
                                        max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=2, init_std=INIT))
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=4, num_attention_heads=4, rotary_pct=0.25,
                                                max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                                                initializer_range=INIT))
    if family == "mpt":
        # Padded past the tokenizer, as the released MPT vocabularies are: OpenFlamingo shrinks it.
        return MptForCausalLM(MptConfig(vocab_size=vocab + 13, d_model=32, n_heads=4, n_layers=2,
                                        expansion_ratio=2, max_seq_len=128, initializer_range=INIT))
    raise ValueError(family)


# family -> (cross_attn_every_n_layers, tokenizer has a pad token)
MODELS = {"mpt": (1, False), "opt": (1, True), "llama": (2, False), "gpt_neox": (2, False)}


def bf16_values(*modules) -> None:
    """Round weights to values bf16 can hold (still fp32 tensors): the committed files then
    compress about twofold in git, and the computation is unchanged in kind."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(p.bfloat16().float())


def images(out: Path) -> list[Image.Image]:
    """Three small non-square pictures, so the resize and centre crop matter."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    pics = []
    for i, (w, h) in enumerate([(300, 200), (180, 260), (240, 240)]):
        rng = np.random.default_rng(i)
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1, 3)
        grad = np.linspace(0, 255, h, dtype=np.float32)[:, None, None] * rng.uniform(0.2, 1, 3)
        img = Image.fromarray(((base + grad) / 2).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse([x, y, x + 40, y + 30], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        img.save(out / "images" / f"{i}.png")
        pics.append(Image.open(out / "images" / f"{i}.png"))
    return pics


def build(family: str, out: Path, seed: int):
    every, with_pad = MODELS[family]
    torch.manual_seed(seed)
    tok = tokenizer(with_pad)
    lm = lm_for(family, len(tok))
    bf16_values(lm)
    lm_dir = out / family / "lm"
    lm.save_pretrained(lm_dir, safe_serialization=True)
    tok.save_pretrained(lm_dir)
    head_mean = None
    if not lm.config.tie_word_embeddings:
        head_mean = lm.get_output_embeddings().weight.detach().mean(0)

    model, image_processor, text_tokenizer = create_model_and_transforms(
        CLIP_NAME, None, str(lm_dir), str(lm_dir), cross_attn_every_n_layers=every, use_local_files=True)
    model.eval()
    added = list(range(len(tok), len(text_tokenizer)))
    with torch.no_grad():
        for i, layer in enumerate(model.lang_encoder.gated_cross_attn_layers):
            if layer is not None:
                layer.attn_gate.fill_(0.9 - 0.3 * i)
                layer.ff_gate.fill_(-0.7 + 0.2 * i)
        bf16_values(model.perceiver, model.lang_encoder.gated_cross_attn_layers, model.lang_encoder)
        head = model.lang_encoder.get_output_embeddings()
        if head_mean is not None and head.weight is not model.lang_encoder.get_input_embeddings().weight:
            head.weight[added] = head_mean
    return model, image_processor, text_tokenizer, added


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clip_dir = Path(tempfile.mkdtemp())
    (clip_dir / f"{CLIP_NAME}.json").write_text(json.dumps(CLIP_CONFIG))
    open_clip.add_model_config(clip_dir)
    pics = images(out)

    torch.manual_seed(0)
    clip, _, _ = open_clip.create_model_and_transforms(CLIP_NAME, pretrained=None)
    bf16_values(clip)
    torch.save(clip.state_dict(), out / "clip.pt")
    shared_visual = clip.visual.state_dict()

    for n, family in enumerate(MODELS):
        model, image_processor, text_tokenizer, added = build(family, out, seed=n + 1)
        model.vision_encoder.load_state_dict(shared_visual)
        pixels = torch.stack([image_processor(p) for p in pics])  # (3, 3, 224, 224)
        vision_x = pixels[None, :, None].expand(2, -1, -1, -1, -1, -1)  # (b=2, T=3, F=1, c, h, w)

        text_tokenizer.padding_side = "left"
        enc = text_tokenizer(SHOTS, return_tensors="pt", padding="longest")
        with torch.no_grad():
            tokens = model.vision_encoder(pixels)[1]
            perceiver = model.perceiver(tokens[None, :, None])  # (1, T, latents, d)
            logits = model(vision_x, enc.input_ids, attention_mask=enc.attention_mask).logits
            greedy = model.generate(vision_x, enc.input_ids, attention_mask=enc.attention_mask,
                                    max_new_tokens=MAX_NEW_TOKENS, num_beams=1)
            beams = model.generate(vision_x, enc.input_ids, attention_mask=enc.attention_mask,
                                   max_new_tokens=MAX_NEW_TOKENS, num_beams=3)
        prompt_len = enc.input_ids.shape[1]
        greedy, beams = greedy[:, prompt_len:], beams[:, prompt_len:]
        # Our generate also stops at the LM's EOS and never emits <image>; OpenFlamingo does neither.
        differs = {model.media_token_id, text_tokenizer.eos_token_id}
        if differs & set(greedy.flatten().tolist() + beams.flatten().tolist()):
            raise SystemExit(f"{family}: the outputs contain <image> or EOS; choose another seed")

        if n == 0:
            save_file({"tokens": tokens.contiguous()}, str(out / "vision_tokens.safetensors"))
        state = filter_state_dict_to_trainable(model, model.state_dict())
        torch.save({"epoch": 0, "model_state_dict": state}, out / family / "checkpoint.pt")
        save_file({"perceiver": perceiver[0].contiguous(), "logits": logits.contiguous(),
                   "greedy": greedy.contiguous(), "beams": beams.contiguous()},
                  str(out / family / "expected.safetensors"))
        meta = {
            "family": family, "every": MODELS[family][0], "prompts": SHOTS, "max_new_tokens": MAX_NEW_TOKENS,
            "input_ids": enc.input_ids.tolist(), "attention_mask": enc.attention_mask.tolist(),
            "added_token_ids": added, "media_token_id": model.media_token_id, "eoc_token_id": model.eoc_token_id,
            "greedy_text": text_tokenizer.batch_decode(greedy, skip_special_tokens=False),
            "beam_text": text_tokenizer.batch_decode(beams, skip_special_tokens=False),
            "checkpoint_keys": sorted(state),
        }
        (out / family / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(family, "greedy:", meta["greedy_text"], "beams:", meta["beam_text"], file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "openflamingo"))
