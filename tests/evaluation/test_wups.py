"""WUPS (NExT-QA's open-ended metric) over a tiny WordNet, tagger and Punkt tables built below.

Wu-Palmer by hand, as NLTK defines it: 2·d / (len1 + len2) with d = depth(lcs) + 1 and len_i =
d + the synset's distance to the lcs. dog, cat: lcs animal (depth 1), d = 2, 4 / (3 + 3) = 2/3;
dog, puppy: lcs dog (depth 2), d = 3, 6 / (3 + 4) = 6/7; puppy, cat: 4 / (4 + 3) = 4/7;
ball (depth 3), cat: lcs entity, d = 1, 2 / (4 + 3) = 2/7.
"""
import json
import os
import subprocess
import sys

import pytest

from flamingo_cli.evaluation.evaluate import evaluate_records
from flamingo_cli.evaluation.wups import Wups, nextqa_summary
from flamingo_cli.formats.artifacts import ArtifactError

FLAMINGO = [sys.executable, "-c", "from flamingo_cli.cli import main; main()"]


# A tiny WordNet 3.0-format database: (name, pos, lemmas, hypernyms). Depths below entity:
# animal 1, dog/cat 2, puppy 3; object 1, toy 2, ball 3; verbs play and run, each their own root.
SYNSETS = [
    ("entity", "n", ["entity"], []),
    ("animal", "n", ["animal"], ["entity"]),
    ("dog", "n", ["dog"], ["animal"]),
    ("cat", "n", ["cat"], ["animal"]),
    ("puppy", "n", ["puppy"], ["dog"]),
    ("mouse", "n", ["mouse"], ["animal"]),
    ("object", "n", ["object"], ["entity"]),
    ("toy", "n", ["toy", "plaything"], ["object"]),
    ("ball", "n", ["ball"], ["toy"]),
    ("play", "v", ["play"], []),
    ("run", "v", ["run"], []),
    ("happy", "a", ["happy"], []),
    ("quickly", "r", ["quickly"], []),
]
EXCEPTIONS = {"noun": ["mice mouse"], "verb": ["ran run"], "adj": [], "adv": []}
HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n" \
         "  2 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.\n"
FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

# Tagged sentences for a tiny perceptron tagger: every word is seen often enough with one tag to
# enter its tag dictionary, so tags are fixed whatever the training shuffle does.
TAGGED = [
    "the/DT dog/NN is/VBZ playing/VBG with/IN a/DT ball/NN",
    "two/CD dogs/NNS play/VBP with/IN the/DT toy/NN",
    "the/DT cat/NN ran/VBD quickly/RB after/IN the/DT mice/NNS",
    "a/DT puppy/NN runs/VBZ to/TO the/DT object/NN happily/RB",
    "he/PRP is/VBZ happy/JJ",
    "yes/UH", "no/DT", "three/CD", "balls/NNS", "cats/NNS", "running/VBG", "toys/UH",
]


def write_wordnet(root):
    root.mkdir(parents=True)
    (root / "lexnames").write_text("00\tadj.all\t3\n01\tadv.all\t4\n02\tnoun.Tops\t1\n03\tverb.body\t2\n")
    by_pos = {p: [s for s in SYNSETS if s[1] == p] for p in FILES}
    lexfile = {"a": 0, "r": 1, "n": 2, "v": 3}
    offsets = {}
    for pos, synsets in by_pos.items():
        def line(s, offset_of, pos=pos):
            name, _, lemmas, hypernyms = s
            words = " ".join(f"{w} 0" for w in lemmas)
            pointers = " ".join(f"@ {offset_of(h):08d} {pos} 0000" for h in hypernyms)
            frames = " 00" if pos == "v" else ""
            return (f"{offset_of(name):08d} {lexfile[pos]:02d} {pos} {len(lemmas):02x} {words} "
                    f"{len(hypernyms):03d}{' ' + pointers if pointers else ''}{frames} | {name}  \n")
        at = len(HEADER)
        for s in synsets:  # offsets are fixed width, so lengths do not depend on their values
            offsets[s[0]] = at
            at += len(line(s, lambda _: 0))
        (root / f"data.{FILES[pos]}").write_text(HEADER + "".join(line(s, offsets.__getitem__) for s in synsets))
        index = {}
        for name, _, lemmas, _ in synsets:
            for lemma in lemmas:
                index.setdefault(lemma, []).append(offsets[name])
        (root / f"index.{FILES[pos]}").write_text(HEADER + "".join(
            f"{lemma} {pos} {len(offs)} 0 {len(offs)} 0 {' '.join(f'{o:08d}' for o in offs)}  \n"
            for lemma, offs in sorted(index.items())))
        (root / f"{FILES[pos]}.exc").write_text("".join(f"{e}\n" for e in EXCEPTIONS[FILES[pos]]))
    (root / "index.sense").write_text("")


