"""The benchmark metrics, computed as the official tools compute them (pure Python).

- VQA accuracy: the VQA challenge's evaluator (vqaEval.py): its answer normalisation, its quirks
  included, and min(1, matches / 3) averaged over the 10 leave-one-out subsets of human answers;
  its per-answer-type accuracies.
- CIDEr-D: pycocoevalcap's scorer (its "Cider" is CIDEr-D): n = 1..4, sigma = 6, document
  frequencies over the evaluated corpus, clipped tf-idf, x10 per image, the length penalty on
  the bigram count. Its Java PTB tokenizer is approximated in Python: see `ptb_tokenize`.
- ROC-AUC, from one score per example, top-1 accuracy and the top-k of ranked candidates.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# -- VQA accuracy ---------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official pattern, typo included: "(?!<=\d)" is a lookahead for the text "<=" + digit, not
# the lookbehind its authors meant, so a period is removed unless a digit follows it.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def vqa_punctuation(text: str) -> str:
    """The evaluator's processPunctuation: a symbol touching a space (or any symbol, once the
    text has a digit,digit pattern) is deleted, otherwise it becomes a space; then periods not
    followed by a digit go, at most 32 of them (the official call passes re.UNICODE as count)."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)


def vqa_digits_articles(text: str) -> str:
    """The evaluator's processDigitArticle: lowercase, number words zero-ten to digits,
    articles dropped, contractions restored from its table."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """How the evaluator normalises a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


VQA_EVALUATORS = ("official", "openflamingo")


def vqa_accuracy(prediction: str, answers: Sequence[str], evaluator: str = "official") -> float:
    """One question's accuracy in [0, 1]: the mean over the leave-one-out subsets of the human
    answers of min(1, #matches / 3).

    "official": human answers get the punctuation step only, and only when they are not
    unanimous, as in the VQA challenge's evaluator. "openflamingo": as OpenFlamingo's copy of it,
    which normalises every human answer like the prediction (case, number words, articles too),
    so it scores unnormalised human answers higher."""
    if not answers:
        raise ValueError("no human answers")
    if evaluator not in VQA_EVALUATORS:
        raise ValueError(f"unknown VQA evaluator {evaluator!r}")
    pred = normalize_vqa_answer(prediction)
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if evaluator == "openflamingo":
        humans = [normalize_vqa_answer(a) for a in humans]
    elif len(set(humans)) > 1:
        humans = [vqa_punctuation(a) for a in humans]
    matches = sum(h == pred for h in humans)
    # Leaving out answer i removes one match exactly when answer i itself matches.
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def vqa_accuracy_by_type(types: Sequence[str], accuracies: Sequence[float]) -> dict[str, dict]:
    """{answer type: {"accuracy", "n"}}, sorted by type: as the evaluator's perAnswerType, the mean
    of its questions' accuracies (each already the leave-one-out mean) in percent, unrounded (the
    evaluator rounds to two places). An early revision of vqaEval.py averaged the last leave-one-out
    subset's accuracy instead of the question's; the current one (and VizWiz's copy) average the question's."""
    by_type: dict[str, list[float]] = {}
    for answer_type, accuracy in zip(types, accuracies, strict=True):
        by_type.setdefault(answer_type, []).append(accuracy)
    return {t: {"accuracy": 100 * sum(v) / len(v), "n": len(v)} for t, v in sorted(by_type.items())}


# -- CIDEr-D --------------------------------------------------------------------------------------

# Tokens pycocoevalcap drops after tokenising (its PUNCTUATIONS list).
_PTB_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";",
                # PTB writes these as the `` '' -LRB- -RRB- -LCB- -RCB- tokens above
                '"', "(", ")", "[", "]", "{", "}"}
