"""Benchmark: 16-bit copies of factorized causal LMs (docs/precision.md, "16-bit copies").

Models: SmolLM2-135M factorized with whitened SVD and sensitivity-allocated ranks at κ = 1.25 and distilled (`--k125`,
by default /work/bench/inmem20/student.safetensors), and at κ = 2 not distilled (`--k2`: the folder of
`lowrank factorize /work/assets/smollm2-135m --recipe causal-lm --kappa 2 --calib-data /work/assets/smollm2-text/train.jsonl
--out K2`); the original dense model (`--teacher`) for the diagnosis.

1. Diagnosis (`--seeds` draws each, weights rounded to bf16, outputs computed in fp32 as the export check does): the
   check's relative difference and how many draws fail it, on random token ids (the check's inputs before) and on real
   text (the check's inputs now: CPython's help topics, `export.precision.text_rows`) and on held-out documents.
2. Real errors, on κ = 1.25 in bf16: the check on random ids (seed 0) and on text, for copies that are wrong: factors
   rounded to float8 e5m2, one pair lost, half the components of one block's layers lost, a float16 cast of pairs
   scaled apart by 2^20 without the balance.
3. Exports (`export_checkpoint`, each verified by the export itself): dense, safetensors and hf, in bfloat16 and
   float16, of both models: the check's relative difference, top-1 agreement and inputs; the held-out perplexity on
   `--docs` documents of `--val` (at most `--tokens` tokens each), with the 16-bit weights computed in fp32 (what the
   check runs) and computed in their own dtype (as a 16-bit copy is served), as a ratio to the fp32 factorized model's.

Run: python tests/benchmarks/bench_low_precision.py [--k125 PATH] [--k2 PATH] [--teacher DIR] [--val FILE] [--docs N]
     [--seeds N] [--work DIR] [--json out.json] [--skip-diagnosis] [--kappas 1.25,2] [--dtypes bfloat16,float16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k125", default="/work/bench/inmem20/student.safetensors")
    p.add_argument("--k2", default="/tmp/h2/k2")
    p.add_argument("--teacher", default="/work/assets/smollm2-135m")
    p.add_argument("--val", default="/work/assets/smollm2-text/val.jsonl")
    p.add_argument("--docs", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--seeds", type=int, default=12)
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--skip-diagnosis", action="store_true")
    p.add_argument("--kappas", default="1.25,2", help="the exports of these models only (section 3)")
    p.add_argument("--dtypes", default="bfloat16,float16", help="the exports in these dtypes only (section 3)")
    return p.parse_args()


def _rounded(model, dtype):
    """A copy of `model` (fp32) whose parameters are rounded to `dtype` and back: what the export check computes."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.data = p.data.to(dtype).float()
    return out


def _check(family, got, want, x):
    from lowrank_cli.export.verify import compare_outputs

    with torch.no_grad():
        return compare_outputs([(family.forward(got, x), family.forward(want, x))], low_precision=True)


