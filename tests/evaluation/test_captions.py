"""The caption metric suite: hand-computed BLEU and ROUGE-L, the pure-Python scorers against
pycocoevalcap's on the same tokens, and the pycocoevalcap (Java) path against pycocoevalcap
called directly. Tests that need Java skip, saying so, where `java` is not on PATH."""
from __future__ import annotations

import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_cli.evaluation import captions
from flamingo_cli.evaluation.captions import bleu, caption_metrics, rouge_l
from flamingo_cli.evaluation.metrics import cider_d, ptb_tokenize
from flamingo_cli.formats.artifacts import ArtifactError

JAVA = shutil.which("java")
needs_java = pytest.mark.skipif(JAVA is None, reason="no `java` on PATH: the pycocoevalcap path (PTB tokenizer, "
                                "METEOR, SPICE) needs a JRE (Debian: apt-get install default-jre-headless)")


def words(corpus: dict[str, str]) -> dict[str, list[str]]:
    return {i: text.split() for i, text in corpus.items()}


# -- BLEU by hand ---------------------------------------------------------------------------------

def test_bleu_by_hand():
    """Image 1: "the cat sat on the mat" against "the cat is on the mat" and "there is a cat on
    the mat". Clipped matches / candidate n-grams: unigrams the x2 (a reference has two), cat,
    on, mat = 5/6; bigrams "the cat", "on the", "the mat" = 3/5; trigrams "on the mat" = 1/4;
    4-grams 0/3. Lengths 6 and 6 (the closest reference): no brevity penalty. BLEU-n is the
    geometric mean of the first n precisions: 5/6, sqrt(5/6 * 3/5) = sqrt(1/2), (1/8)^(1/3) = 1/2;
    BLEU-4 is not 0: bleu_scorer adds 1e-15 to a count (and 1e-9 to its denominator), so it is
    (1/8 * 1e-15/3)^(1/4) = 8.03e-5.
    Image 2: "a dog" against "a dog runs fast", "the dog": unigrams 2/2, bigrams 1/1, and no
    trigram or 4-gram to count, each (0 + 1e-15) / (0 + 1e-9) = 1e-6: BLEU-3 (1e-6)^(1/3) = 0.01,
    BLEU-4 (1e-12)^(1/4) = 1e-3. The closest reference has 2 words: no penalty.
    The corpus sums counts and lengths before dividing: 7/8, 4/6, 1/4, 0/3 over 8 words against 8."""
    cands = words({"1": "the cat sat on the mat", "2": "a dog"})
    refs = {"1": [s.split() for s in ("the cat is on the mat", "there is a cat on the mat")],
            "2": [s.split() for s in ("a dog runs fast", "the dog")]}
    corpus, per_image = bleu(cands, refs)
    assert per_image["1"] == pytest.approx([5 / 6, math.sqrt(1 / 2), 1 / 2, (1e-15 / 24) ** 0.25], rel=1e-8)
    assert per_image["1"][3] == pytest.approx(8.034e-5, rel=1e-3)
    assert per_image["2"] == pytest.approx([1.0, 1.0, 0.01, 1e-3], rel=1e-8)
    assert corpus == pytest.approx([7 / 8, math.sqrt(7 / 8 * 4 / 6), (7 / 8 * 4 / 6 * 1 / 4) ** (1 / 3),
                                    (7 / 8 * 4 / 6 * 1 / 4 * 1e-15 / 3) ** (1 / 4)], rel=1e-8)


def test_bleu_reference_length_is_the_closest_shorter_on_a_tie():
    # 3 words against references of 2 and 4: both 1 away, the shorter counts, so no penalty
    # (the longer would give exp(1 - 4/3) = 0.72). Every candidate unigram is in a reference.
    corpus, per_image = bleu(words({"1": "a cat sat"}), {"1": [["a", "cat"], ["a", "cat", "sat", "down"]]})
    assert per_image["1"][0] == pytest.approx(1.0, abs=1e-8) and corpus[0] == pytest.approx(1.0, abs=1e-8)
    # Shorter than the closest reference (4, not 6): penalty exp(1 - 4/2) = 1/e on every BLEU-n.
    _, per_image = bleu(words({"1": "a cat"}), {"1": [["a", "cat", "sat", "here"], "a big fat cat sat down".split()]})
    assert per_image["1"][:2] == pytest.approx([math.exp(-1), math.exp(-1)], rel=1e-8)


# -- ROUGE-L by hand ------------------------------------------------------------------------------

