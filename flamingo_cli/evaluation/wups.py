"""WUPS, NExT-QA's open-ended metric (Xiao et al., "NExT-QA: Next Phase of Question-Answering to
Explaining Temporal Actions", CVPR 2021), as its evaluation code computes it:
github.com/doc-doc/NExT-OE, eval_oe.py (answer normalisation, question types) and metrics.py
(wup, wups, get_wups).

  normalise   tokenize, POS-tag, lowercase and lemmatise every word (pywsd 1.2.4's
              lemmatize_sentence: WordNet's morphy for the tag's part of speech, else the
              Porter stem if only it is in WordNet, else the word), then drop NExT-QA's
              stopwords (NLTK's English list without the words that carry space and time:
              up, down, before, after, ...)
  wup(a, b)   1 if a == b; else the Wu-Palmer similarity of the two words' first WordNet
              synsets (0 when either has none, or they share no ancestor), x0.1 when below
              the threshold
  wups(A, B)  the product over words of A of their best wup with a word of B, skipping words
              whose best is 0 (0 when all are); a pair scores min(wups(A, B), wups(B, A))

Descriptive questions answered by a count or yes/no (types DC and DB) score exact matches of
the normalised answers instead. With NExT-QA's second reference answers
(add_reference_answer_{split}.json), a prediction scores its best against either.

WordNet 3.0, NLTK's perceptron tagger and its Punkt tables are NLTK data, fetched by NLTK's
downloader; the tagger and the Punkt tables are in no package registry, so `Wups.load()` says
which are missing and how to fetch them.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from ..formats.artifacts import ArtifactError

# NExT-QA's stopwords (NExT-OE's stopwords.txt; the copy in lmms-eval's tasks/nextqa/stopwords.csv).
NEXTQA_STOPWORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves
he him his himself she she's her hers herself it it's its itself they them their theirs themselves
what which who whom this that that'll these those am is are was were be been being have has had
having do does did doing a an the and but if or because as until while to from of at for with about
into through during again further then here there when where why how all any each most other some
such only own so than too very s t can will just don don't should should've now d ll m o re ve y ain
aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't
ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't
won won't wouldn wouldn't
""".split())

# NLTK resource path -> the name `python -m nltk.downloader` fetches it by.
NLTK_RESOURCES = {
    "corpora/wordnet": "wordnet",
    "taggers/averaged_perceptron_tagger_eng/": "averaged_perceptron_tagger_eng",
    "tokenizers/punkt_tab/english/": "punkt_tab",
}
# Question types scored by exact match (eval_oe.py: "DC" counting, "DB" yes/no).
EXACT_TYPES = ("DB", "DC")
THRESHOLDS = (0.0, 0.9)  # WUPS@0 is the number NExT-QA and the Flamingo paper report


def _penn_to_wordnet(tag: str) -> str:
    return {"NN": "n", "JJ": "a", "VB": "v", "RB": "r"}.get(tag[:2], "")


