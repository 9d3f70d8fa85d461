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
