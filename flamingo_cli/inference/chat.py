"""Visual dialogue: a dialogue record as a prompt and its answer, batched (answer_records, what
`flamingo chat` does as a filter) or streamed piece by piece as its tokens come (Chat, a
running dialogue about one image).

A dialogue record:

    {"id": ..., "image": "cat.png", "caption": "a cat on a mat",
     "history": [{"question": "What is it?", "answer": "a cat"}, ...], "question": "Is it asleep?"}

`caption` and `history` are optional; `visual` or `features` (references) may stand for the
image, as in any record. Its prompt is the shots (demonstrations rendered through a template's
`shot`, chosen as `generate --shots` chooses them), then `<image>` and the dialogue's text. That
text is `render(record)`'s: `flamingo chat` passes the rendering VisDial evaluation uses
(evaluation.dialogue.dialogue_text), given here as a function since inference does not import
the evaluation layer. An answer ends where the model starts a new round (ANSWER_ENDS).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..formats.artifacts import ArtifactError
from .generation import cut_text, generate_records, stream_record
from .media import MediaResolver
from .prompting import IMAGE, Template, media_entry, prompt_records

Render = Callable[[dict], str]
# A newline, or the next round's "Question" (as `evaluate --cut-at Question` cuts a generation).
ANSWER_ENDS = ("\n", "Question")
QUERY = IMAGE + "{dialogue}"


@dataclass
class Shots:
    """Demonstrations before every dialogue: k support records chosen by `select` (random, first
    or rices) from (seed, the dialogue's id), each rendered through template.shot; k = 0 gives
    the two text-only examples of a zero-shot prompt. With at_most, k is an upper bound."""
    template: Template
    support: list[dict] = field(default_factory=list)
    k: int = 4
    select: str = "random"
    seed: int = 0
    at_most: bool = False


def check_dialogue(record: dict) -> dict:
    """The record, its dialogue fields checked: a question, an optional caption, a history of
    {"question", "answer"} rounds, and no media marker in any of their text."""
    rid = record.get("id", "<record>")
    question, caption, history = record.get("question"), record.get("caption"), record.get("history", [])
    if not isinstance(question, str) or not question.strip():
        raise ArtifactError(f"{rid}: no 'question' text")
    if caption is not None and not isinstance(caption, str):
        raise ArtifactError(f"{rid}: 'caption' must be text")
    if not isinstance(history, list) or not all(
            isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
            for r in history):
        raise ArtifactError(f"{rid}: 'history' must be a list of {{\"question\": ..., \"answer\": ...}} rounds")
    texts = [("question", question), ("caption", caption or "")]
    texts += [(f"history[{i}].{key}", r[key]) for i, r in enumerate(history) for key in ("question", "answer")]
    for name, text in texts:
        if IMAGE in text:
            raise ArtifactError(f"{rid}: '{name}' contains the media marker {IMAGE}")
    return record


def prompt_record(record: dict, render: Render, shots: Shots | None = None) -> dict:
    """A dialogue record as a prompt record: the record plus `prompt` and `media` (and, with
    shots, `shots` and `template`, as flamingo prompt writes them)."""
    query = {**check_dialogue(record), "dialogue": render(record)}
    if shots is None:
        return {**query, "prompt": IMAGE + query["dialogue"], "media": [media_entry(query)]}
    template = replace(shots.template, query=QUERY)  # its shots, prefix and BOS; the dialogue as the query
    return next(prompt_records(template, [query], shots.support, k=shots.k, method=shots.select, seed=shots.seed,
                               at_most=shots.at_most))


def answer_records(model, records: Sequence[dict], media: MediaResolver, render: Render, *,
                   shots: Shots | None = None, num_beams: int = 1, max_new_tokens: int = 20,
                   length_penalty: float = 1.0, device: str = "cpu", prefix_cache=None) -> list[dict]:
    """One batch of dialogue records, each with its `output`: generate_records on their prompts,
    the answers cut at ANSWER_ENDS. With num_beams=1 an output is what Chat streams."""
    prompts = [prompt_record(record, render, shots) for record in records]
    outputs = generate_records(model, prompts, media, num_beams=num_beams, max_new_tokens=max_new_tokens,
                               length_penalty=length_penalty, device=device, prefix_cache=prefix_cache)
    return [{**record, "output": cut_text(out["output"], ANSWER_ENDS)} for record, out in zip(records, outputs)]


class Chat:
    """A dialogue about one image at a time: its caption, the rounds so far, the shots before it.

        chat = Chat(model, media, render)
        chat.attach("cat.png")
        for piece in chat.ask("What is it?"):
            print(piece, end="", flush=True)

    A round joins the history once its answer is complete; an answer given up half-way (the
    generator closed, Ctrl-C) leaves the history as it was. chat.record(question) is the
    dialogue record a question is answered as, so answer_records gives the same answer."""

    def __init__(self, model, media: MediaResolver, render: Render, *, shots: Shots | None = None,
                 id: str | int = "chat", num_beams: int = 1, max_new_tokens: int = 20, length_penalty: float = 1.0,
                 device: str = "cpu", prefix_cache=None):
        self.model, self.media, self.render, self.shots, self.id = model, media, render, shots, id
        self.decoding = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
        self.device, self.prefix_cache = device, prefix_cache
        self.image: str | None = None
        self.caption: str | None = None
        self.history: list[dict] = []
        self._inline: list[str] = []

    def attach(self, image: Any, caption: str | None = None) -> None:
        """A new dialogue about `image` (a path, a reference, or a PIL image), with an empty
        history. The image is read and resampled now, so a bad file is an error here and the
        dialogue so far stays as it was."""
        if isinstance(image, (str, Path)):
            entry, inline = str(image), []
            self.media.visual(entry)
        else:
            entry = self.media.add_inline(image)
            inline = [entry]
        self.media.forget_inline([e for e in self._inline if e not in inline])
        self._inline = inline
        self.image, self.caption, self.history = entry, caption, []

    def reset(self) -> None:
        """The same image and caption, no rounds."""
        self.history = []

    def record(self, question: str) -> dict:
        if self.image is None:
            raise ArtifactError("no image to talk about: attach one first")
        record = {"id": self.id, "image": self.image}
        if self.caption:
            record["caption"] = self.caption
        return {**record, "history": [dict(r) for r in self.history], "question": question}

    def ask(self, question: str) -> Iterator[str]:
        """The answer to `question`, in pieces as they are decoded (greedy); with num_beams > 1
        in one piece, once the beams are done."""
        record = self.record(question)
        prompt = prompt_record(record, self.render, self.shots)
        if self.decoding["num_beams"] == 1:
            pieces = stream_record(self.model, prompt, self.media, max_new_tokens=self.decoding["max_new_tokens"],
                                   device=self.device, prefix_cache=self.prefix_cache, stop_at=ANSWER_ENDS)
        else:
            [out] = generate_records(self.model, [prompt], self.media, device=self.device,
                                     prefix_cache=self.prefix_cache, **self.decoding)
            pieces = [text] if (text := cut_text(out["output"], ANSWER_ENDS)) else []
        answer = []
        for piece in pieces:
            answer.append(piece)
            yield piece
        self.history.append({"question": question, "answer": "".join(answer)})
