"""Parity with transformers' own IdeficsForVisionText2Text, and a strict importer.

Tiny random IDEFICS models are built here from IdeficsConfig (gates and norms drawn at random so
that every part bites), imported, loaded back as a checkpoint and run against IDEFICS's forward
and generate on the same token ids and pixels, with its processor's image-attention mask.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hub_repo
from flamingo_cli.errors import CheckpointError

FLAMINGO = [sys.executable, "-c", "from flamingo_cli.cli import main; main()"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
FAKE, IMAGE = "<fake_token_around_image>", "<image>"
# (A) a float gate every 2nd layer without q/k norms; (B) vector gates before every layer, q/k norms everywhere.
SETUPS = {"A": dict(qk=False, alpha="float", every=2), "B": dict(qk=True, alpha="vector", every=1)}
# Text before the first image, two and three images, an end of sequence (</s>) then text before the next image.
PROMPTS = ["a red circle<image>What colour is the shape? red</s>What shape<image>What shape is it?",
           "Question:<image>Three elephants<|endofchunk|><image><image>This is a picture of"]
IMAGES = [2, 3]


def tiny_tokenizer_with_image_tokens(extra=()):
    """The project's tiny BPE, adding <s> as LLaMA's does, with IDEFICS's two tokens (and `extra`, as an
    instruct model's <end_of_utterance>) after its vocabulary."""
    from conftest import add_bos

    from flamingo_cli.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    vocab = len(tok)
    tok.add_tokens([FAKE, IMAGE, *extra], special_tokens=True)  # ids vocab, vocab + 1, ...
    add_bos(tok)
    return tok, vocab


