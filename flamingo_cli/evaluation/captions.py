"""The caption metrics pycocoevalcap reports: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE.

`caption_metrics(candidates, references, backend)` scores one caption per image id against its
reference captions, on one of two paths:

- "java": pycocoevalcap itself (its COCOEvalCap steps, called one by one): the Stanford PTB
  tokenizer (Java), Bleu(4), Meteor (Java), Rouge, Cider (pycocoevalcap's Cider is CIDEr-D) and
  Spice (Java, and Stanford CoreNLP 3.6.0, which the wheel does not carry: without it SPICE is
  reported missing, with how to fetch it).
- "python": `metrics.ptb_tokenize` (an approximation of the PTB tokenizer), then BLEU and
  ROUGE-L as coco-caption's bleu_scorer.py and rouge.py define them, and `metrics.cider_d`.
  METEOR and SPICE need Java and are reported missing.

"auto" takes "java" when `java` is on PATH and pycocoevalcap imports. Scores are on the papers'
x100 scale, in the summary and per image alike.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from ..formats.artifacts import ArtifactError
from .metrics import cider_d, ptb_tokenize

BACKENDS = ("auto", "java", "python")
METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider", "spice")
# Java's PTBTokenizer (-preserveLines) ends a line at each of these, and pycocoevalcap pairs its
# output lines with the captions in order: one inside a caption shifts every later caption onto
# the wrong image. pycocoevalcap replaces "\n" with a space; the others get the same.
_LINE_BREAKS = str.maketrans({c: " " for c in "\r\x0b\x0c\x85\u2028\u2029"})
# What SPICE's jar lists on its Class-Path and pycocoevalcap downloads on first use.
_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
_FETCH_SPICE = ("python -c 'from pycocoevalcap.spice.get_stanford_models import get_stanford_models; "
                "get_stanford_models()' (downloads stanford-corenlp-full-2015-12-09.zip, about 390 MB, from "
                "nlp.stanford.edu and puts the two jars in {lib})")


def caption_metrics(candidates: dict[str, str], references: dict[str, list[str]],
                    backend: str = "auto") -> tuple[dict, dict[str, dict[str, float]]]:
    """(summary, per-image scores) for `candidates` (image id -> caption) against `references`
    (image id -> reference captions). The summary: {"backend": "pycocoevalcap" | "python",
    "tokenizer": "ptb-java" | "ptb-python", "bleu1".."bleu4", "meteor", "rouge_l", "cider",
    "spice", "missing": {metric: why}}; a metric that could not run is left out and named in
    "missing". Per image: the same metric names, where the scorer gives one per image."""
    if backend not in BACKENDS:
        raise ArtifactError(f"unknown caption backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    _check(candidates, references)
    why_not_java = _why_not_java()
    if backend == "java" and why_not_java:
        raise ArtifactError(f"the java caption backend cannot run: {why_not_java}")
    if backend == "java" or (backend == "auto" and not why_not_java):
        return _java(candidates, references)
    return _python(candidates, references, "the python backend was asked for" if backend == "python" else why_not_java)


def _check(candidates: dict, references: dict) -> None:
    if not candidates:
        raise ArtifactError("no captions to score")
    for i, caption in candidates.items():
        if not isinstance(caption, str):
            raise ArtifactError(f"{i}: the caption must be a string, not {type(caption).__name__}")
        refs = references.get(i)
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise ArtifactError(f"{i}: no reference captions (expected a non-empty list of strings)")


def _why_not_java() -> str | None:
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    if shutil.which("java") is None:
        return "no `java` on PATH (Debian: apt-get install default-jre-headless)"
    return None


def _result(backend: str, tokenizer: str, ids: list[str], scores: dict[str, tuple[float, list[float]]],
            missing: dict[str, str]) -> tuple[dict, dict[str, dict[str, float]]]:
    """Put scores (metric -> (corpus score, per-image scores in `ids` order), on the scorers'
    own scale) on the papers' x100 scale."""
    summary = {"backend": backend, "tokenizer": tokenizer}
    per_image: dict[str, dict[str, float]] = {i: {} for i in ids}
    for name in METRICS:
        if name in scores:
            corpus, each = scores[name]
            summary[name] = 100 * float(corpus)
            for i, value in zip(ids, each, strict=True):
                per_image[i][name] = 100 * float(value)
    summary["missing"] = missing
    return summary, per_image


