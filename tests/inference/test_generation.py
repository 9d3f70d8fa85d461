"""The generate stage as a function: decoding."""
from flamingo_cli.inference.generation import generate_records
from flamingo_cli.inference.media import MediaResolver


def test_a_bpe_tokenizer_that_asks_for_space_cleanup_decodes_without_a_warning(make_model, monkeypatch):
    """Many hub tokenizers ship clean_up_tokenization_spaces: true; transformers 5 ignores it
    for BPE with a warning on every decode. The output is what it would be, and stderr stays quiet."""
    from transformers.utils import logging

    model = make_model("llama", gates=0.0)
    model.tokenizer.clean_up_tokenization_spaces = True
    warned = []
    logger = logging.get_logger("transformers.tokenization_utils_tokenizers")
    monkeypatch.setattr(logger, "warning_once", lambda message, *a, **k: warned.append(message))
    record = {"id": "a", "prompt": "What shape is it?", "media": []}
    out = generate_records(model, [record], MediaResolver(model), num_beams=1, max_new_tokens=6)
    assert warned == []
    ids = model.generate(model.tokenizer(record["prompt"], return_tensors="pt").input_ids, None, num_beams=1,
                         max_new_tokens=6)
    assert out == [{**record, "output": model.tokenizer.decode(ids[0], skip_special_tokens=True,
                                                               clean_up_tokenization_spaces=False).strip()}]


def test_a_record_without_bos_is_tokenized_without_it_alone_or_in_a_batch(make_model):
    """`bos: false` (a template's, carried by its prompt records) drops the LM's beginning-of-sequence
    token; a batch mixing both decodes each record as it decodes alone."""
    import pytest

    from flamingo_cli.errors import FlamingoError
    from flamingo_cli.inference.generation import tokenize_prompts

    from conftest import add_bos

    model = make_model("llama", gates=0.0)
    add_bos(model.tokenizer)
    bos = model.tokenizer.bos_token_id
    texts = ["What shape is it?", "a red circle on a blue background. What colour is it?"]
    assert tokenize_prompts(model, texts[:1]).input_ids[0][0] == bos
    assert tokenize_prompts(model, texts[:1], bos=False).input_ids[0][0] != bos
    records = [{"id": "a", "prompt": texts[0], "media": [], "bos": False}, {"id": "b", "prompt": texts[1], "media": []}]
    media = MediaResolver(model)
    alone = [generate_records(model, [r], media, num_beams=1, max_new_tokens=6)[0] for r in records]
    assert generate_records(model, records, media, num_beams=1, max_new_tokens=6) == alone
    with_bos = generate_records(model, [{**records[0], "bos": True}], media, num_beams=1, max_new_tokens=6)[0]
    ids = model.generate(model.tokenizer(texts[0], add_special_tokens=False, return_tensors="pt").input_ids, None,
                         num_beams=1, max_new_tokens=6)
    assert alone[0]["output"] == model.tokenizer.decode(ids[0], skip_special_tokens=True).strip() != with_bos["output"]
    with pytest.raises(FlamingoError, match="^a: 'bos' must be true or false$"):
        generate_records(model, [{**records[0], "bos": "no"}], media, num_beams=1, max_new_tokens=6)