def tiny_idefics(directory: Path, *, qk: bool, alpha: str, every: int, seed: int = 0, extra=(), tied: bool = False):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    tok, vocab = tiny_tokenizer_with_image_tokens(extra)
    torch.manual_seed(seed)
    config = IdeficsConfig(
        vocab_size=vocab, additional_vocab_size=2 + len(extra), hidden_size=32, intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=every, max_position_embeddings=128, use_resampler=True,
        qk_layer_norms=qk, alpha_type=alpha, alpha_initializer="zeros",  # "normal" crashes for float gates
        bos_token_id=0, eos_token_id=1, pad_token_id=1, tie_word_embeddings=tied,
        vision_config=dict(embed_dim=16, image_size=28, patch_size=14, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, hidden_act="gelu"),
        perceiver_config=dict(resampler_n_latents=4, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=8,
                              qk_layer_norms_perceiver=qk))
    model = IdeficsForVisionText2Text(config).eval()
    with torch.no_grad():
        for block in model.model.gated_cross_attn_layers:
            block.alpha_cross_attn.normal_(0, 1)
            block.alpha_dense.normal_(0, 1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """name -> (IDEFICS model, its directory, our checkpoint loaded back); A through the CLI."""
    from flamingo_cli.formats.checkpoint import load_checkpoint, save_checkpoint
    from flamingo_cli.importers.idefics import import_idefics

    root = tmp_path_factory.mktemp("idefics")
    out = {}
    for name, options in SETUPS.items():
        source, ckpt = root / name, root / f"{name}-ckpt"
        reference = tiny_idefics(source, **options)
        if name == "A":
            r = subprocess.run([*FLAMINGO, "import", "idefics", str(source), "-o", str(ckpt)], capture_output=True,
                               text=True, env=ENV)
            assert r.returncode == 0, r.stderr
            assert "tensors imported" in r.stderr
        else:
            model, _ = import_idefics(str(source), root / f"{name}-work")
            save_checkpoint(model, ckpt, embed_lm=True, embed_encoder=True)
        out[name] = (reference, source, load_checkpoint(ckpt).eval(), ckpt)
    return out


def batch(model):
    from flamingo_cli.inference.generation import tokenize_prompts

    model.tokenizer.padding_side = "left"
    enc = tokenize_prompts(model, PROMPTS, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def idefics_mask(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """IDEFICS's image-attention mask as its processor builds it (after </s>, no image until the next)."""
    from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids_pt,
                                                                incremental_to_binary_attention_mask)

    incremental, _ = image_attention_mask_for_packed_input_ids_pt(ids.clone(), tokenizer)
    return incremental_to_binary_attention_mask(incremental, "pt", num_classes=max(IMAGES))


def pixels() -> torch.Tensor:
    """(b, images, 3, 28, 28), zero where a prompt has fewer images, as IDEFICS's processor pads."""
    torch.manual_seed(1)
    pix = torch.randn(len(PROMPTS), max(IMAGES), 3, 28, 28)
    for row, n in enumerate(IMAGES):
        pix[row, n:] = 0
    return pix


def visual_tokens(model, pix: torch.Tensor) -> torch.Tensor:
    b, m = pix.shape[:2]
    tokens = model.resample(model.encode(pix.flatten(0, 1)))
    return tokens.view(b, m, *tokens.shape[1:])


def max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("name", SETUPS)
def test_the_vision_tower_gives_idefics_last_hidden_state(setups, name):
    reference, _, model, _ = setups[name]
    pix = pixels()[0]
    with torch.no_grad():
        ours = model.encode(pix)[:, 0]  # (images, 1 + patches, d): CLS first, before the final norm
        theirs = reference.model.vision_model(pixel_values=pix).last_hidden_state
    assert ours.shape == theirs.shape
    assert max_diff(ours, theirs) <= 1e-5


def logits_difference(reference, model) -> float:
    """max |Δ| between IDEFICS's logits and ours on PROMPTS (left-padded, with its image mask), over
    the positions that are not padding."""
    ids, mask = batch(model)
    pix = pixels()
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask, pixel_values=pix,
                           image_attention_mask=idefics_mask(ids, model.tokenizer)).logits
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ours = model(ids, visual_tokens(model, pix), attention_mask=mask, position_ids=positions).logits
    assert ours.shape == theirs.shape
    return max_diff(ours[mask.bool()], theirs[mask.bool()])


@pytest.mark.parametrize("name", SETUPS)
def test_logits_match_idefics_on_padded_multi_image_prompts(setups, name):
    reference, _, model, _ = setups[name]
    ids, _ = batch(model)
    assert (ids == model.tokenizer.eos_token_id).any(1).all()  # an end of sequence (or a pad) in every row
    assert logits_difference(reference, model) <= 1e-4


@pytest.mark.parametrize("name", SETUPS)
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_matches_idefics_generate(setups, name, beams):
    reference, _, model, _ = setups[name]
    ids, mask = batch(model)
    pix = pixels()
    tok = model.tokenizer
    with torch.no_grad():
        theirs = reference.generate(input_ids=ids, attention_mask=mask, pixel_values=pix,
                                    image_attention_mask=idefics_mask(ids, tok), max_new_tokens=8, do_sample=False,
                                    num_beams=beams, suppress_tokens=[model.image_token_id],
                                    eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        ours = model.generate(ids, visual_tokens(model, pix), attention_mask=mask, num_beams=beams, max_new_tokens=8)
    assert ours.tolist() == theirs[:, ids.shape[1]:].tolist()


def test_prompts_are_tokenized_as_idefics_processor_tokenizes_them(setups):
    from PIL import Image
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    from flamingo_cli.inference.generation import tokenize_prompts

    _, _, model, _ = setups["A"]
    tok, _ = tiny_tokenizer_with_image_tokens()
    tok.pad_token = "</s>"  # the processor pads, even one prompt
    processor = IdeficsProcessor(IdeficsImageProcessor(image_size=28), tok)
    image = Image.new("RGB", (28, 28))
    items = ["a red circle", image, image, "What colour is the shape?", image, "red"]  # adjacent images share
    theirs = processor(text=[items], return_tensors="pt").input_ids[0].tolist()
    ours = tokenize_prompts(model, ["a red circle<image><image>What colour is the shape?<image>red"]).input_ids[0]
    assert ours == theirs
    assert f"circle{FAKE}{IMAGE}{FAKE}{IMAGE}{FAKE}What" in model.tokenizer.decode(ours).replace(" ", "")


# One demonstration and a query in each template, as the items IdeficsProcessor takes: the templates'
# text is what IDEFICS's own processor writes for the documented prompt forms.
SHOT = {"id": "s", "question": "What colour is it?", "answer": "red", "caption": "a red circle"}
QUERY = {"id": "q", "question": "What shape is it?"}
TEMPLATE_ITEMS = {
    "idefics-vqa": ["User:", None, "What colour is it?\nAssistant: red\n", "User:", None,
                    "What shape is it?\nAssistant:"],
    "idefics-captioning": ["User:", None, "Describe this image.\nAssistant: a red circle\n", "User:", None,
                           "Describe this image.\nAssistant:"],
    "idefics-instruct-vqa": ["User:", None, "What colour is it?<end_of_utterance>",
                             "\nAssistant: red<end_of_utterance>", "\nUser:", None,
                             "What shape is it?<end_of_utterance>", "\nAssistant:"],
    "idefics-instruct-captioning": ["User:", None, "Describe this image.<end_of_utterance>",
                                    "\nAssistant: a red circle<end_of_utterance>", "\nUser:", None,
                                    "Describe this image.<end_of_utterance>", "\nAssistant:"],
}


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory):
    """A tiny IDEFICS whose tokenizer holds <end_of_utterance>, imported: an instruct model's layout."""
    from flamingo_cli.importers.idefics import END_OF_UTTERANCE, import_idefics

    root = tmp_path_factory.mktemp("idefics-instruct")
    reference = tiny_idefics(root / "src", qk=False, alpha="float", every=2, extra=(END_OF_UTTERANCE,))
    model, _ = import_idefics(str(root / "src"), root / "work")
    assert model.config.end_of_chunk_token == END_OF_UTTERANCE
    return reference, model.eval()


@pytest.mark.parametrize("name", sorted(TEMPLATE_ITEMS))
def test_idefics_templates_tokenize_as_its_processor_writes_its_prompts(setups, instruct_model, name):
    from PIL import Image
    from transformers import IdeficsImageProcessor, IdeficsProcessor

    from flamingo_cli.importers.idefics import END_OF_UTTERANCE
    from flamingo_cli.inference.generation import tokenize_prompts
    from flamingo_cli.inference.prompting import build_prompt, load_template

    instruct = "instruct" in name
    model = instruct_model[1] if instruct else setups["A"][2]
    tok, _ = tiny_tokenizer_with_image_tokens((END_OF_UTTERANCE,) if instruct else ())
    tok.pad_token = "</s>"
    processor = IdeficsProcessor(IdeficsImageProcessor(image_size=28), tok)
    image = Image.new("RGB", (28, 28))
    items = [image if item is None else item for item in TEMPLATE_ITEMS[name]]
    theirs = processor(text=[items], add_end_of_utterance_token=False, return_tensors="pt").input_ids[0].tolist()
    text, _ = build_prompt(load_template(name), {"image": "q.png", **QUERY}, [{"image": "s.png", **SHOT}])
    assert tokenize_prompts(model, [text]).input_ids[0] == theirs


# IDEFICS's published evaluation (HuggingFace's m4 code): each template's prefix and example as m4
# writes them, with m4's field names. m4 builds a prompt as prefix + the shots' examples + the query's
# example (its answer empty, or the tested class), strips it, writes each <image> in IDEFICS's markup
# and tokenizes it adding no special tokens (the BOS, where there is one, is in the prefix).
M4_TEMPLATES = {
    "idefics-eval-vqa": ("{bos}Instruction: provide an answer to the question. Use the image to answer.\n",
                         "Image:<image>Question: {question} Answer: {answer}\n"),
    "idefics-eval-vizwiz": ("{bos}Task: Answer the questions based on the image when possible, otherwise say"
                            " unanswerable.\n", "Image:<image>Question: {question} Answer: {answer}\n"),
    "idefics-eval-captioning": ("{bos}", "Image:<image>Caption: {caption}\n"),
    "idefics-eval-classification": ("", "<image>a photo of a {class_name}."),
    "idefics-eval-hatefulmemes": ("It's a conversation between a human, the user, and an intelligent visual AI, Bot."
                                  " The user sends memes with text written on them, and Bot has to say whether"
                                  " the meme is hateful or not.",
                                  '<image>is an image with written "{text}" on it. Is it hateful? Answer: {class_name}'),
}
EVAL_SHOTS = [{"id": "s1", "question": "What colour is it?", "answer": "red", "caption": "a red circle",
               "label": "yes", "text": "look at this"},
              {"id": "s2", "question": "How many?", "answer": "two", "caption": "two blue squares",
               "label": "no", "text": "a nice day"}]
EVAL_QUERY = {"id": "q", "question": "What shape is it?", "text": "hello there"}


def m4_ids(tok, name, shots, query, tested=""):
    prefix, example = M4_TEMPLATES[name]
    source = {"Answer: {answer}": "answer", "{caption}": "caption"}
    field = next((f for marker, f in source.items() if marker in example), "label")

    def fill(record, answer):
        return example.format(question=record.get("question"), text=record.get("text"), answer=answer,
                              caption=answer, class_name=answer)

    text = prefix.format(bos=tok.bos_token) + "".join(fill(s, s[field]) for s in shots) + fill(query, tested).strip()
    return tok(text.strip().replace(IMAGE, f"{FAKE}{IMAGE}{FAKE}"), add_special_tokens=False).input_ids


@pytest.mark.parametrize("name", sorted(M4_TEMPLATES))
def test_idefics_evaluation_templates_are_m4s_prompts_token_for_token(setups, name):
    from flamingo_cli.inference.generation import tokenize_prompts
    from flamingo_cli.inference.prompting import load_template, make_prompt_records
    from flamingo_cli.inference.scoring import candidate_ids

    model = setups["A"][2]
    tok, _ = tiny_tokenizer_with_image_tokens()
    template = load_template(name)
    support = [{"image": f"{s['id']}.png", **s} for s in EVAL_SHOTS]
    record = make_prompt_records(template, {"image": "q.png", **EVAL_QUERY}, support, k=2, method="first",
                                 seed=0)[0]
    ours = tokenize_prompts(model, [record["prompt"]], bos=record.get("bos", True)).input_ids[0]
    if name in ("idefics-eval-vqa", "idefics-eval-vizwiz", "idefics-eval-captioning"):  # generated
        assert ours == m4_ids(tok, name, EVAL_SHOTS, EVAL_QUERY)
    else:  # scored: the prompt and each candidate's continuation are m4's text with that class in it
        for candidate in template.candidates or ["goldfish", "great white shark"]:
            assert ours + candidate_ids(model, template.continuation, candidate) == m4_ids(
                tok, name, EVAL_SHOTS, EVAL_QUERY, candidate)


def test_the_checkpoint_config_says_what_idefics_is(setups):
    _, _, model, ckpt = setups["B"]
    config = model.config
    assert config.special_tokens == [FAKE, IMAGE] and config.end_of_chunk_token == "</s>"
    assert config.image_markup == f"{FAKE}{IMAGE}{FAKE}"
    assert (config.xattn.norm, config.xattn.ff, config.xattn.gate, config.xattn.qk_norm) == ("rmsnorm", "swiglu",
                                                                                             "vector", True)
    assert config.resampler.activation == "relu" and config.resampler.qk_norm
    assert len(model.tokenizer) == model.new_tokens.first_id + model.new_tokens.count  # no row without weights
    assert (ckpt / "lm" / "config.json").is_file() and (ckpt / "encoder.safetensors").is_file()


def broken_copy(source: Path, target: Path, change) -> Path:
    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    change(state)
    save_file(state, str(target / "model.safetensors"))
    return target


BREAKS = {
    "unknown": (lambda s: s.__setitem__("model.extra.weight", torch.zeros(2)), "unknown model.extra.weight"),
    "missing": (lambda s: s.pop("model.gated_cross_attn_layers.1.cross_attn.k_proj.weight"),
                "missing model.gated_cross_attn_layers.1.cross_attn.k_proj.weight"),
    "mis-shaped": (lambda s: s.__setitem__("model.perceiver_resampler.blocks.0.1.fc.weight", torch.zeros(60, 16)),
                   "wrong shape model.perceiver_resampler.blocks.0.1.fc.weight (file [60, 16], expected [64, 16]"),
}


@pytest.mark.parametrize("kind", BREAKS)
def test_a_broken_file_is_one_error_naming_the_tensor(setups, tmp_path, kind):
    from flamingo_cli.importers.idefics import import_idefics

    change, message = BREAKS[kind]
    broken = broken_copy(setups["A"][1], tmp_path / "broken", change)
    with pytest.raises(CheckpointError) as e:
        import_idefics(str(broken), tmp_path / "work")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_reports_a_broken_file_in_one_line(setups, tmp_path):
    change, message = BREAKS["missing"]
    broken = broken_copy(setups["A"][1], tmp_path / "broken", change)
    r = subprocess.run([*FLAMINGO, "import", "idefics", str(broken), "-o", str(tmp_path / "x")], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode != 0 and len(r.stderr.splitlines()) == 1, r.stderr
    assert message in r.stderr and not (tmp_path / "x").exists()


def test_without_the_resampler_the_import_refuses(setups, tmp_path):
    from flamingo_cli.importers.idefics import import_idefics

    folder = shutil.copytree(setups["A"][1], tmp_path / "raw")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "use_resampler": False}))
    with pytest.raises(CheckpointError, match="use_resampler is false"):
        import_idefics(str(folder), tmp_path / "work")