def test_rouge_l_by_hand():
    """F = (1 + 1.2^2) P R / (R + 1.2^2 P), P and R the largest LCS / length over the references.
    "a man riding a horse" vs "a man on a horse": LCS "a man a horse" = 4, P = R = 4/5, F = 0.8.
    "a b c d" vs "a b" (P 2/4, R 2/2) and "a b c d e f g h" (P 4/4, R 4/8): the maxima come from
    different references, P = R = 1, F = 1 (the best single reference would give 0.709).
    "a b" vs "a b c d": P 1, R 1/2: F = 2.44 * 0.5 / (0.5 + 1.44) = 0.6289; the other way round
    (P 1/2, R 1) 1.22 / 1.72 = 0.7093: recall weighs more. No common word: 0."""
    cands = words({"1": "a man riding a horse", "2": "a b c d", "3": "a b", "4": "a b c d", "5": "x y"})
    refs = {"1": [["a", "man", "on", "a", "horse"]], "2": [["a", "b"], list("abcdefgh")], "3": [list("abcd")],
            "4": [["a", "b"]], "5": [["a", "b"]]}
    mean, per_image = rouge_l(cands, refs)
    expected = {"1": 0.8, "2": 1.0, "3": 1.22 / 1.94, "4": 1.22 / 1.72, "5": 0.0}
    assert per_image == pytest.approx(expected, abs=1e-12)
    assert mean == pytest.approx(sum(expected.values()) / 5, abs=1e-12)


def test_rouge_l_empty_caption_is_one_empty_token():
    # rouge.py splits "" into [""]: an empty caption matches an empty reference (LCS 1 of 1).
    _, per_image = rouge_l({"1": [], "2": []}, {"1": [[]], "2": [["a"]]})
    assert per_image == {"1": 1.0, "2": 0.0}


# -- the pure-Python scorers against pycocoevalcap's, on the same tokens ---------------------------

def random_corpus(rng: random.Random) -> tuple[dict[str, str], dict[str, list[str]]]:
    vocab = "a the man dog horse rides on in snow two play brown".split()
    text = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9)))  # noqa: E731
    n = rng.randint(1, 6)
    return ({str(i): text() for i in range(n)}, {str(i): [text() for _ in range(rng.randint(1, 4))] for i in range(n)})


def test_bleu_and_rouge_l_equal_pycocoevalcaps_bit_for_bit():
    Bleu = pytest.importorskip("pycocoevalcap.bleu.bleu", reason="pycocoevalcap is not installed").Bleu
    Rouge = pytest.importorskip("pycocoevalcap.rouge.rouge", reason="pycocoevalcap is not installed").Rouge
    rng = random.Random(0)
    for _ in range(60):  # empty captions and references included
        cands, refs = random_corpus(rng)
        gts, res = refs, {i: [c] for i, c in cands.items()}
        ours = bleu(words(cands), {i: [r.split() for r in rs] for i, rs in refs.items()})
        theirs = Bleu(4).compute_score(gts, res, verbose=0)
        assert ours[0] == theirs[0] and [[ours[1][i][k] for i in cands] for k in range(4)] == theirs[1]
        mean, per_image = rouge_l(words(cands), {i: [r.split() for r in rs] for i, rs in refs.items()})
        theirs_mean, theirs_each = Rouge().compute_score(gts, res)
        assert [per_image[i] for i in cands] == list(theirs_each)
        assert mean == pytest.approx(float(theirs_mean), abs=1e-15)


# -- the two paths ----------------------------------------------------------------------------------

# Capitals, punctuation, a contraction, an empty caption, and words the PTB tokenizer and
# ptb_tokenize split alike.
CANDIDATES = {"im1": "A man riding a horse on the beach.", "im2": "Two dogs play in the snow", "im3": "",
              "im4": "A woman isn't holding an umbrella!"}
REFERENCES = {
    "im1": ["A man rides a brown horse along the beach.", "A person on a horse, near the sea.",
            "Someone riding a horse on sand"],
    "im2": ["Two dogs are playing in the snow.", "Dogs run through deep snow!"],
    "im3": ["A red bus on a street.", "The bus is parked."],
    "im4": ["A woman holds an umbrella in the rain.", "A lady with an umbrella; it's raining.",
            "Woman isn't wet, she has an umbrella"],
}
SCORERS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")


def test_python_path_summary_and_per_image():
    summary, per_image = caption_metrics(CANDIDATES, REFERENCES, backend="python")
    assert summary["backend"] == "python" and summary["tokenizer"] == "ptb-python"
    assert set(summary["missing"]) == {"meteor", "spice"} and "meteor" not in summary and "spice" not in summary
    assert "the python backend was asked for" in summary["missing"]["meteor"]
    tokens = {i: ptb_tokenize(c) for i, c in CANDIDATES.items()}
    refs = {i: [ptb_tokenize(r) for r in rs] for i, rs in REFERENCES.items()}
    corpus, each = bleu(tokens, refs)
    mean, per_rouge = rouge_l(tokens, refs)
    cider, per_cider = cider_d(CANDIDATES, REFERENCES)
    assert [summary[f"bleu{k}"] for k in range(1, 5)] == [100 * b for b in corpus]
    assert summary["rouge_l"] == 100 * mean and summary["cider"] == 100 * cider
    for i in CANDIDATES:  # the papers' x100 scale per image too
        assert per_image[i] == {**{f"bleu{k + 1}": 100 * each[i][k] for k in range(4)},
                                "rouge_l": 100 * per_rouge[i], "cider": 100 * per_cider[i]}
    assert per_image["im3"] == dict.fromkeys(SCORERS, 0.0)