# -- the pure-Python path -------------------------------------------------------------------------

# bleu_scorer.py's guards: a zero count gives a tiny score, never a division by zero.
_TINY, _SMALL = 1e-15, 1e-9


def _counts(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _bleu_from(testlen: float, reflen: float, guess: list[int], correct: list[int]) -> list[float]:
    """BLEU-1..4 from clipped n-gram counts: the geometric mean of precisions 1..k, times the
    brevity penalty exp(1 - reflen / testlen) when the test is shorter (by the guards, also
    when it is as long, by a factor 1 - 1e-10 or so)."""
    out, product = [], 1.0
    for k in range(4):
        product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        out.append(product ** (1 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def bleu(candidates: dict[str, list[str]], references: dict[str, list[list[str]]]
         ) -> tuple[list[float], dict[str, list[float]]]:
    """(corpus BLEU-1..4, per-image BLEU-1..4) on tokenised captions, as pycocoevalcap's Bleu(4)
    computes them (bleu_scorer.py, option "closest"): n-gram counts clipped by their largest
    count in any one reference; the reference length is the one closest to the candidate's
    (the shorter on a tie). Corpus BLEU sums counts and lengths over images first."""
    testlens = reflens = 0
    guesses, corrects = [0] * 4, [0] * 4
    per_image = {}
    for i, words in candidates.items():
        clip: dict[tuple, int] = {}
        for ref in references[i]:
            for gram, c in _counts(ref).items():
                clip[gram] = max(clip.get(gram, 0), c)
        testlen = len(words)
        reflen = min((abs(len(r) - testlen), len(r)) for r in references[i])[1]
        guess = [max(0, testlen - k) for k in range(4)]
        correct = [0] * 4
        for gram, c in _counts(words).items():
            correct[len(gram) - 1] += min(clip.get(gram, 0), c)
        per_image[i] = _bleu_from(testlen, reflen, guess, correct)
        testlens, reflens = testlens + testlen, reflens + reflen
        guesses = [a + b for a, b in zip(guesses, guess)]
        corrects = [a + b for a, b in zip(corrects, correct)]
    return _bleu_from(testlens, reflens, guesses, corrects), per_image


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(previous[j] + 1 if x == y else max(previous[j + 1], row[j]))
        previous = row
    return previous[-1]


def rouge_l(candidates: dict[str, list[str]], references: dict[str, list[list[str]]], beta: float = 1.2
            ) -> tuple[float, dict[str, float]]:
    """(mean, per-image ROUGE-L) on tokenised captions, as coco-caption's rouge.py computes it:
    P and R are the largest LCS / length over the references, each maximised on its own (they
    may come from different references); the score is (1 + b^2) P R / (R + b^2 P), 0 when P or
    R is. Like rouge.py, which splits the joined tokens on " ", an empty caption is one empty
    token, so it matches an empty reference."""
    per_image = {}
    for i, words in candidates.items():
        cand = words or [""]
        refs = [r or [""] for r in references[i]]
        lcs = [_lcs(r, cand) for r in refs]
        p = max(n / len(cand) for n in lcs)
        r = max(n / len(ref) for n, ref in zip(lcs, refs))
        per_image[i] = (1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p and r else 0.0
    return sum(per_image.values()) / len(per_image), per_image


def _python(candidates: dict[str, str], references: dict[str, list[str]], why_no_java: str):
    ids = list(candidates)
    cand = {i: ptb_tokenize(candidates[i]) for i in ids}
    refs = {i: [ptb_tokenize(r) for r in references[i]] for i in ids}
    corpus, each = bleu(cand, refs)
    scores = {f"bleu{k + 1}": (corpus[k], [each[i][k] for i in ids]) for k in range(4)}
    mean, per = rouge_l(cand, refs)
    scores["rouge_l"] = mean, [per[i] for i in ids]
    mean, per = cider_d(candidates, references)
    scores["cider"] = mean, [per[i] for i in ids]
    missing = {"meteor": f"METEOR runs in Java, through pycocoevalcap: {why_no_java}",
               "spice": f"SPICE runs in Java, through pycocoevalcap: {why_no_java}"}
    return _result("python", "ptb-python", ids, scores, missing)


# -- the pycocoevalcap path -----------------------------------------------------------------------

def _java(candidates: dict[str, str], references: dict[str, list[str]]):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(candidates)
    # As COCOEvalCap.evaluate: references and candidates tokenised in two runs.
    gts = _tokenize({i: references[i] for i in ids})
    res = _tokenize({i: [candidates[i]] for i in ids})
    corpus, each = Bleu(4).compute_score(gts, res, verbose=0)  # verbose prints to stdout
    scores = {f"bleu{k + 1}": (corpus[k], each[k]) for k in range(4)}
    scores["meteor"] = _meteor(gts, res)
    scores["rouge_l"] = Rouge().compute_score(gts, res)
    scores["cider"] = Cider().compute_score(gts, res)
    missing = {}
    spice = _spice(gts, res)
    if isinstance(spice, str):
        missing["spice"] = spice
    else:
        scores["spice"] = spice
    return _result("pycocoevalcap", "ptb-java", ids, scores, missing)


def _tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with tempfile.TemporaryFile() as log:
        try:
            with _java_output_to(log):
                out = PTBTokenizer().tokenize({i: [{"caption": c.translate(_LINE_BREAKS)} for c in cs]
                                               for i, cs in captions.items()})
        except OSError as e:  # it writes its input beside its jar, in the installed package
            raise ArtifactError(f"pycocoevalcap's PTB tokenizer could not run: {e}") from None
        # pycocoevalcap reads no exit status, and a failed run reads as empty captions: a run that
        # worked ends with the tokenizer's report on stderr.
        log.seek(0)
        if b"PTBTokenizer tokenized" not in log.read():
            raise ArtifactError(f"pycocoevalcap's PTB tokenizer failed: {_first_line(log, 'no output')}")
    return out


def _meteor(gts: dict, res: dict) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        return meteor.compute_score(gts, res)
    except (OSError, ValueError) as e:  # the Java process died: its replies are not numbers
        meteor.meteor_p.kill()
        lines = meteor.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()
        raise ArtifactError(f"METEOR (pycocoevalcap's meteor-1.5.jar) failed: {lines[0] if lines else e}") from None
    finally:
        # compute_score keeps its lock when it fails, and Meteor.__del__ waits for it.
        if meteor.lock.locked():
            meteor.lock.release()
        process = meteor.meteor_p  # ended now, not whenever the object is collected
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(BrokenPipeError):  # what a dead process was not sent
                pipe.close()


def _spice(gts: dict, res: dict) -> tuple[float, list[float]] | str:
    """(mean, per-image SPICE F-scores in gts order), or why SPICE could not run."""
    import pycocoevalcap.spice.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    absent = [jar for jar in _SPICE_JARS if not (lib / jar).is_file()]
    if absent:
        # Spice() would download them: never from inside an evaluation.
        return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(absent)} in {lib}), which pycocoevalcap's "
                f"wheel does not carry; fetch it once with: {_FETCH_SPICE.format(lib=lib)}")
    with tempfile.TemporaryFile() as log:
        try:
            with _java_output_to(log):
                mean, scores = spice.Spice().compute_score(gts, res)
        except subprocess.CalledProcessError as e:
            return (f"SPICE's Java process failed ({_first_line(log, str(e))}); SPICE 1.0 is reported to run "
                    "on Java 8 or 11, not on 17 or later")
    # Spice returns its scores in sorted id order (COCOEvalCap pairs them with the unsorted ids).
    by_id = dict(zip(sorted(gts), (s["All"]["f"] for s in scores)))
    return mean, [by_id[i] for i in gts]


@contextlib.contextmanager
def _java_output_to(file):
    """Point file descriptors 1 and 2 at `file` while pycocoevalcap runs a jar, which inherits
    them: our stdout carries only results, stderr stays quiet (the tokenizer reports its speed),
    and a failure becomes one line, not a Java stack trace."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _first_line(log, default: str) -> str:
    log.seek(0)
    lines = log.read().decode(errors="replace").strip().splitlines()
    return lines[0] if lines else default
