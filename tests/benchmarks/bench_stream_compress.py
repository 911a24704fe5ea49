"""Benchmark: `lowrank compress` one block at a time on a 1.2 B-parameter Llama-shaped Hub folder under `--max-memory`.

Builds (once, into `--path`) TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4 key/value heads, intermediate 5632)
with SmolLM2's vocabulary (49 152) and tokenizer (copied from `--tokenizer`, the SmolLM2 folder `prepare_causal_lm.py`
writes), untied LM head, random bf16 weights (N(0, 0.02²), norms at 1), written one tensor at a time: 2.4 GB. Then runs
`lowrank compress FOLDER --recipe causal-lm --kappa 2 --max-memory 1.5GB --budget B --data DIR` with a copy of the
recipe that calibrates on `--calib-samples` documents and runs the local stage on `--local-examples` (a 2-core CPU
takes minutes per block at the recipe's 128 and 512), and prints: the command's wall time and peak resident memory
(the child's ru_maxrss), the report's memory accounting (the limit, one block's need, the most activation bytes held in
memory and on disk), the held-out perplexities, and the output opened by `lowrank_cli.load` in a fresh process (its
parameters and that process's peak RSS).

Run: python tests/benchmarks/bench_stream_compress.py --path /work/assets/llama-1.2b --tokenizer /work/assets/smollm2-135m
         --data /work/assets/smollm2-text [--max-memory 1.5GB] [--budget 20m] [--layers 22] [--calib-samples 16]
         [--local-examples 64] [--val-docs 32] [--out runs/bench-stream-1.2b]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from lowrank_cli.io.safetensors import shard_writer
from lowrank_cli.models import get_family
from lowrank_cli.models.skeleton import build_skeleton, state_names
from lowrank_cli.recipe import load_recipe

SHAPE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 22,
         "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 49152,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def build_folder(folder: Path, tokenizer: Path, layers: int) -> int:
    """The Hub folder (see the module docstring); its weights' bytes."""
    config = {**SHAPE, "num_hidden_layers": layers}
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, folder / name)
    skeleton = build_skeleton(get_family("transformers"), "LlamaForCausalLM", config)
    state = skeleton.state_dict(keep_vars=True)
    gen = torch.Generator().manual_seed(0)
    total = 0
    with shard_writer(folder, 10**9) as writer:
        for names in state_names(skeleton):
            shape = tuple(state[names[0]].shape)
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            writer.add(names[0], t.to(torch.bfloat16))
            total += t.numel() * 2
        writer.finish({"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--max-memory", default="1.5GB")
    ap.add_argument("--budget", default="20m")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--local-examples", type=int, default=64)
    ap.add_argument("--val-docs", type=int, default=32, help="held-out documents (the first of --data's val part): three chains and "
                    "the head's vocabulary for each, a second a document on 2 cores at this size")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-stream-1.2b"))
    args = ap.parse_args()
    if not (args.path / "config.json").is_file():
        t0 = time.perf_counter()
        size = build_folder(args.path, args.tokenizer, args.layers)
        print(f"built {args.path}: {size / 1e9:.2f} GB of bf16 weights in {time.perf_counter() - t0:.0f} s", flush=True)
    recipe = load_recipe("causal-lm").to_dict()
    recipe["factorize"]["calib_samples"] = args.calib_samples
    recipe["distill"]["local"]["examples"] = args.local_examples
    recipe_file = args.out.parent / f"{args.out.name}.recipe.yaml"
    recipe_file.parent.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if args.out.exists():
        shutil.rmtree(args.out)
    data = args.out.parent / f"{args.out.name}.data"
    data.mkdir(exist_ok=True)
    shutil.copyfile(args.data / "train.jsonl", data / "train.jsonl")
    (data / "val.jsonl").write_text("".join((args.data / "val.jsonl").read_text().splitlines(keepends=True)[: args.val_docs]))
    cmd = ["lowrank", "compress", str(args.path), "--recipe", str(recipe_file), "--kappa", "2", "--max-memory", args.max_memory,
           "--budget", args.budget, "--data", str(data), "--out", str(args.out), "--device", "cpu", "--json"]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if done.returncode != 0:
        sys.exit(f"compress failed with exit status {done.returncode}")
    report = json.loads(done.stdout)
    st, acc = report["streamed"], report["accuracy"]
    print(f"\n{report['params_before'] / 1e9:.3f} B → {report['params_after'] / 1e9:.3f} B parameters in {wall / 60:.1f} min; "
          f"peak RSS {peak / 1e9:.2f} GB (max_memory {st['max_memory'] / 1e9:.2f} GB; one block's work {st['block_need'] / 1e9:.2f} GB; "
          f"in memory it would need {st['in_memory_need'] / 1e9:.2f} GB of weights and training state)")
    print(f"activations cached at most: {st['activations_peak_memory'] / 1e9:.2f} GB in memory, {st['activations_peak_disk'] / 1e9:.2f} GB on disk")
    print("held-out perplexity: " + ", ".join(f"{k} {v['perplexity']:.1f}" for k, v in acc.items()))
    steps = [b["steps"] for b in report["local"]["blocks"]]
    print(f"local stage: {min(steps)}–{max(steps)} steps a block; budget {report.get('budget', {}).get('seconds', 0) / 60:.0f} min, "
          f"command {report.get('budget', {}).get('command_seconds', 0) / 60:.1f} min")
    probe = ("import resource, lowrank_cli; m = lowrank_cli.load(%r); "
             "print(sum(p.numel() for p in m.parameters()), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)") % str(args.out)
    params, rss = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE, text=True, check=True).stdout.split()
    print(f"lowrank_cli.load({args.out}): {int(params) / 1e9:.3f} B parameters, peak RSS {int(rss) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