def test_bad_input_and_backends(monkeypatch, tmp_path):
    with pytest.raises(ArtifactError, match="im2: no reference captions"):
        caption_metrics({"im2": "a"}, {"im1": ["a"]})
    with pytest.raises(ArtifactError, match="im1: the caption must be a string"):
        caption_metrics({"im1": None}, {"im1": ["a"]})
    with pytest.raises(ArtifactError, match="im1: no reference captions"):
        caption_metrics({"im1": "a"}, {"im1": "a"})
    with pytest.raises(ArtifactError, match="no captions to score"):
        caption_metrics({}, {})
    with pytest.raises(ArtifactError, match="unknown caption backend 'perl'"):
        caption_metrics({"im1": "a"}, {"im1": ["a"]}, backend="perl")
    monkeypatch.setenv("PATH", str(tmp_path))  # no java
    with pytest.raises(ArtifactError, match="the java caption backend cannot run: no `java` on PATH"):
        caption_metrics(CANDIDATES, REFERENCES, backend="java")
    summary, _ = caption_metrics(CANDIDATES, REFERENCES)  # auto
    assert summary["backend"] == "python" and "no `java` on PATH" in summary["missing"]["spice"]


def test_evaluation_imports_no_torch():
    code = ("import sys, flamingo_cli.evaluation.captions; import pycocoevalcap.tokenizer.ptbtokenizer, "
            "pycocoevalcap.bleu.bleu, pycocoevalcap.meteor.meteor, pycocoevalcap.rouge.rouge, "
            "pycocoevalcap.cider.cider, pycocoevalcap.spice.spice; assert 'torch' not in sys.modules, 'torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def java_run():
    """One run of the Java path, and pycocoevalcap's scorers called directly on the same corpus
    (as COCOEvalCap.evaluate calls them). Java starts are slow: every Java assertion reads these,
    and both runs score METEOR in one Java process."""
    if JAVA is None:
        pytest.skip(needs_java.kwargs["reason"])
    import pycocoevalcap.meteor.meteor as meteor_module
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in rs] for i, rs in REFERENCES.items()})
    res = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in CANDIDATES.items()})
    direct = {"gts": gts, "res": res}
    corpus, each = Bleu(4).compute_score(gts, res, verbose=0)
    direct.update({f"bleu{k + 1}": (corpus[k], each[k]) for k in range(4)})
    direct["meteor_scorer"] = meteor = meteor_module.Meteor()
    direct["meteor"] = meteor.compute_score(gts, res)
    direct["rouge_l"] = Rouge().compute_score(gts, res)
    direct["cider"] = Cider().compute_score(gts, res)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meteor_module, "Meteor", lambda: meteor)
        return caption_metrics(CANDIDATES, REFERENCES, backend="java"), direct


def dead_meteors(patch: pytest.MonkeyPatch) -> list:
    """The Meteor scorers made from now on, each returned once its Java process has exited, so
    that what is written to it fails (BrokenPipeError) and what is read from it is empty."""
    import pycocoevalcap.meteor.meteor as module

    made = []

    class Recorded(module.Meteor):
        def __init__(self):
            super().__init__()
            self.meteor_p.wait()
            made.append(self)

    patch.setattr(module, "Meteor", Recorded)
    return made


def ended(meteor) -> bool:
    return meteor.meteor_p.poll() is not None and not meteor.lock.locked()


@needs_java
def test_java_path_equals_pycocoevalcap_called_directly(java_run):
    (summary, per_image), direct = java_run
    assert summary["backend"] == "pycocoevalcap" and summary["tokenizer"] == "ptb-java"
    for name in (*SCORERS, "meteor"):
        corpus, each = direct[name]
        assert summary[name] == 100 * float(corpus), name
        assert [per_image[i][name] for i in direct["gts"]] == [100 * float(v) for v in each], name
    assert 0 < summary["meteor"] < 100
    assert per_image["im3"]["meteor"] == 0.0
    assert ended(direct["meteor_scorer"])


@needs_java
def test_java_path_says_why_spice_is_missing(java_run):
    (summary, _), _ = java_run
    lib = Path(sys.modules["pycocoevalcap.spice.spice"].__file__).parent / "lib"
    if all((lib / jar).is_file() for jar in captions._SPICE_JARS):
        assert "spice" in summary or "SPICE's Java process failed" in summary["missing"]["spice"]
    else:
        assert "spice" not in summary and "stanford-corenlp-3.6.0.jar" in summary["missing"]["spice"]
        assert "get_stanford_models()" in summary["missing"]["spice"]
    assert set(summary["missing"]) <= {"spice"}


