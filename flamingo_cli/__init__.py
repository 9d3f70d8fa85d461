"""Flamingo visual language models as composable Unix stages, and the library they call.

The names a Python user starts from, importable from here; each loads its module (and torch)
only when first used, so `import flamingo_cli` stays cheap:

    from flamingo_cli import load
    flamingo = load()                                   # a directory, a hub repo id, or the bundled model
    flamingo.caption("cat.png", shots=[("dog.png", "a dog")])

    from flamingo_cli import load_checkpoint, load_for_inference, generate_records   # what the stages call

The layers (model, formats, inference, training, evaluation, importers, cli) are described
in ARCHITECTURE.md.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FlamingoError": "errors",
    "load": "inference.pipeline",
    "Pipeline": "inference.pipeline",
    "Flamingo": "model.flamingo",
    "FlamingoConfig": "model.config",
    "load_checkpoint": "formats.checkpoint",
    "new_model": "formats.checkpoint",
    "save_checkpoint": "formats.checkpoint",
    "read_records": "formats.records",
    "read_records_file": "formats.records",
    "write_records": "formats.records",
    "load_for_inference": "inference.media",
    "encode_records": "inference.encoding",
    "resample_records": "inference.encoding",
    "load_template": "inference.prompting",
    "prompt_records": "inference.prompting",
    "generate_records": "inference.generation",
    "score_records": "inference.scoring",
    "pretrain": "training.pretraining",
    "read_benchmark": "evaluation.benchmarks",
    "evaluate_records": "evaluation.evaluate",
    "import_openflamingo": "importers.openflamingo",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
