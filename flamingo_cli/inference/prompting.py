"""Few-shot prompts: templates, choosing demonstrations (shots) and rendering a prompt.

A prompt record is the query record plus `prompt` (text with one `<image>` per media entry),
`media` (the shots' media, then the query's), `shots` (the support ids used) and `template`, and
`bos: false` where the template's prompts begin without the LM's beginning-of-sequence token.
Both `flamingo prompt` and `flamingo generate --shots` build prompts here, so the two agree.
"""
from __future__ import annotations

import math
import random
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import FlamingoError
from ..formats.presets import preset_path
from .rices import RicesVectors, rank

IMAGE = "<image>"
METHODS = ("first", "random", "rices")
# The paper's zero-shot prompts carry two text-only examples.
ZERO_SHOT_EXAMPLES = 2
MEDIA_FIELDS = ("visual", "features", "image", "video")


# -- templates ---------------------------------------------------------------------------

class TemplateError(FlamingoError):
    """A malformed template; `problem` lets a loader name the file instead of the template."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"template {name}: {problem}")
        self.problem = problem


@dataclass
class Template:
    """How a record becomes a demonstration (`shot`) or the final question (`query`).

    `shot`, `query` and `continuation` are format strings over plain `{field}` names;
    `answer` names the record field a demonstration's answer comes from. `prefix` is plain text
    that begins every prompt (an instruction), before its first demonstration; `bos` false
    tokenizes the prompts without the LM's beginning-of-sequence token."""

    name: str
    shot: str
    query: str
    answer: str
    candidates: list[str] | None = None
    continuation: str = " {candidate}<|endofchunk|>"
    prefix: str = ""
    bos: bool = True

    def __post_init__(self):
        problem = _template_problem(self)
        if problem:
            raise TemplateError(self.name, problem)


def _placeholders(fmt: str) -> list[str]:
    """The field names of a format string; ValueError for anything but plain `{name}`s,
    since values are rendered as str() and attribute or index lookups would fail late."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(fmt):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"placeholder {{{name}}} is not a plain {{field}} name")
        names.append(name)
    return names


def _template_problem(t: Template) -> str | None:
    for key in ("shot", "query", "answer", "continuation", "prefix"):
        if not isinstance(getattr(t, key), str):
            return f"{key} must be a string"
    if not isinstance(t.bos, bool):
        return "bos must be true or false"
    if IMAGE in t.prefix or "{" in t.prefix or "}" in t.prefix:
        return f"prefix is plain text: no {IMAGE} and no {{field}}"
    if t.candidates is not None and (
        not isinstance(t.candidates, list) or not t.candidates
        or not all(isinstance(c, str) for c in t.candidates)
    ):
        return "candidates must be a non-empty list of strings"
    fields = {}
    for key in ("shot", "query", "continuation"):
        try:
            fields[key] = _placeholders(getattr(t, key))
        except ValueError as e:
            return f"{key}: {e}"
    for key in ("shot", "query"):
        count = getattr(t, key).count(IMAGE)
        if count != 1:
            return f"{key} must contain exactly one {IMAGE} (found {count})"
    if t.answer not in fields["shot"]:
        return f"shot does not use the answer field {{{t.answer}}}"
    # Scoring fills the continuation with the candidate alone.
    if fields["continuation"] != ["candidate"]:
        return "continuation must use {candidate} once and no other field"
    return None


_TEMPLATE_KEYS = {"shot", "query", "answer", "candidates", "continuation", "prefix", "bos"}
_REQUIRED_KEYS = ("shot", "query", "answer")


def load_template(name_or_file: str) -> Template:
    """A shipped template by name (stages/prompt/<name>.yaml) or a YAML file path.

    The template's name is `name_or_file` as given, so the `template` field of a prompt
    record can be loaded again downstream (by `flamingo score`), file or not."""
    import yaml

    path = preset_path("prompt", name_or_file)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FlamingoError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise FlamingoError(f"{path}: invalid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise FlamingoError(f"{path}: expected a mapping of template keys")
    for key in data:
        if key not in _TEMPLATE_KEYS:
            raise FlamingoError(f"{path}: unknown key '{key}' (expected: {', '.join(sorted(_TEMPLATE_KEYS))})")
    for key in _REQUIRED_KEYS:
        if key not in data:
            raise FlamingoError(f"{path}: missing key '{key}'")
    try:
        return Template(name=name_or_file, **data)
    except TemplateError as e:
        raise FlamingoError(f"{path}: {e.problem}") from None


# -- rendering ---------------------------------------------------------------------------

def _record_id(record: dict[str, Any]) -> Any:
    """A record's id; every record needs one (records read from files always have one)."""
    if record.get("id") is None:
        raise FlamingoError(f"a record has no 'id' (it seeds the record's shots and joins its results): "
                            f"{', '.join(sorted(record))[:120]}")
    return record["id"]


