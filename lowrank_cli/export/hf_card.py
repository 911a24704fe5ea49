"""The model card (`README.md`) of a Hub folder written by `export --format hf`: Hub YAML front matter and what was done.

Every figure on it comes from the checkpoint: its manifest (the recipe's rank rule and κ, each layer's rank, the source
file, the distillation record), the parameters counted on the model, and, when the checkpoint is a run's student with
the run's `report.json` beside it, the quality that run measured on its held-out data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowrank_cli.io.manifest import LayerEntry

METRICS = (("perplexity", "perplexity", "{:.2f}"), ("top1", "top-1", "{:.2%}"), ("top5", "top-5", "{:.2%}"),
           ("mean_cosine", "mean cosine to the dense model", "{:.4f}"), ("neighbour_agreement", "nearest-neighbour agreement", "{:.2%}"),
           ("feature_cosine", "hidden-state cosine", "{:.4f}"), ("logit_cosine", "logit cosine", "{:.4f}"))
ROWS = (("teacher", "dense (the teacher)"), ("svd", "factorized, before distillation"), ("distilled", "distilled (the run's student, in its own dtype)"))
METHODS = {"svd": "SVD", "whitened": "whitened SVD", "asvd": "activation-aware SVD", "pclora": "PC-LoRA"}
PIPELINE_TAGS = {"causal-lm": "text-generation", "features": "feature-extraction", "classification": "text-classification",
                 "image-classification": "image-classification", "masked-lm": "fill-mask"}


@dataclass
class CardFacts:
    """What the card says: the folder and how to load it, where the model came from, how it was factorized."""

    title: str  # the folder's name
    architecture: str  # the transformers class it is built on (LlamaForCausalLM)
    auto_class: str  # the Auto class that loads it (AutoModelForCausalLM)
    task: str  # the model's lowrank task (causal-lm, features, ...)
    layers: dict[str, LayerEntry]
    params: tuple[int, int]  # before (dense), after (factorized)
    dtype: str
    command: str  # the export command
    base_model: str | None = None  # a Hub id
    source: dict[str, Any] | None = None  # the manifest's source: file, sha256
    recipe: dict[str, Any] | None = None
    distill: dict[str, Any] | None = None
    report: dict[str, Any] | None = None  # the run's report.json
    sentence_transformers: bool = False  # the folder has sentence-transformers' modules.json


def run_report(checkpoint: Path) -> dict[str, Any] | None:
    """The `report.json` of the run whose student `checkpoint` is (beside it, naming it), else None."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    student = report.get("student") if isinstance(report, dict) else None
    if not isinstance(student, str) or Path(student).name != checkpoint.name or not isinstance(report.get("accuracy"), dict):
        return None
    return report


def dense_params(factorized: int, layers: dict[str, LayerEntry]) -> int:
    """The parameters of the dense model a factorized one came from: each layer's factors back to its d_out × d_in matrix."""
    return factorized + sum(e.d_in * e.d_out - e.rank * (e.d_in + e.d_out) for e in layers.values())


def _front_matter(f: CardFacts) -> str:
    tags = ["lowrank", "low-rank", "compressed", "custom_code"] + (["sentence-transformers"] if f.sentence_transformers else [])
    lines = ["---"]
    if f.base_model:
        lines.append(f"base_model: {f.base_model}")
    lines += ["library_name: transformers"]
    if f.task in PIPELINE_TAGS:
        lines.append(f"pipeline_tag: {PIPELINE_TAGS[f.task]}")
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["---", "", ""]
    return "\n".join(lines)


def _usage(f: CardFacts) -> list[str]:
    where = f.title  # the folder, or the repository it is pushed to
    lines = ["## Loading it", "", "Stock transformers (no `lowrank` needed); the folder's `modeling_lowrank.py` builds the low-rank "
             "layers, so `trust_remote_code=True` is required:", "", "```python", f"from transformers import {f.auto_class}",
             f'model = {f.auto_class}.from_pretrained("{where}", trust_remote_code=True)', "```", ""]
    if f.sentence_transformers:
        lines += ["or, with its pooling, in sentence-transformers:", "", "```python",
                  "from sentence_transformers import SentenceTransformer",
                  f'model = SentenceTransformer("{where}", trust_remote_code=True)', "```", ""]
    return lines


def _layer_type(name: str) -> str:
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


