"""Benchmark: streamed factorization of a 1.1 B-parameter Llama-style Hub folder (TinyLlama's shape, random bf16 weights).

Builds the folder (hidden 2048, 22 layers, 32 heads, 4 key/value heads, intermediate 5632, vocab
32 000, untied LM head, bf16, 1 GB shards: 2.2 GB on disk), one tensor at a time, into a temporary
folder (or `--path`, kept). Then, each in a child process of its own so that its peak resident
memory (VmHWM) is its own (the imports, transformers' included, and the solver's start-up are outside the timings):

- `factorize_checkpoint` with the causal-lm recipe at κ = 2 and uniform allocation (what streams), plain SVD, on the CPU, output shards of
  `--shard` (500MB): seconds and peak RSS, against the checkpoint's size on disk (goal ≤ 1.2×);
- the bare `torch.linalg.svd` (fp32, thin) of the same matrices, read from the same folder (the
  reads are not timed): seconds (goal: the factorization ≤ 1.1× these) and peak RSS;
- with `--in-memory`, the in-memory path on the same folder too (the model loaded whole): the figure before.

`--method whitened` factorizes with whitened SVD instead (the causal-lm recipe's own method), block by block on
`--calib-samples` (128) documents of Python's documentation tokenized by a BPE trained here: its goal is a peak
of at most 1.5× the checkpoint plus one block's Grams (the bare SVDs are then not its baseline).

The output is then checked: its shards and index, and `lowrank_cli.io.read_header` of it. `--layers N` builds
fewer layers (the same matrices per layer) for a shorter run; say so when reporting.

Run: python tests/benchmarks/bench_stream_factorize.py [--layers 22] [--shard 500MB] [--path DIR] [--in-memory]
     [--method svd|whitened] [--calib-samples 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from lowrank_cli.io.safetensors import read_header, shard_writer
from lowrank_cli.models import get_family
from lowrank_cli.models.skeleton import build_skeleton
from lowrank_cli.models.skeleton import state_names

TINYLLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 32000,
             "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}


def build_folder(folder: Path, layers: int) -> int:
    """The Hub folder with random weights (N(0, 0.02²), norms at 1), written one tensor at a time, and a byte-level BPE
    tokenizer trained here on Python's documentation (for whitened's calibration text); its weights' bytes on disk."""
    config = {**TINYLLAMA, "num_hidden_layers": layers}
    folder.mkdir(parents=True, exist_ok=True)
    _tokenizer().save_pretrained(str(folder))
    skeleton = build_skeleton(get_family("transformers"), "LlamaForCausalLM", config)
    shapes = {names[0]: tuple(t.shape) for names, t in zip(state_names(skeleton), _first(skeleton))}
    gen = torch.Generator().manual_seed(0)
    with shard_writer(folder, 10**9) as writer:
        for name, shape in shapes.items():
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * 0.02
            writer.add(name, t.to(torch.bfloat16))
        writer.finish({})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from lowrank_cli.data.text import pydoc_documents

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(pydoc_documents().texts[:400], vocab_size=2000, min_frequency=2, special_tokens=["<s>", "</s>", "<pad>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="</s>")


def _first(model):
    state = model.state_dict(keep_vars=True)
    return [state[names[0]] for names in state_names(model)]


# the child's own peak: VmHWM (ru_maxrss would keep the parent's peak across fork and exec)
PEAK = """
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""
FACTORIZE = PEAK + """
import sys, time, json, torch
from lowrank_cli.pipelines.factorize import factorize_checkpoint
import lowrank_cli.models.hf_family  # transformers' import (about 6 s here), a start-up cost outside the timing, as the solver's
torch.linalg.svd(torch.randn(64, 64), full_matrices=False)
{patch}
from lowrank_cli.recipe import load_recipe
recipe = load_recipe("causal-lm")
recipe = recipe.model_copy(update={{"factorize": recipe.factorize.model_copy(update={{"method": sys.argv[4], "calib_samples": int(sys.argv[5]), "allocation": "uniform"}})}})
start = time.perf_counter()
result = factorize_checkpoint(sys.argv[1], recipe, sys.argv[2], max_shard_size=sys.argv[3], device="cpu")
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "maxrss": peak(), "factorized": len(result.manifest.layers)}}))
"""
IN_MEMORY = "import lowrank_cli.pipelines.factorize as p; p.streamable = lambda *a: None"

BARE = PEAK + """
import sys, time, json, torch
from lowrank_cli.io.safetensors import read_tensors
names = json.loads(sys.argv[2])
torch.linalg.svd(torch.randn(64, 64), full_matrices=False)
seconds = 0.0
with read_tensors(sys.argv[1]) as f:
    for name in names:
        w = f.get_tensor(name)
        start = time.perf_counter()
        torch.linalg.svd(w.float(), full_matrices=False)
        seconds += time.perf_counter() - start
        del w
