"""OK-VQA v1.1's answer stemming, applied to generated answers as OpenFlamingo 2.0.1's evaluation does
(open_flamingo/eval/ok_vqa_utils.py: postprocess_ok_vqa_generation, OKVQAStemmer).

OK-VQA v1.1 released its answers stemmed, so a prediction is stemmed the same way before the VQA
evaluator compares it with them. A text is tokenised (NLTK's word_tokenize) and POS-tagged (NLTK's
perceptron tagger); each token then becomes
  its entry in MANUAL_MATCHES, where it has one (OK-VQA's own fixes, checked against its raw and
             stemmed answers: "christmas" stays, "leaves" -> "leaf", "clothing" -> "cloth", ...), else
  its WordNet verb lemma when it ends in "ing" (WordNetLemmatizer.lemmatize(word, "v"): the
             shortest of morphy's forms, the word itself when there are none), else
  inflection.singularize(word) when it is tagged NNS or NNPS, else
  itself;
and the tokens are joined by single spaces. Nothing is lowercased (the evaluator does that after),
and the lookups are case-sensitive, as there.

WordNet, the tagger and the Punkt tables are the NLTK data WUPS uses, found and loaded the same way
(wups.Wups.load); `inflection` is a package of its own.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..formats.artifacts import ArtifactError
from .wups import Wups

# OK-VQA's manual matches (ok_vqa_utils.py's _MANUAL_MATCHES, transcribed): word -> its stem.
MANUAL_MATCHES = dict(pair.split(":") for pair in """
police:police las:las vegas:vegas yes:yes jeans:jean hell's:hell domino's:domino morning:morn
clothes:cloth are:are riding:ride leaves:leaf dangerous:danger clothing:cloth texting:text kiting:kite
firefighters:firefight ties:tie married:married teething:teeth gloves:glove tennis:tennis dining:dine
directions:direct waves:wave christmas:christmas drives:drive pudding:pud coding:code plating:plate
quantas:quanta hornes:horn graves:grave mating:mate paned:pane alertness:alert sunbathing:sunbath
tenning:ten wetness:wet urinating:urine sickness:sick braves:brave firefighting:firefight lenses:lens
reflections:reflect backpackers:backpack eatting:eat designers:design curiousity:curious
playfulness:play blindness:blind hawke:hawk tomatoe:tomato rodeoing:rodeo brightness:bright
circuses:circus skateboarders:skateboard staring:stare electronics:electron electicity:elect
mountainous:mountain socializing:social hamburgers:hamburg caves:cave transitions:transit wading:wade
creame:cream toileting:toilet sautee:saute buildings:build belongings:belong stockings:stock walle:wall
cumulis:cumuli travelers:travel conducter:conduct browsing:brows pooping:poop haircutting:haircut
toppings:top hearding:heard sunblocker:sunblock bases:base markings:mark mopeds:mope
kindergartener:kindergarten pies:pie scrapbooking:scrapbook couponing:coupon meetings:meet
elevators:elev lowes:low men's:men childrens:children shelves:shelve paintings:paint raines:rain
paring:pare expressions:express routes:rout pease:peas vastness:vast awning:awn boy's:boy
drunkenness:drunken teasing:teas conferences:confer ripeness:ripe suspenders:suspend earnings:earn
reporters:report kid's:kid containers:contain corgie:corgi porche:porch microwaves:microwave
batter's:batter sadness:sad apartments:apart oxygenize:oxygen striping:stripe purring:pure
professionals:profession piping:pipe farmer's:farmer potatoe:potato emirates:emir womens:women
veteran's:veteran wilderness:wilder propellers:propel alpes:alp charioteering:chariot swining:swine
illness:ill crepte:crept adhesives:adhesive regent's:regent decorations:decor rabbies:rabbi
overseas:oversea travellers:travel casings:case smugness:smug doves:dove nationals:nation
mustange:mustang ringe:ring gondoliere:gondolier vacationing:vacate reminders:remind baldness:bald
settings:set glaced:glace coniferous:conifer revelations:revel personals:person daughter's:daughter
badness:bad projections:project polarizing:polar vandalizers:vandal minerals:miner protesters:protest
controllers:control weddings:wed sometimes:sometime earing:ear
""".split())


@dataclass
class OkvqaStemmer:
    """OK-VQA v1.1's stemming over one WordNet, tagger, tokenizer and singulariser (see the module's docstring)."""
    wordnet: object  # an nltk WordNetCorpusReader
    tag: Callable[[list[str]], list[tuple[str, str]]]
    tokenize: Callable[[str], list[str]]
    singularize: Callable[[str], str]

    @classmethod
    def load(cls) -> OkvqaStemmer:
        """From NLTK's data path, as WUPS loads it; ArtifactError naming what is missing."""
        try:
            import inflection
        except ImportError:
            raise ArtifactError("OK-VQA stemming needs inflection: pip install inflection") from None
        nltk = Wups.load("OK-VQA stemming")
        return cls(wordnet=nltk.wordnet, tag=nltk.tag, tokenize=nltk.tokenize, singularize=inflection.singularize)

    def stem_word(self, word: str, tag: str) -> str:
        if word in MANUAL_MATCHES:
            return MANUAL_MATCHES[word]
        if word.endswith("ing"):
            forms = self.wordnet._morphy(word, "v")
            return min(forms, key=len) if forms else word
        if tag.startswith(("NNS", "NNPS")):
            return self.singularize(word)
        return word

    def __call__(self, text: str) -> str:
        return " ".join(self.stem_word(word, tag) for word, tag in self.tag(self.tokenize(text)))