def _rank_table(layers: dict[str, LayerEntry]) -> list[str]:
    """One row per layer type (names with their block numbers as `*`): count, shape, ranks, share of the weights kept."""
    groups: dict[str, list[LayerEntry]] = {}
    for name, e in layers.items():
        groups.setdefault(_layer_type(name), []).append(e)
    lines = ["| layers | count | d_in → d_out | rank | weights kept |", "| --- | ---: | --- | --- | ---: |"]
    for kind, entries in groups.items():
        shapes = sorted({f"{e.d_in} → {e.d_out}" for e in entries})
        ranks = sorted(e.rank for e in entries)
        rank = str(ranks[0]) if ranks[0] == ranks[-1] else f"{ranks[0]}–{ranks[-1]} (mean {sum(ranks) / len(ranks):.0f})"
        kept = sum(e.rank * (e.d_in + e.d_out) for e in entries) / sum(e.d_in * e.d_out for e in entries)
        lines.append(f"| `{kind}` | {len(entries)} | {', '.join(shapes)} | {rank} | {kept:.1%} |")
    return lines


def _rule(factorize: dict[str, Any]) -> str:
    """The recipe's rank rule in words: `κ = 2` (each layer's parameters divided by κ), or its name."""
    rule, kappa = factorize.get("rank_rule"), factorize.get("kappa")
    if rule == "kappa" and isinstance(kappa, (int, float)):
        return f"κ = {kappa:g}"
    return f"rank rule {rule}" if rule else "ranks as recorded"


def _how(f: CardFacts) -> list[str]:
    factorize = (f.recipe or {}).get("factorize") or {}
    methods = sorted({METHODS.get(e.method, e.method) for e in f.layers.values()})
    rule_text = _rule(factorize)
    source = f.source or {}
    base = f"[{f.base_model}](https://huggingface.co/{f.base_model})" if f.base_model else f"`{Path(str(source.get('file', 'unknown'))).name}`"
    before, after = f.params
    lines = ["## What was done", "",
             f"- base model: {base}" + (f" (source file SHA-256 `{source['sha256'][:16]}…`)" if source.get("sha256") else ""),
             f"- architecture: {f.architecture}, {len(f.layers)} layers factorized ({', '.join(methods)}, {rule_text}"
             + (f", ranks allocated by {factorize['allocation']}" if factorize.get("allocation") not in (None, "uniform") else "")
             + (f", recipe `{f.recipe['name']}`" if (f.recipe or {}).get("name") else "") + ")",
             f"- parameters: {before:,} → {after:,} ({after / before:.1%} of the dense model)", f"- weights stored in {f.dtype}"]
    if f.distill:
        d = f.distill
        lines.append(f"- then distilled from the dense model ({d.get('method', '?')}, {d.get('steps', '?')} steps, base loss "
                     f"{d.get('base_loss', '?')})")
    return lines + [""] + _rank_table(f.layers) + [""]


def _quality(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return ["## Quality", "", "No held-out figure was recorded with this checkpoint (it is not a lowrank run's student with "
                "its report beside it).", ""]
    acc = report["accuracy"]
    rows = [(label, acc[key]) for key, label in ROWS if isinstance(acc.get(key), dict)]
    cols = [(k, label, fmt) for k, label, fmt in METRICS if any(isinstance(r.get(k), (int, float)) for _, r in rows)]
    data = report.get("data") or {}
    lines = ["## Quality", "", f"As the run measured it on {rows[0][1].get('examples', '?') if rows else '?'} held-out examples"
             + (f" of `{Path(str(data['source'])).name}`" if data.get("source") else "") + ":", "",
             "| model | " + " | ".join(label for _, label, _ in cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for label, r in rows:
        cells = [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else "–" for k, _, fmt in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def model_card(f: CardFacts) -> str:
    """The README.md: front matter, loading, what was done (ranks per layer type), the measured quality, the command."""
    lines = [f"# {f.title}", "", f"A low-rank factorized {f.architecture}: {len(f.layers)} of its layers are each two thin "
             "factors (`down`: rank × d_in, `up`: d_out × rank) instead of one dense matrix, stored and loaded as such "
             "(the checkpoint holds no dense copy of them).", ""]
    lines += _usage(f) + _how(f) + _quality(f.report)
    lines += ["## How it was made", "", "Exported by `lowrank` (low-rank factorization and distillation) from the factorized checkpoint:",
              "", "```", f.command, "```", ""]
    return _front_matter(f) + "\n".join(lines)
