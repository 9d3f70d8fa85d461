"""One call each for a Python user: caption, answer or rank candidates for images, with shots.

    from flamingo_cli import load

    flamingo = load("ckpt/")          # a checkpoint directory, a hub repo id, or None: the bundled model
    flamingo.caption("cat.png", shots=[("dog.png", "a dog")])                        # -> "a cat"
    flamingo.answer(image, "What colour is it?", shots=[("dog.png", "What colour is it?", "brown")])
    flamingo.rank(image, ["cat", "dog"], shots=[("dog.png", "dog")])       # -> [("cat", -0.1), ("dog", -2.3)]

Images are PIL images or paths (of images or videos); a list of them gives a list of results.
The prompts are built by the templates and function `flamingo prompt` uses, the shots in the
order given, and run by generate_records and score_records, as `generate` and `score` run them.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

from .generation import batches, generate_records
from .media import MediaResolver, load_for_inference
from .prompting import build_prompt, load_template
from .scoring import score_records


class Pipeline:
    """A loaded model and its media resolver, with the few-shot tasks as methods."""

    def __init__(self, model, media: MediaResolver, *, batch_size: int = 8):
        self.model, self.media, self.batch_size = model, media, batch_size

    def caption(self, images, shots: Sequence[tuple] = (), *, template: str = "captioning", num_beams: int = 3,
                max_new_tokens: int = 20):
        """A caption per image; shots are (image, caption) pairs."""
        fields = [{"caption": caption} for _, caption in shots]
        return self._generate(template, images, {}, shots, fields, num_beams, max_new_tokens)

    def answer(self, images, question: str, shots: Sequence[tuple] = (), *, template: str = "vqa",
               num_beams: int = 3, max_new_tokens: int = 20):
        """The answer to `question` per image; shots are (image, question, answer) triples."""
        fields = [{"question": q, "answer": a} for _, q, a in shots]
        return self._generate(template, images, {"question": question}, shots, fields, num_beams, max_new_tokens)

    def rank(self, images, candidates: Sequence[str], shots: Sequence[tuple] = (), *,
             template: str = "classification", normalize: str = "sum"):
        """Per image, the candidates and their log-likelihoods, best first; shots are (image,
        label) pairs. normalize: "sum" (the paper's) or "mean" per token."""
        fields = [{load_template(template).answer: label} for _, label in shots]
        single, records = self._records(template, images, {}, shots, fields)
        with records as prompts:
            scored = [sorted(r["scores"].items(), key=lambda kv: -kv[1]) for r in score_records(
                self.model, prompts, self.media, candidates=list(candidates), normalize=normalize)]
        return scored[0] if single else scored

    def _generate(self, template, images, query, shots, fields, num_beams, max_new_tokens):
        single, records = self._records(template, images, query, shots, fields)
        with records as prompts:
            outputs = [r["output"] for batch in batches(prompts, self.batch_size) for r in generate_records(
                self.model, batch, self.media, num_beams=num_beams, max_new_tokens=max_new_tokens,
                device=self.media.device)]
        return outputs[0] if single else outputs

    def _records(self, template_name: str, images, query: dict, shots: Sequence[tuple], fields: list[dict]):
        """(one image given, a context manager over the prompt records): in-memory images are
        entries of the resolver until the records are done with."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        template = load_template(template_name)

        @contextlib.contextmanager
        def records() -> Iterator[list[dict[str, Any]]]:
            added: list[str] = []

            def entry(image) -> str:
                if isinstance(image, (str, Path)):
                    return str(image)
                added.append(self.media.add_inline(image))
                return added[-1]

            try:
                support = [{**f, "id": f"shot-{i}", "image": entry(shot[0])} for i, (shot, f) in
                           enumerate(zip(shots, fields))]
                prompts = []
                for i, image in enumerate(images):
                    record = {**query, "id": i, "image": entry(image)}
                    text, media = build_prompt(template, record, support)
                    prompts.append({**record, "prompt": text, "media": media})
                yield prompts
            finally:
                self.media.forget_inline(added)
        return single, records()


def load(name: str | Path | None = None, *, revision: str | None = None, device: str = "cpu",
         dtype: str | None = None, device_map: str | dict | None = None, batch_size: int = 8) -> Pipeline:
    """A Pipeline over a checkpoint: a directory, a hub repo id (at revision), or, with no name,
    the bundled toy model. dtype and device_map: as the stages' --dtype and --device-map."""
    from ..formats.checkpoint import BUNDLED_CHECKPOINT, checkpoint_path

    directory = BUNDLED_CHECKPOINT if name is None else checkpoint_path(name, revision)
    model, media = load_for_inference(directory, device, dtype=dtype, device_map=device_map)
    return Pipeline(model, media, batch_size=batch_size)
