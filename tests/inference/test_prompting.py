import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flamingo_cli.errors import FlamingoError
from flamingo_cli.inference.prompting import (
    Template,
    build_prompt,
    load_template,
    make_prompt_record,
    media_entry,
    render,
    select_shots,
)

EOC = "<|endofchunk|>"
ROOT = Path(__file__).resolve().parents[2]


def support_set(n=10):
    return [{"id": f"s{i}", "image": f"/img/s{i}.jpg", "caption": f"caption {i}"} for i in range(n)]


# -- templates ---------------------------------------------------------------------------

RECORD = {
    "id": "r1",
    "caption": "A dog on a beach.",
    "question": "What colour is the bus?",
    "answer": "red",
    "label": "yes",
    "text": "look at this",
}


@pytest.mark.parametrize(
    "name, shot, query",
    [
        ("captioning", f"<image>Output: A dog on a beach.{EOC}", "<image>Output:"),
        (
            "vqa",
            f"<image>Question: What colour is the bus? Answer: red{EOC}",
            "<image>Question: What colour is the bus? Answer:",
        ),
        ("classification", f"<image>Output: yes{EOC}", "<image>Output:"),
        (
            "hatefulmemes",
            f'<image>is an image with written: "look at this" on it. Is it hateful? Answer: yes{EOC}',
            '<image>is an image with written: "look at this" on it. Is it hateful? Answer:',
        ),
        # OpenFlamingo's own evaluation prompts, newline-joined, for its imported weights
        ("openflamingo-captioning", f"<image>Output:A dog on a beach.{EOC}\n", "<image>Output:"),
        (
            "openflamingo-vqa",
            f"<image>Question:What colour is the bus? Short answer:red{EOC}\n",
            "<image>Question:What colour is the bus? Short answer:",
        ),
    ],
)
def test_shipped_templates_render_the_paper_prompts(name, shot, query):
    template = load_template(name)
    assert template.name == name
    assert render(template.shot, RECORD, name) == shot
    assert render(template.query, RECORD, name) == query


def test_shipped_template_answers_and_candidates():
    answers = {n: load_template(n).answer for n in ("captioning", "vqa", "classification", "hatefulmemes")}
    assert answers == {"captioning": "caption", "vqa": "answer", "classification": "label", "hatefulmemes": "label"}
    hateful = load_template("hatefulmemes")
    # Quoted in the YAML: bare yes/no would load as booleans.
    assert hateful.candidates == ["yes", "no"]
    assert hateful.continuation == f" {{candidate}}{EOC}"
    assert load_template("vqa").candidates is None


def test_unknown_template_lists_the_available_ones():
    with pytest.raises(FlamingoError) as e:
        load_template("nope")
    message = str(e.value)
    assert message.startswith("nope: unknown prompt preset (available: ")
    for name in ("captioning", "vqa", "classification", "hatefulmemes"):
        assert name in message