def write_tagger(root):
    import nltk
    from nltk.tag.perceptron import PerceptronTagger

    sentences = [[tuple(pair.rsplit("/", 1)) for pair in s.split()] for s in TAGGED] * 25
    tagger = PerceptronTagger(load=False)
    tagger.train(sentences, nr_iter=2)
    root.mkdir(parents=True)
    path = list(nltk.data.path)
    nltk.data.path.insert(0, str(root.parents[1]))  # NLTK writes models only under its data path
    try:
        tagger.save_to_json(lang="eng", loc=str(root))
    finally:
        nltk.data.path[:] = path


def write_punkt(root):
    root.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (root / name).write_text("")


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory):
    """A directory for NLTK_DATA holding a tiny WordNet, tagger and Punkt tables."""
    root = tmp_path_factory.mktemp("nltk_data")
    write_wordnet(root / "corpora" / "wordnet")
    write_tagger(root / "taggers" / "averaged_perceptron_tagger_eng")
    write_punkt(root / "tokenizers" / "punkt_tab" / "english")
    return root


@pytest.fixture
def wups(nltk_data, monkeypatch):
    import nltk

    from flamingo_cli.evaluation.wups import Wups

    monkeypatch.setattr(nltk.data, "path", [str(nltk_data)])
    return Wups.load()


@pytest.mark.parametrize("answer,normalised", [
    ("The dogs are playing with the balls", "dog play ball"),  # morphy by tag; stopwords dropped
    ("the cat ran quickly after the mice", "cat run quickly after mouse"),  # exception lists; 'after' is kept
    ("running", "run"),  # no lemma in WordNet, so its Porter stem, which is
    ("happily", "happily"),  # neither: the word itself
    ("He is happy", "happy"),
    ("toys", "toy"),  # a tag with no WordNet part of speech: the lone word is tagged again, else a noun
])
def test_normalisation_lemmatises_and_drops_nextqa_stopwords(wups, answer, normalised):
    assert wups.normalize(answer) == normalised


def test_word_and_set_similarity_by_hand(wups):
    assert wups.word_similarity("dog", "cat", 0.0) == pytest.approx(2 / 3)
    assert wups.word_similarity("dog", "cat", 0.9) == pytest.approx(0.1 * 2 / 3)  # below the threshold
    assert wups.word_similarity("dog", "puppy", 0.0) == pytest.approx(6 / 7)
    assert wups.word_similarity("zebra", "zebra", 0.9) == 1.0  # equal words, even unknown ones
    assert wups.word_similarity("zebra", "cat", 0.0) == 0.0  # no synset
    assert wups.set_similarity(["dog", "zebra"], ["cat"], 0.0) == pytest.approx(2 / 3)  # zebra's 0 is skipped
    assert wups.set_similarity(["zebra"], ["cat"], 0.0) == 0.0
    # dog ball -> cat: (2/3)(2/7); cat -> dog ball: max(2/3, 2/7); the pair takes the smaller
    assert wups.similarity("dog ball", "cat", 0.0) == pytest.approx(4 / 21)
    assert wups.similarity("cat", "dog ball", 0.0) == pytest.approx(4 / 21)