class _Fields:
    """The mapping format_map sees: str() of a record's fields, with errors naming the record."""

    def __init__(self, record: dict[str, Any], what: str):
        self.record, self.what = record, what

    def __getitem__(self, field: str) -> str:
        rid = _record_id(self.record)
        if field not in self.record:
            raise FlamingoError(f"{rid}: template {self.what} needs field '{field}'")
        value = str(self.record[field])
        # A marker inside data would pair the text with the wrong number of media.
        if IMAGE in value:
            raise FlamingoError(f"{rid}: field '{field}' contains the media marker {IMAGE}")
        return value


def render(template_string: str, record: dict[str, Any], what: str) -> str:
    """`template_string` filled with the record's fields; `what` names the template in errors.
    Only the template is a format string: braces inside field values stay literal."""
    return template_string.format_map(_Fields(record, what))


def media_entry(record: dict[str, Any]) -> str:
    """The record's media: the most processed form it carries (visual tokens, then
    features, then an image or video path)."""
    for field in MEDIA_FIELDS:
        if record.get(field):
            return record[field]
    raise FlamingoError(f"{_record_id(record)}: no media (expected a visual, features or image field)")


# -- choosing shots ----------------------------------------------------------------------

def select_shots(
    query: dict[str, Any],
    support: list[dict[str, Any]],
    k: int,
    method: str,
    seed: int,
    *,
    query_vector=None,
    support_vectors=None,
) -> list[int]:
    """Indices into `support` of the k demonstrations for `query`, in prompt order.

    The query's own id is never eligible, so a query drawn from the support set cannot see
    its answer. `random` depends only on (seed, query id), so a query gets the same shots
    whatever else is in the batch, and in any process or rank. `rices` takes the k most
    cosine-similar by the vectors given (rices.RicesVectors), ordered so the most similar comes last."""
    if method not in METHODS:
        raise ValueError(f"unknown shot selection method {method!r} (expected one of {', '.join(METHODS)})")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    qid = _record_id(query)
    # Ids compare as text, matching the seed below: 7 and "7" are the same record.
    eligible = [i for i, s in enumerate(support) if str(_record_id(s)) != str(qid)]
    if k > len(eligible):
        raise FlamingoError(
            f"{qid}: {k} support examples needed but only {len(eligible)} available (the query's own id excluded)"
        )
    if k == 0:
        return []
    if method == "first":
        return eligible[:k]
    if method == "random":
        # A str seed is hashed with SHA-512 by random.Random, unlike hash(), which is salted per process.
        return random.Random(f"{seed}\0{qid}").sample(eligible, k)
    return rank(eligible, k, query_vector, support_vectors, len(support))


# -- prompts -----------------------------------------------------------------------------

def build_prompt(
    template: Template,
    query: dict[str, Any],
    shots: list[dict[str, Any]],
    *,
    zero_shot_examples: list[dict[str, Any]] | None = None,
) -> tuple[str, list[str]]:
    """(prompt text, media): the template's prefix, the shots rendered in order, then the query.

    Zero-shot, `zero_shot_examples` are rendered as shots without their `<image>`, text
    only, which the paper found better than an empty context."""
    if shots and zero_shot_examples:
        raise ValueError("zero_shot_examples apply only when there are no shots")
    text_only = template.shot.replace(IMAGE, "")
    parts = [template.prefix] + [render(text_only, ex, template.name) for ex in zero_shot_examples or []]
    parts += [render(template.shot, s, template.name) for s in shots]
    parts.append(render(template.query, query, template.name))
    text = "".join(parts)
    media = [media_entry(s) for s in shots] + [media_entry(query)]
    assert text.count(IMAGE) == len(media), "one <image> per media entry"
    return text, media


def make_prompt_records(
    template: Template,
    query: dict[str, Any],
    support: list[dict[str, Any]],
    *,
    k: int,
    method: str,
    seed: int,
    ensembles: int = 1,
    query_vector=None,
    support_vectors=None,
) -> list[dict[str, Any]]:
    """New records: the query's fields plus `prompt`, `media`, `shots` and `template`.
    With k == 0, two support examples chosen the same way become text-only examples.

    With ensembles > 1 (prompt ensembling, for close-ended tasks), one record per order of the
    same shots, min(ensembles, k!) of them: the selected order first, then distinct orders drawn
    from (seed, query id) alone; each carries `ensemble` (0, 1, ...)."""
    n = k or ZERO_SHOT_EXAMPLES
    chosen = [
        support[i]
        for i in select_shots(
            query, support, n, method, seed, query_vector=query_vector, support_vectors=support_vectors
        )
    ]
    orders = ensemble_orders(len(chosen), ensembles, seed, _record_id(query))
    return [_prompt_record(template, query, [chosen[i] for i in order], k, e if ensembles > 1 else None)
            for e, order in enumerate(orders)]