def _val_batches(tokenizer, path: str, n: int, length: int = 128):
    rows = []
    for line in open(path, encoding="utf-8"):
        ids = tokenizer(json.loads(line)["text"])["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == 2 * n:
            break
    return [{"input_ids": torch.tensor(rows[2 * i:2 * i + 2]), "attention_mask": torch.ones(2, length, dtype=torch.long)}
            for i in range(len(rows) // 2)]


def diagnosis(models: dict, tokenizer, args) -> list[dict]:
    """Per model: the bf16-rounded copy's check on `args.seeds` random draws, text draws and held-out batches."""
    from lowrank_cli.export.precision import text_inputs
    from lowrank_cli.models.family import get_family

    family = get_family("transformers")
    rows = []
    for name, model in models.items():
        copy = _rounded(model, torch.bfloat16)
        draws = {"random ids": [], "help-topic text": [], "held-out text": []}
        for s in range(args.seeds):
            x = family.example_inputs(model, 2, generator=torch.Generator().manual_seed(s))
            draws["random ids"].append(_check(family, copy, model, x))
            draws["help-topic text"].append(_check(family, copy, model, text_inputs(x, tokenizer, s)))
        for x in _val_batches(tokenizer, args.val, args.seeds):
            draws["held-out text"].append(_check(family, copy, model, x))
        for inputs, vs in draws.items():
            rel = [v["relative_diff"] for v in vs]
            rows.append({"model": name, "inputs": inputs, "draws": len(vs), "failed": sum(not v["passed"] for v in vs),
                         "median_rel": sorted(rel)[len(rel) // 2], "max_rel": max(rel), "min_top1": min(v["top1_agreement"] for v in vs)})
            print(f"  {name:28s} {inputs:16s} failed {rows[-1]['failed']:2d}/{len(vs)}  median {rows[-1]['median_rel']:.4f}  "
                  f"max {rows[-1]['max_rel']:.4f}  min top-1 {100 * rows[-1]['min_top1']:.2f} %", flush=True)
    return rows


def real_errors(path: Path, tokenizer) -> list[dict]:
    """The check on random ids (seed 0) and on text (seed 0) for wrong bf16/fp16 copies of the factorized model."""
    from lowrank_cli.export.cast import cast_tensors
    from lowrank_cli.export.precision import text_inputs
    from lowrank_cli.io.manifest import read_checkpoint
    from lowrank_cli.models import load
    from lowrank_cli.models.family import get_family

    family = get_family("transformers")
    _, manifest, tensors = read_checkpoint(path)
    model = load(path).float().eval()
    x_random = family.example_inputs(model, 2, generator=torch.Generator().manual_seed(0))
    x_text = text_inputs(x_random, tokenizer, 0)
    block = [n for n in manifest.layers if n.startswith("model.layers.15.")]
    lost = block[0]
    bf16 = {k: v.to(torch.bfloat16).float() for k, v in tensors.items()}
    cut = dict(bf16)
    for n in block:
        r = manifest.layers[n].rank
        cut[f"{n}.up.weight"] = torch.cat([bf16[f"{n}.up.weight"][:, : r // 2], torch.zeros_like(bf16[f"{n}.up.weight"][:, r // 2:])], 1)
    skew = {**tensors}
    for n in manifest.layers:
        skew[f"{n}.up.weight"], skew[f"{n}.down.weight"] = tensors[f"{n}.up.weight"] * 2.0 ** 20, tensors[f"{n}.down.weight"] * 2.0 ** -20
    wrong = {"factors rounded to float8 e5m2": {k: v.to(torch.float8_e5m2).float() for k, v in tensors.items()},
             f"bf16, one pair lost ({lost})": {**bf16, f"{lost}.up.weight": torch.zeros_like(bf16[f"{lost}.up.weight"])},
             "bf16, half the components of block 15 lost": cut,
             "fp16 of pairs scaled apart by 2^20, unbalanced": {k: v.float() for k, v in cast_tensors(skew, torch.float16).items()},
             "bf16, correct (for reference)": bf16}
    rows = []
    for name, bad in wrong.items():
        copy = load(path).float().eval()
        copy.load_state_dict(bad, strict=False)
        row = {"copy": name}
        for inputs, x in (("random", x_random), ("text", x_text)):
            v = _check(family, copy, model, x)
            row[inputs] = {"relative_diff": v["relative_diff"], "top1": v["top1_agreement"], "passed": v["passed"]}
        rows.append(row)
        print(f"  {name:52s} random ids: {row['random']['relative_diff']:.4g} top-1 {100 * row['random']['top1']:.1f} % "
              f"{'pass' if row['random']['passed'] else 'FAIL'} | text: {row['text']['relative_diff']:.4g} top-1 "
              f"{100 * row['text']['top1']:.1f} % {'pass' if row['text']['passed'] else 'FAIL'}", flush=True)
    return rows


@torch.no_grad()
def perplexity(model, docs: list[list[int]], to_fp32: bool = True) -> float:
    """Token-weighted perplexity of `model` on `docs` (one document per forward), computed in fp32 (`to_fp32`) or as the
    model was loaded (a 16-bit copy: in its dtype, as it is served)."""
    model = (model.float() if to_fp32 else model).eval()
    nll, count = 0.0, 0
    for ids in docs:
        x = torch.tensor([ids])
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def _load_export(kind: str, out: Path, dtype: str):
    """The export as a user loads it, in its dtype: `lowrank_cli.load` (which builds in fp32) cast to it, or transformers'
    `from_pretrained(dtype="auto")` of the folder."""
    from transformers import AutoModelForCausalLM

    from lowrank_cli.models import load

    if kind == "safetensors":
        return load(out).to(getattr(torch, dtype))
    return AutoModelForCausalLM.from_pretrained(str(out), dtype="auto", trust_remote_code=kind == "hf")


def exports(paths: dict, docs: list[list[int]], work: Path, dtypes: list[str]) -> list[dict]:
    from lowrank_cli.errors import LowrankError
    from lowrank_cli.models import load
    from lowrank_cli.pipelines.export import export_checkpoint

    rows = []
    for kappa, path in paths.items():
        base = perplexity(load(path), docs)
        print(f"  κ = {kappa}: fp32 factorized perplexity {base:.3f}", flush=True)
        for dtype in dtypes:
            for kind in ("dense", "safetensors", "hf"):
                out = work / (f"{kappa}-{kind}-{dtype}" + (".safetensors" if kind == "safetensors" else ""))
                t = time.perf_counter()
                try:
                    v = export_checkpoint(path, kind, out, dtype=dtype).verification
                except LowrankError as e:
                    rows.append({"kappa": kappa, "kind": kind, "dtype": dtype, "refused": str(e)})
                    print(f"  κ = {kappa} {kind:11s} {dtype:8s} REFUSED: {e}", flush=True)
                    continue
                seconds = time.perf_counter() - t
                model = _load_export(kind, out, dtype)
                loaded = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
                ppl16 = perplexity(model, docs, to_fp32=False)  # first: as loaded, in its dtype
                ppl32 = perplexity(model, docs)
                row = {"kappa": kappa, "kind": kind, "dtype": dtype, "inputs": v["inputs"], "relative_diff": v["relative_diff"],
                       "top1": v["top1_agreement"], "passed": v["passed"], "loaded": loaded, "ppl_fp32": base,
                       "ppl_weights16_compute32": ppl32, "ppl_compute16": ppl16, "export_s": seconds}
                rows.append(row)
                print(f"  κ = {kappa} {kind:11s} {dtype:8s} check on {v['inputs']}: {v['relative_diff']:.4f} of scale, top-1 "
                      f"{100 * v['top1_agreement']:.2f} %; perplexity ratio (16-bit weights, fp32 compute) {ppl32 / base:.4f}, "
                      f"({dtype} compute) {ppl16 / base:.4f}; loaded as {'+'.join(loaded)}; export {seconds:.0f} s", flush=True)
                del model
                shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    return rows


def main() -> None:
    args = _args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-low-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_MODULES_CACHE", str(work / "hf-modules"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_cli.models import load

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    k2 = Path(args.k2)
    paths = {"1.25": Path(args.k125), "2": k2 / "model.safetensors" if k2.is_dir() else k2}
    docs = []
    for line in open(args.val, encoding="utf-8"):
        ids = tokenizer(json.loads(line)["text"])["input_ids"][: args.tokens]
        if len(ids) >= 16:
            docs.append(ids)
        if len(docs) == args.docs:
            break
    report = {"docs": len(docs), "tokens": sum(map(len, docs)), "torch": torch.__version__}
    if not args.skip_diagnosis:
        print(f"1. Diagnosis: weights rounded to bf16, outputs in fp32 (the export check), {args.seeds} draws of 2 × 128 tokens")
        models = {"dense SmolLM2-135M": AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32).eval(),
                  "κ = 1.25 (distilled)": load(paths["1.25"]).float().eval(), "κ = 2 (not distilled)": load(paths["2"]).float().eval()}
        report["diagnosis"] = diagnosis(models, tokenizer, args)
        del models
        print("2. Wrong copies of κ = 1.25: the check (3e-2 of scale, 99 % top-1) on random ids and on text")
        report["real_errors"] = real_errors(paths["1.25"], tokenizer)
    print(f"3. Exports, verified by the export; perplexity on {len(docs)} held-out documents ({report['tokens']} tokens)")
    kappas = args.kappas.split(",")
    report["exports"] = exports({k: v for k, v in paths.items() if k in kappas}, docs, work, args.dtypes.split(","))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    sys.exit(0 if all(r.get("passed") for r in report["exports"]) else 1)


if __name__ == "__main__":
    main()