def test_score_takes_the_best_reference_and_exact_match_for_counts_and_yes_no(wups):
    scores = wups.score("the puppy", ["cat", "a dog"], "CW")
    assert scores[0.0] == pytest.approx(6 / 7) and scores[0.9] == pytest.approx(0.6 / 7)
    assert wups.score("Dogs", ["the dog"], "DO") == {0.0: 1.0, 0.9: 1.0}
    assert wups.score("three", ["three"], "DC") == {0.0: 1.0, 0.9: 1.0}
    assert wups.score("a dog", ["cat"], "DB") == {0.0: 0.0, 0.9: 0.0}  # DB/DC: exact, never WUPS
    assert wups.score("no", ["yes", "no"], "DB") == {0.0: 1.0, 0.9: 1.0}


def test_summary_groups_types_as_nextqa_does():
    types = ["CW", "CH", "TP", "TN", "DC"]
    scores = [{0.0: s, 0.9: s / 2} for s in (1.0, 0.5, 0.25, 0.75, 0.0)]
    table = nextqa_summary(types, scores)
    assert table["wups0"] == pytest.approx(50.0) and table["wups9"] == pytest.approx(25.0)
    assert table["by_group"] == {"WUPS_C": pytest.approx(75.0), "WUPS_D": 0.0, "WUPS_T": pytest.approx(50.0)}
    assert table["by_type"] == {"CH": 50.0, "CW": 100.0, "DC": 0.0, "TN": 50.0}  # TP counts as TN


def test_evaluate_records_wups(wups, nltk_data, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(nltk_data)])
    records = [{"id": "a", "output": "the puppy Question: why", "answers": ["a dog"], "type": "CW"},
               {"id": "b", "output": "three", "answers": ["three"], "type": "DC"}]
    from flamingo_cli.evaluation.evaluate import PostProcess

    summary, rows = evaluate_records(records, "wups", post=PostProcess(cut=["Question"]))
    assert summary["score"] == pytest.approx(100 * (6 / 7 + 1) / 2)
    assert summary["wups9"] == pytest.approx(100 * (0.6 / 7 + 1) / 2)
    assert summary["by_group"] == {"WUPS_C": pytest.approx(600 / 7), "WUPS_D": 100.0}
    assert rows[0] == {"id": "a", "prediction": "the puppy", "type": "CW", "score": pytest.approx(6 / 7),
                       "wups9": pytest.approx(0.6 / 7)}
    with pytest.raises(ArtifactError, match=r"a: wups needs the question's 'type'"):
        evaluate_records([{"id": "a", "output": "dog", "answers": ["dog"]}], "wups")


def test_missing_nltk_data_is_named_with_the_command_that_fetches_it(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(ArtifactError, match=r"wups needs NLTK data not found in .*: wordnet, "
                       r"averaged_perceptron_tagger_eng, punkt_tab \(fetch once with: python -m nltk.downloader "
                       r"wordnet averaged_perceptron_tagger_eng punkt_tab"):
        Wups.load()


def test_cli_scores_nextqa_records_and_says_what_data_is_missing(nltk_data, tmp_path):
    records = "".join(json.dumps(r) + "\n" for r in [
        {"id": "nextqa-1-0", "output": "dogs", "answers": ["the dog", "puppy"], "type": "TC"},
        {"id": "nextqa-1-1", "output": "cat", "answers": ["a dog"], "type": "CH"}])
    env = {**os.environ, "NLTK_DATA": str(nltk_data)}
    r = subprocess.run([*FLAMINGO, "evaluate", "--metric", "wups"], input=records, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["metric"], summary["n"]) == ("wups", 2)
    assert summary["score"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert summary["by_type"] == {"CH": pytest.approx(200 / 3), "TC": 100.0}
    env = {**os.environ, "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([*FLAMINGO, "evaluate", "--metric", "wups"], input=records, capture_output=True,
                       text=True, env=env)
    assert r.returncode != 0 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "python -m nltk.downloader" in r.stderr