def test_template_from_a_yaml_file(tmp_path):
    path = tmp_path / "short_vqa.yaml"
    path.write_text('shot: "<image>Q: {question} A: {answer}<|endofchunk|>"\nquery: "<image>Q: {question} A:"\nanswer: answer\n')
    template = load_template(str(path))
    # Named by its path, so a prompt record's `template` field loads it again.
    assert load_template(template.name) == template
    assert template == Template(
        name=str(path), shot="<image>Q: {question} A: {answer}<|endofchunk|>", query="<image>Q: {question} A:", answer="answer"
    )


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ('shot: "<image>{a}"\nquery: "<image>"\nanswer: a\nprompt: x\n', "unknown key 'prompt'"),
        ('shot: "<image>{a}"\nanswer: a\n', "missing key 'query'"),
        ('shot: "<image>{a}<image>"\nquery: "<image>"\nanswer: a\n', "shot must contain exactly one <image> (found 2)"),
        ('shot: "<image>{a}"\nquery: "x"\nanswer: a\n', "query must contain exactly one <image> (found 0)"),
        ('shot: "<image>{a}"\nquery: "<image>{}"\nanswer: a\n', "query: placeholder {} is not a plain {field} name"),
        ('shot: "<image>{a}"\nquery: "<image>"\nanswer: b\n', "shot does not use the answer field {b}"),
        ('shot: "<image>{a}"\nquery: "<image>"\nanswer: a\ncandidates: [yes, no]\n', "candidates must be a non-empty list of strings"),
        ('shot: "<image>{a}"\nquery: "<image>"\nanswer: a\nprefix: "Task: {a}"\n', "prefix is plain text"),
        ('shot: "<image>{a}"\nquery: "<image>"\nanswer: a\nprefix: "<image>"\n', "prefix is plain text"),
        ('shot: "<image>{a}"\nquery: "<image>"\nanswer: a\nbos: maybe\n', "bos must be true or false"),
        ("- a list\n", "expected a mapping"),
        ("shot: [unclosed\n", "invalid YAML"),
    ],
)
def test_bad_template_files_name_the_file_and_problem(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(FlamingoError) as e:
        load_template(str(path))
    assert str(e.value).startswith(f"{path}: ")
    assert expected in str(e.value)
    assert f"template {path}" not in str(e.value)
    assert "\n" not in str(e.value)


def test_template_checks_apply_to_direct_construction():
    with pytest.raises(FlamingoError, match=r"^template t: continuation must use \{candidate\} once and no other field$"):
        Template(name="t", shot="<image>{a}", query="<image>", answer="a", continuation=" {candidate} {a}")
    with pytest.raises(FlamingoError, match=r"^template t: continuation must use"):
        Template(name="t", shot="<image>{a}", query="<image>", answer="a", continuation=" x")


# -- rendering ---------------------------------------------------------------------------

def test_missing_field_names_record_template_and_field():
    with pytest.raises(FlamingoError) as e:
        render(load_template("vqa").query, {"id": "rec-7", "image": "x.jpg"}, "vqa")
    assert str(e.value) == "rec-7: template vqa needs field 'question'"


def test_braces_in_record_values_stay_literal():
    record = {"id": 1, "question": "what is {x} and {} and {0}?", "answer": "{answer}"}
    assert render("Q: {question} A: {answer}", record, "vqa") == "Q: what is {x} and {} and {0}? A: {answer}"


def test_values_are_rendered_with_str():
    assert render("{a} {b} {c}", {"id": 1, "a": 3, "b": None, "c": [1, "x"]}, "t") == "3 None [1, 'x']"


def test_media_marker_inside_a_value_is_an_error():
    with pytest.raises(FlamingoError, match=r"^r: field 'caption' contains the media marker <image>$"):
        render("<image>{caption}", {"id": "r", "caption": "a <image> b"}, "captioning")


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"visual": "v.st#visual", "features": "f.st#features", "image": "i.jpg", "video": "v.mp4"}, "v.st#visual"),
        ({"features": "f.st#features", "image": "i.jpg", "video": "v.mp4"}, "f.st#features"),
        ({"image": "i.jpg", "video": "v.mp4"}, "i.jpg"),
        ({"video": "v.mp4"}, "v.mp4"),
    ],
)
def test_media_entry_precedence(fields, expected):
    assert media_entry({"id": "m", **fields}) == expected


def test_media_entry_without_media():
    with pytest.raises(FlamingoError) as e:
        media_entry({"id": "m", "caption": "x"})
    assert str(e.value) == "m: no media (expected a visual, features or image field)"


# -- shot selection ----------------------------------------------------------------------

def test_first_takes_the_first_eligible_and_skips_the_query():
    support = support_set(6)
    assert select_shots({"id": "s1"}, support, 3, "first", 0) == [0, 2, 3]
    assert select_shots({"id": "q"}, support, 3, "first", 0) == [0, 1, 2]


def test_k_zero_and_bad_arguments():
    support = support_set(3)
    assert select_shots({"id": "q"}, support, 0, "random", 0) == []
    with pytest.raises(ValueError, match="unknown shot selection method 'nearest'"):
        select_shots({"id": "q"}, support, 1, "nearest", 0)
    with pytest.raises(ValueError):
        select_shots({"id": "q"}, support, -1, "first", 0)


@pytest.mark.parametrize("method", ["first", "random"])
def test_more_shots_than_available_says_how_many(method):
    with pytest.raises(FlamingoError) as e:
        select_shots({"id": "s0"}, support_set(4), 4, method, 0)
    assert str(e.value) == "s0: 4 support examples needed but only 3 available (the query's own id excluded)"


def test_ids_compare_as_text():
    support = [{"id": 7}, {"id": "8"}]
    assert select_shots({"id": "7"}, support, 1, "first", 0) == [1]


def test_random_picks_distinct_eligible_shots():
    support = support_set(10)
    for i in range(10):
        shots = select_shots({"id": f"s{i}"}, support, 9, "random", 3)
        assert sorted(shots) == [j for j in range(10) if j != i]


