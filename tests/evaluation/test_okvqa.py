"""OK-VQA v1.1's answer stemming (flamingo_cli.evaluation.okvqa) over test_wups.py's tiny WordNet,
tagger and Punkt tables, plus the exception "running run" of WordNet's verb.exc.

By hand, through OpenFlamingo's rules: "dogs" is tagged NNS, so inflection singularises it; "running"
ends in "ing", so it becomes its WordNet verb lemma (morphy's exception list: run); "playing" too
(morphy's rule strips "ing": play); "swimming" has no lemma and stays; "toys" is tagged UH (the
tiny tagger's choice), not NNS, so it stays plural; the manual table wins over both rules.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
from test_wups import nltk_data  # noqa: F401  (the session's tiny NLTK data, reused)

from flamingo_cli.evaluation.evaluate import PostProcess, evaluate_records
from flamingo_cli.evaluation.okvqa import MANUAL_MATCHES, OkvqaStemmer
from flamingo_cli.formats.artifacts import ArtifactError

FLAMINGO = [sys.executable, "-c", "from flamingo_cli.cli import main; main()"]


@pytest.fixture(scope="session")
def okvqa_nltk_data(nltk_data, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("okvqa") / "nltk_data"
    shutil.copytree(nltk_data, root)
    with open(root / "corpora" / "wordnet" / "verb.exc", "a") as f:
        f.write("running run\n")
    return root


@pytest.fixture
def stemmer(okvqa_nltk_data, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(okvqa_nltk_data)])
    return OkvqaStemmer.load()


@pytest.mark.parametrize("text, stemmed", [
    ("dogs", "dog"),  # NNS: singular
    ("running", "run"),  # -ing: WordNet's verb lemma, from the exception list
    ("playing", "play"),  # -ing: morphy's rule
    ("swimming", "swimming"),  # -ing with no lemma: itself
    ("toys", "toys"),  # tagged UH: no rule applies
    ("christmas", "christmas"),  # the table: inflection alone would make it "christma"
    ("leaves", "leaf"),
    ("clothing", "cloth"),  # the table before the -ing rule
    ("the dogs are running", "the dog are run"),  # "are" is in the table too
    ("", ""),
])
def test_stemming_by_hand(stemmer, text, stemmed):
    assert stemmer(text) == stemmed


def test_the_manual_table_is_okvqas():
    import inflection

    assert len(MANUAL_MATCHES) == 168
    assert inflection.singularize("christmas") == "christma"  # why the table keeps it
    assert {k: MANUAL_MATCHES[k] for k in ("jeans", "hell's", "morning", "tennis", "pudding", "earing")} == {
        "jeans": "jean", "hell's": "hell", "morning": "morn", "tennis": "tennis", "pudding": "pud", "earing": "ear"}


def test_evaluate_records_stems_after_the_cut(stemmer):
    records = [{"id": "a", "output": "dogs Question: what", "answers": ["dog"] * 10},
               {"id": "b", "output": "running", "answers": ["run"] * 3 + ["jog"] * 7}]
    summary, rows = evaluate_records(records, "vqa", post=PostProcess(cut=["Question"], stem=stemmer))
    assert [row["prediction"] for row in rows] == ["dog", "run"]
    assert summary["score"] == pytest.approx(100 * (1 + 0.9) / 2)
    assert evaluate_records(records, "vqa", post=PostProcess(cut=["Question"]))[0]["score"] == 0.0


def test_cli_okvqa_preset_stems_and_missing_data_is_one_line(okvqa_nltk_data, tmp_path):
    records = "".join(json.dumps(r) + "\n" for r in [
        {"id": "okvqa-1", "output": "leaves Short answer: tree", "answers": ["leaf"] * 10, "answer_type": "other"},
        {"id": "okvqa-2", "output": "dogs", "answers": ["dog"] * 10, "answer_type": "other"}])
    env = {**os.environ, "NLTK_DATA": str(okvqa_nltk_data)}
    r = subprocess.run([*FLAMINGO, "evaluate", "-c", "okvqa"], input=records, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["score"] == 100.0 and summary["okvqa_stem"] is True
    assert summary["by_answer_type"] == {"other": {"accuracy": 100.0, "n": 2}}
    r = subprocess.run([*FLAMINGO, "evaluate", "-c", "okvqa", "--no-okvqa-stem"], input=records, capture_output=True,
                       text=True, env=env)
    assert json.loads(r.stdout)["score"] == 0.0
    env = {**os.environ, "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([*FLAMINGO, "evaluate", "-c", "okvqa"], input=records, capture_output=True, text=True, env=env)
    assert r.returncode == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("Error: OK-VQA stemming needs NLTK data not found in ")
    assert "python -m nltk.downloader" in line


def test_missing_nltk_data_names_the_stemmer(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(ArtifactError, match=r"^OK-VQA stemming needs NLTK data not found in .*: wordnet, "
                       r"averaged_perceptron_tagger_eng, punkt_tab \(fetch once with: python -m nltk.downloader"):
        OkvqaStemmer.load()