print(json.dumps({"seconds": seconds, "maxrss": peak()}))
"""


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shard", default="500MB")
    ap.add_argument("--path", type=Path, default=None)
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--method", choices=("svd", "whitened"), default="svd")
    ap.add_argument("--calib-samples", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.path.parent if args.path else None) as tmp:
        folder = args.path or Path(tmp) / "tinyllama"
        if (folder / "config.json").is_file():
            on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            args.layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
        else:
            start = time.perf_counter()
            on_disk = build_folder(folder, args.layers)
            print(f"built {folder} ({args.layers} layers): {on_disk / 1e9:.2f} GB on disk in {time.perf_counter() - start:.0f} s")
        names = [n for n, t in read_header(folder).tensors.items() if len(t.shape) == 2 and "layers." in n]
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads in each child (their default; set OMP_NUM_THREADS to change it)")
        bare = child(BARE, str(folder), json.dumps(names))
        ours = child(FACTORIZE.format(patch=""), str(folder), str(Path(tmp) / "out"), args.shard, args.method, str(args.calib_samples))
        out = Path(tmp) / "out"
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        written = sum((out / s).stat().st_size for s in shards)
        assert read_header(out).metadata.get("lowrank"), "no manifest in the index"
        print(f"checkpoint on disk: {on_disk / 1e9:.2f} GB; {len(names)} matrices, {ours['factorized']} factorized")
        print(f"bare torch.linalg.svd:    {bare['seconds']:7.1f} s   peak RSS {bare['maxrss'] / 1e9:.2f} GB ({bare['maxrss'] / on_disk:.2f}x the checkpoint)")
        print(f"streamed factorize:       {ours['seconds']:7.1f} s   peak RSS {ours['maxrss'] / 1e9:.2f} GB ({ours['maxrss'] / on_disk:.2f}x the checkpoint)"
              f"   time {ours['seconds'] / bare['seconds']:.2f}x the bare SVDs (goal <= 1.1x), memory goal <= 1.2x")
        print(f"output: {len(shards)} shards of at most {args.shard} + index, {written / 1e9:.2f} GB")
        if args.method == "whitened":  # fp64 Grams of one block's inputs: q, k, v, o, gate, up (2048²) and down (5632²)
            grams = (6 * 2048**2 + 5632**2) * 8
            print(f"one block's Grams: {grams / 1e9:.2f} GB; goal: peak <= 1.5x the checkpoint + these = "
                  f"{(1.5 * on_disk + grams) / 1e9:.2f} GB (measured {ours['maxrss'] / (1.5 * on_disk + grams):.2f} of it)")
        if args.in_memory:
            mem = child(FACTORIZE.format(patch=IN_MEMORY), str(folder), str(Path(tmp) / "out-memory"), args.shard, args.method,
                        str(args.calib_samples))
            print(f"in-memory factorize:      {mem['seconds']:7.1f} s   peak RSS {mem['maxrss'] / 1e9:.2f} GB ({mem['maxrss'] / on_disk:.2f}x the checkpoint)")


if __name__ == "__main__":
    main()