def test_random_depends_only_on_seed_and_query_id():
    support = support_set(50)
    alone = select_shots({"id": "q7"}, support, 4, "random", 1)
    # Other queries first, in another order, and a disturbed global random state.
    import random

    random.seed(123)
    for qid in ["q9", "q3", "q1", "q8"]:
        select_shots({"id": qid}, support, 4, "random", 1)
    assert select_shots({"id": "q7", "caption": "other fields do not matter"}, support, 4, "random", 1) == alone
    assert select_shots({"id": "q7"}, support, 4, "random", 2) != alone
    picks = {tuple(select_shots({"id": f"q{i}"}, support, 4, "random", 1)) for i in range(20)}
    assert len(picks) >= 18


def test_random_is_the_same_in_another_process():
    support = support_set(50)
    here = {qid: select_shots({"id": qid}, support, 5, "random", 42) for qid in ["a", "b", 17]}
    code = (
        "import json, sys\n"
        "from flamingo_cli.inference.prompting import select_shots\n"
        "support = [{'id': f's{i}'} for i in range(50)]\n"
        "print(json.dumps([select_shots({'id': q}, support, 5, 'random', 42) for q in ['a', 'b', 17]]))\n"
    )
    # A different hash seed would change anything that leaned on hash().
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert json.loads(out.stdout) == [here["a"], here["b"], here[17]]


def test_rices_orders_by_increasing_cosine_similarity():
    support = support_set(5)
    query_vector = torch.tensor([1.0, 0.0])
    support_vectors = torch.tensor(
        [
            [0.0, 1.0],  # orthogonal
            [100.0, 90.0],  # long but less aligned: cosine, not dot product
            [1.0, 0.1],  # most similar
            [-1.0, 0.0],  # opposite
            [1.0, 0.5],
        ]
    )
    shots = select_shots({"id": "q"}, support, 3, "rices", 0, query_vector=query_vector, support_vectors=support_vectors)
    assert shots == [1, 4, 2]


def test_rices_excludes_the_query_and_breaks_ties_by_index():
    support = support_set(5)
    support_vectors = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    query_vector = torch.tensor([1.0, 0.0])
    # s2 is an exact match but is the query itself; of the tied rest, the lower indices win.
    shots = select_shots(
        {"id": "s2"}, support, 2, "rices", 0, query_vector=query_vector, support_vectors=support_vectors
    )
    assert shots == [3, 1]


def test_rices_needs_vectors_of_the_right_shape():
    support = support_set(3)
    with pytest.raises(ValueError, match="rices needs query_vector and support_vectors"):
        select_shots({"id": "q"}, support, 1, "rices", 0)
    with pytest.raises(ValueError, match=r"rices needs query_vector \(d,\) and support_vectors \(3, d\)"):
        select_shots({"id": "q"}, support, 1, "rices", 0, query_vector=torch.ones(4), support_vectors=torch.ones(2, 4))


# -- prompts -----------------------------------------------------------------------------

def test_build_prompt_few_shot():
    template = load_template("captioning")
    shots = support_set(3)[:2]
    query = {"id": "q", "visual": "/v.st#visual", "image": "/q.jpg"}
    text, media = build_prompt(template, query, shots)
    assert text == f"<image>Output: caption 0{EOC}<image>Output: caption 1{EOC}<image>Output:"
    assert media == ["/img/s0.jpg", "/img/s1.jpg", "/v.st#visual"]


@pytest.mark.parametrize("k", [1, 4, 8])
def test_one_image_marker_per_media_entry(k):
    template = load_template("vqa")
    support = [{"id": i, "image": f"{i}.jpg", "question": "q?", "answer": "a"} for i in range(10)]
    record = make_prompt_record(template, {"id": "q", "image": "q.jpg", "question": "q?"}, support, k=k, method="random", seed=0)
    assert record["prompt"].count("<image>") == len(record["media"]) == k + 1


def test_zero_shot_uses_text_only_examples():
    template = load_template("captioning")
    examples = [
        {"id": "e1", "image": "/e1.jpg", "caption": "This is a cat wearing sunglasses."},
        {"id": "e2", "image": "/e2.jpg", "caption": "Three elephants."},
    ]
    text, media = build_prompt(template, {"id": "q", "image": "/q.jpg"}, [], zero_shot_examples=examples)
    assert text == f"Output: This is a cat wearing sunglasses.{EOC}Output: Three elephants.{EOC}<image>Output:"
    assert media == ["/q.jpg"]
    with pytest.raises(ValueError):
        build_prompt(template, {"id": "q", "image": "/q.jpg"}, examples, zero_shot_examples=examples)