_PTB_TOKEN = re.compile(
    r"\d+(?:[.,]\d+)+"  # 2,000 and 3.5 stay whole
    r"|[a-z0-9]+(?:[-'][a-z0-9]+)*(?=n't\b)"  # "do" of "don't", before the clitic split below
    r"|n't\b"
    r"|'(?:s|re|ve|ll|d|m)\b"
    r"|[a-z0-9]+(?:[-&][a-z0-9]+)*"  # words, hyphenated words (PTB keeps t-shirt whole)
    r"|\.\.\.|--|``|''"
    r"|[^\sa-z0-9]"
)


def ptb_tokenize(text: str) -> list[str]:
    """An approximation of pycocoevalcap's tokenisation (Stanford PTBTokenizer, lowercased, then
    punctuation tokens dropped). Like PTB it splits off punctuation and the clitics n't, 's,
    're, 've, 'll, 'd, 'm, and keeps hyphenated words and numbers like 2,000 or 3.5 whole.
    It does not reproduce PTB's rarer rules: splitting "cannot"/"gonna"-style words, keeping
    periods in abbreviations ("st."), or its handling of URLs, emoticons and other Unicode."""
    tokens = _PTB_TOKEN.findall(text.lower().replace("\n", " "))
    return [t for t in tokens if t not in _PTB_DROPPED]


def _ngrams(words: list[str], n: int = 4) -> Counter:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(candidates: dict[str, str], references: dict[str, list[str]], *, sigma: float = 6.0,
            tokenize=None) -> tuple[float, dict[str, float]]:
    """(corpus CIDEr-D, per-image scores) as pycocoevalcap computes them; scores are on its
    0-10 scale (papers report x100 of the corpus mean). Texts are tokenised with
    `tokenize` (default ptb_tokenize); pass `str.split` for pre-tokenised text."""
    tokenize = tokenize or ptb_tokenize
    ids = list(candidates)
    missing = [i for i in ids if i not in references or not references[i]]
    if missing:
        raise ValueError(f"no reference captions for {missing[0]}")
    cand = {i: _ngrams(tokenize(candidates[i])) for i in ids}
    refs = {i: [_ngrams(tokenize(r)) for r in references[i]] for i in ids}
    df = Counter(g for i in ids for g in {g for r in refs[i] for g in r})
    log_n = math.log(float(len(ids)))

    def vector(counts: Counter):
        vec = [{} for _ in range(4)]
        norm = [0.0] * 4
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = w = tf * (log_n - math.log(max(1.0, df[gram])))
            norm[k] += w * w
        # pycocoevalcap's "length" counts bigrams: a sentence of L words has L - 1.
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], bigrams

    scores = {}
    for i in ids:
        v_h, n_h, l_h = vector(cand[i])
        total = [0.0] * 4
        for ref in refs[i]:
            v_r, n_r, l_r = vector(ref)
            penalty = math.exp(-((l_h - l_r) ** 2) / (2 * sigma ** 2))
            for k in range(4):
                val = sum(min(w, v_r[k].get(g, 0.0)) * v_r[k].get(g, 0.0) for g, w in v_h[k].items())
                if n_h[k] != 0 and n_r[k] != 0:
                    val /= n_h[k] * n_r[k]
                total[k] += val * penalty
        scores[i] = sum(total) / 4 / len(refs[i]) * 10.0
    return (sum(scores.values()) / len(scores) if scores else 0.0), scores


# -- classification -------------------------------------------------------------------------------

def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (equal to the trapezoidal area, as scikit-learn computes it)."""
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError("ROC-AUC needs both positive and negative examples")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    start = 0
    while start < len(order):  # average ranks over ties
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def top_k(scores: dict[str, float], k: int) -> list[str]:
    """The k best-scored candidates, best first. Equal scores keep the candidates' order (a stable
    sort), as top-1's max keeps the first of equal maxima."""
    return sorted(scores, key=scores.__getitem__, reverse=True)[:k]


def exact_match(prediction: str, answer: str) -> float:
    """Top-1 of an open-ended answer (MSVD-QA, MSRVTT-QA): 1 when the prediction is the
    answer after the VQA answer normalisation of both (case, punctuation, articles, number
    words), which only forgives a generation's surface form."""
    return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(answer))


def ivqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """iVQA accuracy (Yang et al., ICCV 2021, section 5.1): min(#annotators who gave the
    prediction / 2, 1) over the question's five answers, compared after the VQA normalisation."""
    if not answers:
        raise ValueError("no answers")
    p = normalize_vqa_answer(prediction)
    return min(sum(normalize_vqa_answer(a) == p for a in answers) / 2, 1.0)


def weighted_average_precision(labels: Sequence[int], scores: Sequence[float], weights: Sequence[float]) -> float:
    """Average precision with sample weights, as scikit-learn's average_precision_score computes
    it: the sum over distinct score thresholds, high to low, of (R_k - R_{k-1}) * P_k, where
    precision and recall count weights instead of examples."""
    total = sum(w for y, w in zip(labels, weights, strict=True) if y)
    if total <= 0:
        raise ValueError("no positive examples")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    tp = fp = recall = ap = 0.0
    k = 0
    while k < len(order):
        threshold = scores[order[k]]
        while k < len(order) and scores[order[k]] == threshold:
            tp, fp = (tp + weights[order[k]], fp) if labels[order[k]] else (tp, fp + weights[order[k]])
            k += 1
        ap += (tp / total - recall) * tp / (tp + fp)
        recall = tp / total
    return ap


def rareact_mwap(rows: Sequence[dict], class_name=lambda verb, noun: f"{verb} {noun}") -> tuple[float, dict]:
    """RareAct's mean weighted average precision (Miech et al. 2020; its compute_score.py): for
    every (verb, noun) class with a positive clip, the AP of ranking by the class's score
    (row["scores"][class_name(verb, noun)]) its positives against
      negatives: clips annotated 0 for it, and other classes' positives sharing neither word;
      hard negatives: clips annotated 2-4 for it, and other classes' positives sharing one word;
    each clip weighted 1 / (its video's clips in the same group). Returns (mean, {class: AP}).
    Each row has verb, noun, annotation (0-4), video_id and scores."""
    groups: dict[tuple[str, str], dict[str, list[int]]] = {}
    for row in rows:
        groups.setdefault((row["verb"], row["noun"]), {"positive": [], "negative": [], "hard": []})
    for i, row in enumerate(rows):
        verb, noun, annotation = row["verb"], row["noun"], row["annotation"]
        if annotation == 1:
            groups[verb, noun]["positive"].append(i)
            for other, group in groups.items():
                if (other[0] == verb) != (other[1] == noun):
                    group["hard"].append(i)
                elif other[0] != verb and other[1] != noun:
                    group["negative"].append(i)
        else:
            groups[verb, noun]["negative" if annotation == 0 else "hard"].append(i)
    aps = {}
    for (verb, noun), group in groups.items():
        if not group["positive"]:
            continue
        name = class_name(verb, noun)
        labels, scores, weights = [], [], []
        for kind in ("positive", "negative", "hard"):
            videos = Counter(rows[i]["video_id"] for i in group[kind])
            for i in group[kind]:
                labels.append(int(kind == "positive"))
                scores.append(rows[i]["scores"][name])
                weights.append(1 / videos[rows[i]["video_id"]])
        aps[name] = weighted_average_precision(labels, scores, weights)
    if not aps:
        raise ValueError("no class has a positive clip")
    return sum(aps.values()) / len(aps), aps


def top1(predictions: Sequence[str], labels: Sequence[str]) -> float:
    """Fraction of exact matches (after stripping surrounding whitespace)."""
    if not labels:
        raise ValueError("no examples")
    return sum(p.strip() == y.strip() for p, y in zip(predictions, labels, strict=True)) / len(labels)


# -- post-processing ------------------------------------------------------------------------------

def cut_at(text: str, markers: Sequence[str]) -> str:
    """The text before the first of `markers` (e.g. a generated "Question"), as the peers trim
    generations that run on into a new example."""
    ends = [i for i in (text.find(m) for m in markers if m) if i >= 0]
    return text[:min(ends)] if ends else text


def strip_quotes(text: str) -> str:
    return text.replace('"', "")