@pytest.mark.parametrize("name, text", [("config.json", "{not json"), ("config.json", "[1]"),
                                         ("preprocessor_config.json", b"\xff\xfe"),
                                         ("preprocessor_config.json", "[]")])
def test_a_broken_json_file_is_one_error_naming_it(setups, tmp_path, name, text):
    from flamingo_cli.importers.idefics import import_idefics

    folder = shutil.copytree(setups["A"][1], tmp_path / "raw")
    (folder / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError) as e:
        import_idefics(str(folder), tmp_path / "work")
    assert str(e.value).startswith(str(folder / name)) and "\n" not in str(e.value)


def test_by_repo_id_from_the_hub_cache_the_import_is_the_same(setups, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from flamingo_cli.formats.checkpoint import save_checkpoint
    from flamingo_cli.importers.idefics import import_idefics

    _, source, _, ckpt = setups["A"]
    hub_repo(tmp_path / "hub", "someone/tiny-idefics", source)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _ = import_idefics("someone/tiny-idefics", tmp_path / "work")
    by_id = save_checkpoint(model, tmp_path / "by-id", embed_lm=True, embed_encoder=True)
    for name in ("model.safetensors", "encoder.safetensors"):
        assert (by_id / name).read_bytes() == (ckpt / name).read_bytes()


def as_bin(folder: Path) -> None:
    """Rewrite save_pretrained's safetensors (transformers 5 writes no other) as the pytorch_model*.bin
    files older releases carry, with their index when sharded."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    rename = {f: f.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin") for f in files}
    for old, new in rename.items():
        torch.save(load_file(folder / old), folder / new)
        (folder / old).unlink()
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: rename[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data))
        index.unlink()


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "model-*.safetensors + index", "pytorch_model-*.bin + index"])
def test_every_weight_layout_imports_the_same(setups, tmp_path, layout):
    """The other layouts save_pretrained writes or wrote (.bin; shards and their index) import the same."""
    from flamingo_cli.formats.checkpoint import save_checkpoint
    from flamingo_cli.importers.idefics import import_idefics

    reference, _, _, ckpt = setups["A"]
    folder = tmp_path / "src"
    reference.save_pretrained(folder, max_shard_size="20KB" if "index" in layout else "10GB")
    tiny_tokenizer_with_image_tokens()[0].save_pretrained(folder)
    if ".bin" in layout:
        as_bin(folder)
    names = {p.name for p in folder.iterdir()}
    expected = {"pytorch_model.bin": "pytorch_model.bin", "model-*.safetensors + index": "model.safetensors.index.json",
                "pytorch_model-*.bin + index": "pytorch_model.bin.index.json"}[layout]
    shards = [n for n in names if n.startswith(("model-", "pytorch_model-"))]
    assert expected in names and (len(shards) > 2 if "index" in layout else not shards)
    model, _ = import_idefics(str(folder), tmp_path / "work")
    again = save_checkpoint(model, tmp_path / "ckpt", embed_lm=True, embed_encoder=True)
    for name in ("model.safetensors", "encoder.safetensors"):
        assert (again / name).read_bytes() == (ckpt / name).read_bytes()


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_stops_at_end_of_utterance_as_idefics_does(instruct_model, beams):
    """An instruct model ends a turn with <end_of_utterance>: ours stops there as IDEFICS's generate
    does when told to. Its head row is scaled up until decoding emits it mid-answer."""
    reference, model = instruct_model
    ids, mask = batch(model)
    pix = pixels()
    tok = model.tokenizer
    eou = model.eoc_token_id
    theirs_row = reference.lm_head.additional_fc.weight[eou - reference.config.vocab_size]
    ours_row = model.new_tokens.output[eou - model.new_tokens.first_id]
    assert torch.equal(theirs_row, ours_row)
    row = theirs_row.detach().clone()
    try:
        with torch.no_grad():
            for scale in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0):
                theirs_row.copy_(row * scale)
                ours_row.copy_(row * scale)
                theirs = reference.generate(input_ids=ids, attention_mask=mask, pixel_values=pix,
                                            image_attention_mask=idefics_mask(ids, tok), max_new_tokens=10,
                                            do_sample=False, num_beams=beams, suppress_tokens=[model.image_token_id],
                                            eos_token_id=[eou, tok.eos_token_id], pad_token_id=tok.pad_token_id)
                new = theirs[:, ids.shape[1]:].tolist()
                if any(eou in r[1:] for r in new):
                    break
            else:
                pytest.fail("no scale of the <end_of_utterance> row stops IDEFICS mid-answer")
            ours = model.generate(ids, visual_tokens(model, pix), attention_mask=mask, num_beams=beams,
                                  max_new_tokens=10)
    finally:
        with torch.no_grad():
            theirs_row.copy_(row)
            ours_row.copy_(row)
    assert ours.tolist() == new


@pytest.mark.parametrize("size, mode", [((28, 28), "RGB"), ((97, 61), "RGB"), ((13, 40), "RGB"), ((1000, 700), "RGB"),
                                        ((40, 30), "RGBA"), ((40, 30), "LA"), ((40, 30), "P")])
def test_pixels_are_idefics_pil_image_processors(setups, tmp_path, size, mode):
    """The imported tower's preprocessing is IdeficsImageProcessorPil's to the bit (the PIL processor
    transformers 4.x shipped IDEFICS with), downscaling, upscaling and squashing non-square images.
    transformers 5's default IdeficsImageProcessor resizes with torchvision's bicubic instead, which
    differs by rounding (one level in 255 downscaling, more upscaling). A transparent image, read
    from a file as encode reads it, is composited on white as IDEFICS's convert_to_rgb does."""
    import numpy as np
    from PIL import Image
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    from flamingo_cli.inference.media import read_image

    _, _, model, _ = setups["A"]
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":  # half the pixels see-through, at random strengths
        alpha = Image.fromarray((rng.integers(0, 256, (size[1], size[0])) * (rng.random((size[1], size[0])) < 0.5))
                                .astype(np.uint8))
        image = (image.convert("L") if mode == "LA" else image).copy()
        image.putalpha(alpha)
        if mode == "P":  # a palette with one transparent index, as GIFs and small PNGs carry it
            image = image.convert("RGB").quantize(16)
            image.info["transparency"] = 3
        image.save(tmp_path / "image.png")
        image = read_image(tmp_path / "image.png")
        assert image.mode == "RGBA"
    theirs = IdeficsImageProcessorPil(image_size=28)(image, return_tensors="pt")
    theirs = getattr(theirs, "pixel_values", theirs)[0]
    assert torch.equal(model.encoder.transform()(image), theirs)


def test_tied_embeddings_import_with_logit_parity(tmp_path):
    """tie_word_embeddings: the head is the embedding (and the new rows' head their embedding), so
    the file carries no separate head and ours ties them the same way."""
    from flamingo_cli.importers.idefics import import_idefics

    reference = tiny_idefics(tmp_path / "src", qk=True, alpha="float", every=2, tied=True)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    model, _ = import_idefics(str(tmp_path / "src"), tmp_path / "work")
    model.eval()
    lm = model.lm
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().base.weight
    assert logits_difference(reference, model) <= 1e-4