def test_a_prefix_begins_every_prompt_and_bos_false_is_the_records_to_carry():
    template = Template(name="t", shot="<image>{a}|", query="<image>", answer="a", prefix="Task: name it.\n",
                        bos=False)
    support = [{"id": i, "image": f"{i}.jpg", "a": f"x{i}"} for i in range(3)]
    few = make_prompt_record(template, {"id": "q", "image": "q.jpg", "bos": True}, support, k=2, method="first",
                             seed=0)
    assert few["prompt"] == "Task: name it.\n<image>x0|<image>x1|<image>" and few["bos"] is False
    zero = make_prompt_record(template, {"id": "q", "image": "q.jpg"}, support, k=0, method="first", seed=0)
    assert zero["prompt"] == "Task: name it.\nx0|x1|<image>" and zero["bos"] is False
    plain = Template(name="u", shot="<image>{a}", query="<image>", answer="a")
    again = make_prompt_record(plain, few, support, k=1, method="first", seed=0)
    assert "bos" not in again  # a template with a BOS drops an earlier prompt's false


def test_make_prompt_record_zero_shot():
    template = load_template("captioning")
    support = support_set(5)
    record = make_prompt_record(template, {"id": "s0", "image": "/q.jpg"}, support, k=0, method="first", seed=0)
    assert record["prompt"] == f"Output: caption 1{EOC}Output: caption 2{EOC}<image>Output:"
    assert record["media"] == ["/q.jpg"]
    assert record["shots"] == ["s1", "s2"]


def test_make_prompt_record_passes_fields_through_and_mutates_nothing():
    template = load_template("captioning")
    support = support_set(6)
    query = {"id": "q", "image": "/q.jpg", "foo": {"bar": 1}, "caption": "held-out answer"}
    vectors = torch.eye(6)
    query_vector = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5, 0.0])
    before = copy.deepcopy((query, support))
    record = make_prompt_record(
        template, query, support, k=2, method="rices", seed=0, query_vector=query_vector, support_vectors=vectors
    )
    assert record == {
        "id": "q",
        "image": "/q.jpg",
        "foo": {"bar": 1},
        "caption": "held-out answer",
        "prompt": f"<image>Output: caption 4{EOC}<image>Output: caption 2{EOC}<image>Output:",
        "media": ["/img/s4.jpg", "/img/s2.jpg", "/q.jpg"],
        "shots": ["s4", "s2"],
        "template": "captioning",
    }
    assert (query, support) == before
    assert torch.equal(vectors, torch.eye(6))


def test_make_prompt_record_random_shots_in_prompt_order():
    template = load_template("captioning")
    support = support_set(20)
    record = make_prompt_record(template, {"id": "q", "image": "/q.jpg"}, support, k=4, method="random", seed=5)
    expected_ids = [support[i]["id"] for i in select_shots({"id": "q"}, support, 4, "random", 5)]
    assert record["shots"] == expected_ids
    assert record["media"][:-1] == [f"/img/{i}.jpg" for i in expected_ids]


def test_import_does_not_load_torch():
    code = "import sys, flamingo_cli.inference.prompting; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


# -- prompt ensembling --------------------------------------------------------------------

def test_ensembles_are_orders_of_the_same_shots_drawn_from_seed_and_query_id():
    from flamingo_cli.inference.prompting import make_prompt_records

    template, support, query = load_template("hatefulmemes"), support_set(), {"id": "q", "image": "/q.jpg",
                                                                              "text": "hi", "label": "no"}
    for row in support:
        row.update(text="t", label="yes")
    records = make_prompt_records(template, query, support, k=3, method="random", seed=5, ensembles=6)
    assert [r["ensemble"] for r in records] == list(range(6))  # 3! = 6 orders
    assert records[0]["shots"] == make_prompt_record(template, query, support, k=3, method="random", seed=5)["shots"]
    orders = [tuple(r["shots"]) for r in records]
    assert len(set(orders)) == 6 and len({frozenset(o) for o in orders}) == 1
    for r in records:  # the prompt follows its order
        assert r["media"] == [f"/img/{s}.jpg" for s in r["shots"]] + ["/q.jpg"]
    assert make_prompt_records(template, query, support, k=3, method="random", seed=5, ensembles=6) == records
    other_seed = make_prompt_records(template, query, support, k=3, method="random", seed=6, ensembles=6)
    assert [r["shots"] for r in other_seed] != [r["shots"] for r in records]
    assert len(make_prompt_records(template, query, support, k=2, method="random", seed=5, ensembles=6)) == 2
    zero = make_prompt_records(template, query, support, k=0, method="random", seed=5, ensembles=6)
    assert len(zero) == 2 and all(r["prompt"].count("<image>") == 1 for r in zero)
    single = make_prompt_records(template, query, support, k=3, method="random", seed=5)
    assert len(single) == 1 and "ensemble" not in single[0]
