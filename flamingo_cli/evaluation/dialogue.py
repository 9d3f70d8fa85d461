"""A visual dialogue as text: the image's caption, the rounds so far, the question now asked.

VisDial evaluation (its adapter renders each round's `dialogue` field with this) and `flamingo
chat` (its running history) build their prompts here, so a dialogue reads the same to the
model in both. The text follows the image's `<image>` marker and ends where the answer goes;
the paper's VQA prompt ("Question: ... Answer: ...") is each round's form.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..formats.artifacts import ArtifactError


@dataclass(frozen=True)
class Round:
    question: str
    answer: str


def _question(text: str) -> str:
    # VisDial's questions are stored without their question mark; a typed one keeps its own
    text = " ".join(text.split())
    return text if not text or text[-1] in "?.!" else text + "?"


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if not text or text[-1] in ".?!" else text + "."


def dialogue_text(question: str, history: Sequence[Round] = (), caption: str | None = None) -> str:
    """'{caption}. Question: {q1}? Answer: {a1} ... Question: {question}? Answer:'.

    Answers stay as given, without a full stop added, so a round in the history reads exactly
    as a demonstration's answer and a scored candidate do."""
    if not question.strip():
        raise ArtifactError("a dialogue round needs a question")
    parts = [_sentence(caption)] if caption and caption.strip() else []
    parts += [f"Question: {_question(r.question)} Answer: {' '.join(r.answer.split())}" for r in history]
    parts.append(f"Question: {_question(question)} Answer:")
    return " ".join(parts)