@needs_java
def test_pure_python_scorers_agree_with_the_java_path(java_run):
    (summary, per_image), direct = java_run
    gts = {i: [r.split() for r in rs] for i, rs in direct["gts"].items()}
    res = {i: rs[0].split() for i, rs in direct["res"].items()}
    corpus, each = bleu(res, gts)
    assert [summary[f"bleu{k + 1}"] for k in range(4)] == [100 * b for b in corpus]
    mean, _ = rouge_l(res, gts)
    assert summary["rouge_l"] == pytest.approx(100 * mean, abs=1e-12)
    cider, per_cider = cider_d({i: " ".join(r) for i, r in res.items()}, direct["gts"], tokenize=str.split)
    assert summary["cider"] == pytest.approx(100 * cider, abs=1e-9)
    assert [per_image[i]["cider"] for i in res] == pytest.approx([100 * per_cider[i] for i in res], abs=1e-9)
    # On this corpus ptb_tokenize splits as the PTB tokenizer does, so the two paths agree.
    assert {i: " ".join(ptb_tokenize(c)) for i, c in CANDIDATES.items()} == {i: r[0] for i, r in direct["res"].items()}
    assert {i: [" ".join(ptb_tokenize(r)) for r in rs] for i, rs in REFERENCES.items()} == direct["gts"]
    python, _ = caption_metrics(CANDIDATES, REFERENCES, backend="python")
    assert {m: python[m] for m in SCORERS} == pytest.approx({m: summary[m] for m in SCORERS}, abs=1e-9)


@needs_java
def test_a_caption_with_a_line_break_stays_on_its_image(capfd):
    # The PTB tokenizer ends a line at "\r" and U+2028: unreplaced, "riding." would become the
    # second caption of im1, and "A bus." would be lost.
    gts = captions._tokenize({"im1": ["A man\rriding.", "x\u2028y"], "im2": ["A bus."]})
    assert gts == {"im1": ["a man riding", "x y"], "im2": ["a bus"]}
    assert capfd.readouterr() == ("", "")  # its report of tokens per second is kept off stderr


def fake_java(tmp_path: Path, fails_on: str) -> None:
    """A `java` on PATH that prints an error and exits 1 when its arguments contain `fails_on`,
    and runs the real one otherwise."""
    script = tmp_path / "java"
    script.write_text(f'#!/bin/sh\ncase "$*" in *{fails_on}*) echo "Error: fake JVM failure" >&2; exit 1;; esac\n'
                      f'exec {JAVA} "$@"\n')
    script.chmod(0o755)


@needs_java
def test_a_failing_tokenizer_is_one_error(monkeypatch, tmp_path, capfd):
    fake_java(tmp_path, "PTBTokenizer")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(ArtifactError, match="PTB tokenizer failed: Error: fake JVM failure"):
        caption_metrics(CANDIDATES, REFERENCES, backend="java")
    assert capfd.readouterr() == ("", "")


@needs_java
def test_a_failing_meteor_is_one_error_and_its_process_ends(monkeypatch, tmp_path):
    fake_java(tmp_path, "meteor-1.5.jar")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    meteors = dead_meteors(monkeypatch)
    with pytest.raises(ArtifactError, match=r"METEOR \(pycocoevalcap's meteor-1.5.jar\) failed: Error: fake JVM"):
        caption_metrics(CANDIDATES, REFERENCES, backend="java")
    # Its lock released: Meteor.__del__ takes it, and would otherwise hang whoever collects it.
    assert ended(meteors[0])


@needs_java
def test_a_failing_spice_is_missing_with_javas_first_line(monkeypatch, tmp_path, capfd):
    """With the CoreNLP jars taken as present but absent, SPICE's jar fails to load its classes:
    SPICE is reported missing with Java's own first line, and nothing reaches stdout or stderr."""
    import pycocoevalcap.spice.spice as spice

    monkeypatch.setattr(captions, "_SPICE_JARS", ())
    monkeypatch.setattr(spice, "get_stanford_models", lambda: None)  # it would download them
    monkeypatch.setattr(spice, "TEMP_DIR", str(tmp_path / "tmp"))  # not in the installed package
    monkeypatch.setattr(spice, "CACHE_DIR", str(tmp_path / "cache"))
    why = captions._spice({"1": ["a dog runs"]}, {"1": ["a dog"]})
    assert why.startswith("SPICE's Java process failed (Exception in thread \"main\" java.lang.NoClassDefFoundError")
    assert capfd.readouterr() == ("", "")