@dataclass
class Wups:
    """WUPS over one WordNet, tagger and tokenizer (see the module's docstring)."""
    wordnet: object  # an nltk WordNetCorpusReader
    tag: Callable[[list[str]], list[tuple[str, str]]]
    tokenize: Callable[[str], list[str]]
    stem: Callable[[str], str]

    def __post_init__(self):
        self._synsets = lru_cache(maxsize=None)(self.wordnet.synsets)
        self._wup = lru_cache(maxsize=None)(self._wup_uncached)

    @classmethod
    def load(cls, purpose: str = "wups") -> Wups:
        """From NLTK's data path (NLTK_DATA, ~/nltk_data, ...); ArtifactError naming what is missing
        and for what (`purpose`: OK-VQA's stemming loads the same data)."""
        try:
            import nltk
            from nltk.corpus.reader.wordnet import WordNetCorpusReader
            from nltk.stem.porter import PorterStemmer
            from nltk.tag.perceptron import PerceptronTagger
        except ImportError:
            raise ArtifactError(f"{purpose} needs NLTK: pip install nltk") from None
        found, missing = {}, []
        for resource, name in NLTK_RESOURCES.items():
            try:
                found[name] = nltk.data.find(resource)
            except LookupError:
                missing.append(name)
        if missing:
            raise ArtifactError(
                f"{purpose} needs NLTK data not found in {':'.join(nltk.data.path)}: {', '.join(missing)} "
                f"(fetch once with: python -m nltk.downloader {' '.join(missing)}; or set NLTK_DATA "
                "to a directory holding them)")
        tagger = PerceptronTagger(load=False)
        tagger.load_from_json(lang="eng", loc=found["averaged_perceptron_tagger_eng"])
        with warnings.catch_warnings():  # that it has no multilingual (OMW) data, which WUPS never uses
            warnings.simplefilter("ignore")
            wordnet = WordNetCorpusReader(found["wordnet"], None)
        return cls(wordnet=wordnet, tag=tagger.tag,
                   tokenize=nltk.word_tokenize, stem=PorterStemmer().stem)

    # -- normalisation (pywsd 1.2.4, utils.lemmatize_sentence and lemmatize) -------------------

    def _lemma(self, word: str, pos: str) -> str:
        if not pos:  # pywsd tags the lone word again, and takes a noun when that fails too
            pos = _penn_to_wordnet(self.tag([word])[0][1]) or "n"
        forms = self.wordnet._morphy(word, pos)
        lemma = min(forms, key=len) if forms else word  # nltk's WordNetLemmatizer
        if self._synsets(lemma):
            return lemma
        stem = self.stem(word)
        return stem if self._synsets(stem) else word

    def normalize(self, answer: str) -> str:
        words = [self._lemma(word.lower(), _penn_to_wordnet(tag)) for word, tag in self.tag(self.tokenize(answer))]
        return " ".join(w for w in words if w not in NEXTQA_STOPWORDS)

    # -- similarity (NExT-OE metrics.py) --------------------------------------------------------

    def _wup_uncached(self, a: str, b: str) -> float:
        if a == b:
            return 1.0
        first_a, first_b = self._synsets(a), self._synsets(b)
        if not first_a or not first_b:
            return 0.0
        return first_a[0].wup_similarity(first_b[0]) or 0.0

    def word_similarity(self, a: str, b: str, threshold: float) -> float:
        similarity = self._wup(a, b)
        return similarity if similarity >= threshold else 0.1 * similarity

    def set_similarity(self, words: Sequence[str], others: Sequence[str], threshold: float) -> float:
        product, any_match = 1.0, False
        for word in words:
            best = max((self.word_similarity(word, other, threshold) for other in others), default=0.0)
            if best > 0:
                product *= best
                any_match = True
        return product if any_match else 0.0

    def similarity(self, prediction: str, truth: str, threshold: float) -> float:
        """get_wups of two normalised answers."""
        a, b = self.tokenize(prediction), self.tokenize(truth)
        return min(self.set_similarity(a, b, threshold), self.set_similarity(b, a, threshold))

    def score(self, prediction: str, answers: Sequence[str], qtype: str) -> dict[float, float]:
        """{threshold: score} of one raw prediction against a question's raw reference answers."""
        if not answers:
            raise ValueError("no answers")
        pred = self.normalize(prediction)
        refs = [self.normalize(a) for a in answers]
        if qtype in EXACT_TYPES:
            exact = float(pred in refs)
            return {t: exact for t in THRESHOLDS}
        return {t: max(self.similarity(pred, ref, t) for ref in refs) for t in THRESHOLDS}


def nextqa_summary(types: Sequence[str], scores: Sequence[dict[float, float]]) -> dict:
    """eval_oe.py's table: WUPS@0 by question type and by group (C causal, T temporal, D
    descriptive), WUPS@0 and WUPS@0.9 over all, in percent. TP counts as TN, as there."""
    by_type: dict[str, list[float]] = {}
    by_group: dict[str, list[float]] = {}
    for qtype, score in zip(types, scores, strict=True):
        qtype = "TN" if qtype == "TP" else qtype
        by_type.setdefault(qtype, []).append(score[0.0])
        by_group.setdefault(qtype[0], []).append(score[0.0])

    def mean(values: list[float]) -> float:
        return 100 * sum(values) / len(values)

    return {
        "wups0": mean([s[0.0] for s in scores]),
        "wups9": mean([s[0.9] for s in scores]),
        "by_group": {f"WUPS_{g}": mean(v) for g, v in sorted(by_group.items())},
        "by_type": {t: mean(v) for t, v in sorted(by_type.items())},
    }