def _prompt_record(template: Template, query: dict[str, Any], shots: list[dict[str, Any]], k: int,
                   ensemble: int | None) -> dict[str, Any]:
    """The query's fields plus its prompt from `shots` in this order (text only when k == 0)."""
    if k > 0:
        text, media = build_prompt(template, query, shots)
    else:
        text, media = build_prompt(template, query, [], zero_shot_examples=shots)
    record = {**query, "prompt": text, "media": media, "shots": [_record_id(s) for s in shots],
              "template": template.name}
    record.pop("bos", None)  # the template's to say, not an earlier prompt's
    if not template.bos:
        record["bos"] = False
    if ensemble is not None:
        record["ensemble"] = ensemble
    return record


def ordered_prompt_records(template: Template, queries: Iterable[dict[str, Any]], support: list[dict[str, Any]],
                           orders: Iterable[list[list[int]]], *, k: int) -> Iterator[dict[str, Any]]:
    """Prompt records whose demonstrations an evaluation protocol chose (evaluation.protocols):
    `orders` gives, query by query, one or more orders of indices into `support`, each in prompt
    order; k == 0 renders them text only. A query with several orders (prompt ensembling) gives
    one record per order, each with `ensemble` (0, 1, ...)."""
    for query, query_orders in zip(queries, orders):
        for e, order in enumerate(query_orders):
            yield _prompt_record(template, query, [support[i] for i in order], k,
                                 e if len(query_orders) > 1 else None)


def rices_shots(queries: Iterable[dict[str, Any]], support: list[dict[str, Any]], k: int, *,
                vectors: str = "pooled") -> Iterator[list[int]]:
    """For each query, the k support records most cosine-similar to it by `vectors` (`pooled`:
    the encoder's pooled features; `embedding`: the CLIP image embedding, OpenFlamingo's RICES),
    most similar last, as `--select rices` chooses them."""
    similarity = RicesVectors(vectors)
    stacked = similarity.stack(support)
    for query in queries:
        yield select_shots(query, support, k, "rices", 0, query_vector=similarity(query), support_vectors=stacked)


def make_prompt_record(template: Template, query: dict[str, Any], support: list[dict[str, Any]], *, k: int,
                       method: str, seed: int, query_vector=None, support_vectors=None) -> dict[str, Any]:
    """One prompt record for `query` (see make_prompt_records)."""
    return make_prompt_records(template, query, support, k=k, method=method, seed=seed,
                               query_vector=query_vector, support_vectors=support_vectors)[0]


def ensemble_orders(n: int, ensembles: int, seed: int, query_id: Any) -> list[list[int]]:
    """min(ensembles, n!) distinct orders of n demonstrations, the identity first; the rest
    depend only on (seed, query id), like the shots themselves."""
    if ensembles < 1:
        raise ValueError(f"ensembles must be >= 1, got {ensembles}")
    total = min(ensembles, math.factorial(n))
    orders = [list(range(n))]
    rng = random.Random(f"{seed}\0{query_id}\0ensemble")
    while len(orders) < total:
        order = rng.sample(range(n), n)
        if order not in orders:
            orders.append(order)
    return orders


def prompt_records(template: Template, queries: Iterable[dict[str, Any]], support: list[dict[str, Any]], *, k: int,
                   method: str, seed: int, ensembles: int = 1, at_most: bool = False,
                   vectors: str = "pooled") -> Iterator[dict[str, Any]]:
    """Prompt records for every query (what `flamingo prompt` writes), made as the queries are
    consumed. For `rices`, the similarity vectors are `vectors` of each record, as `flamingo
    encode` stored them (see rices_shots). With at_most, k is an upper bound: a query with fewer
    eligible support records (its own id excluded) gets all of them; without it, that is an error."""
    similarity = RicesVectors(vectors) if method == "rices" else None
    support_vectors = similarity.stack(support) if similarity else None
    available = shots_available(support)
    for query in queries:
        kw = {} if similarity is None else {"query_vector": similarity(query), "support_vectors": support_vectors}
        shots = min(k, available(query)) if at_most and k > 0 else k
        yield from make_prompt_records(template, query, support, k=shots, method=method, seed=seed,
                                       ensembles=ensembles, **kw)


def shots_available(support: list[dict[str, Any]]) -> Callable[[dict[str, Any]], int]:
    """How many support records may be a query's shots: all but those with its own id
    (compared as text, as select_shots does)."""
    ids = Counter(str(_record_id(s)) for s in support)
    return lambda query: len(support) - ids[str(_record_id(query))]
