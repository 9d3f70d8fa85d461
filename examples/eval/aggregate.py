"""Collect the sweep's cells into results.json, results.md (the paper's table layout) and fewshot.png.

    python examples/eval/aggregate.py OUT

Reads OUT/<bench>/cells/<k>shot-seed<s>.json (each one `flamingo evaluate` summary) and writes,
in OUT: results.json ({bench: {metric, protocol, shots: {k: {mean, std, n_seeds, seeds}}}}; caption
benchmarks add suite: {k: {BLEU-1 .. SPICE: mean over seeds}} and the backend that scored them),
results.md (one row per benchmark, one column per shot count, mean ± std over seeds; then the
caption suite, a row per benchmark and shot count) and fewshot.png (the metric against the number
of shots, one line per benchmark). std is the sample standard deviation over seeds (0 with one seed).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

METRIC_NAMES = {"vqa": "VQA acc.", "cider": "CIDEr", "top1": "top-1", "roc_auc": "ROC-AUC", "exact": "top-1",
                "ivqa": "iVQA acc.", "mwap": "mWAP", "wups": "WUPS", "captions": "CIDEr", "visdial": "NDCG"}
BENCH_NAMES = {"vqav2": "VQAv2", "okvqa": "OK-VQA", "vizwiz": "VizWiz", "textvqa": "TextVQA", "coco": "COCO",
               "flickr30k": "Flickr30K", "hatefulmemes": "HatefulMemes", "imagenet": "ImageNet", "msvdqa": "MSVD-QA",
               "msrvttqa": "MSRVTT-QA", "ivqa": "iVQA", "nextqa": "NextQA", "star": "STAR", "vatex": "VATEX", "youcook2": "YouCook2",
               "rareact": "RareAct", "visdial": "VisDial"}
# The caption suite's columns (evaluate --metric captions), in pycocoevalcap's order.
SUITE = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4", "meteor": "METEOR",
         "rouge_l": "ROUGE-L", "cider": "CIDEr", "spice": "SPICE"}


def collect(out: Path) -> dict:
    results: dict = {}
    for cell in sorted(out.glob("*/cells/*.json")):
        summary = json.loads(cell.read_text())
        bench = summary.get("bench", cell.parent.parent.name)
        entry = results.setdefault(bench, {"metric": summary["metric"], "protocol": summary.get("protocol", "flamingo"),
                                           "shots": {}})
        entry["shots"].setdefault(str(summary["shots"]), {})["seed" + str(summary["seed"])] = summary["score"]
        if "backend" in summary:
            entry["backend"] = summary["backend"]
            runs = entry.setdefault("suite_runs", {}).setdefault(str(summary["shots"]), [])
            runs.append({name: summary[key] for key, name in SUITE.items() if key in summary})
    for entry in results.values():
        if "suite_runs" in entry:
            entry["suite"] = {k: {name: statistics.fmean(run[name] for run in runs) for name in runs[0]}
                              for k, runs in sorted(entry.pop("suite_runs").items(), key=lambda kv: int(kv[0]))}
        table = {}
        for k in sorted(entry["shots"], key=int):
            scores = list(entry["shots"][k].values())
            table[k] = {"mean": statistics.fmean(scores),
                        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                        "n_seeds": len(scores), "seeds": entry["shots"][k]}
        entry["shots"] = table
    return results


def markdown(results: dict) -> str:
    shots = sorted({int(k) for entry in results.values() for k in entry["shots"]})
    lines = ["| benchmark | metric | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    for bench, entry in sorted(results.items()):
        cells = []
        for k in shots:
            cell = entry["shots"].get(str(k))
            cells.append("" if cell is None else f"{cell['mean']:.1f} ± {cell['std']:.1f}")
        lines.append(f"| {BENCH_NAMES.get(bench, bench)} | {METRIC_NAMES.get(entry['metric'], entry['metric'])} | "
                     + " | ".join(cells) + " |")
    suites = {bench: entry for bench, entry in sorted(results.items()) if "suite" in entry}
    if suites:
        rows = [row for entry in suites.values() for row in entry["suite"].values()]
        names = [name for name in SUITE.values() if any(name in row for row in rows)]
        lines += ["", "| benchmark | shots | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for bench, entry in suites.items():
            for k, row in entry["suite"].items():
                lines.append(f"| {BENCH_NAMES.get(bench, bench)} | {k} | "
                             + " | ".join(f"{row[n]:.1f}" if n in row else "" for n in names) + " |")
        backends = sorted({entry["backend"] for entry in suites.values()})
        lines += ["", f"Caption metrics by {' and '.join(backends)} (mean over seeds)."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for bench, entry in sorted(results.items()):
        ks = sorted(entry["shots"], key=int)
        means = [entry["shots"][k]["mean"] for k in ks]
        stds = [entry["shots"][k]["std"] for k in ks]
        label = f"{BENCH_NAMES.get(bench, bench)} ({METRIC_NAMES.get(entry['metric'], entry['metric'])})"
        ax.errorbar([int(k) for k in ks], means, yerr=stds, marker="o", capsize=3, label=label)
    ax.set_xlabel("shots")
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_xticks(sorted({int(k) for entry in results.values() for k in entry["shots"]}))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(path: Path, write) -> None:
    """Atomically: a temp file beside the target, then a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(out: Path) -> None:
    results = collect(out)
    if not results:
        sys.exit(f"aggregate.py: no cells under {out}/*/cells/")
    _write(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=1) + "\n"))
    _write(out / "results.md", lambda p: p.write_text(markdown(results)))
    _write(out / "fewshot.png", lambda p: plot(results, p))
    print(markdown(results), end="")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
