"""Benchmark: a causal LM's ONNX export with its KV cache against the export without one, in onnxruntime on one thread.

Exports a factorized causal LM (a Hub folder: SmolLM2-135M factorized at κ = 2, say) twice with `lowrank export`'s
library call: with its KV cache (the default, the folder optimum's ORTModelForCausalLM loads; the export itself checks
32 greedy tokens against PyTorch's) and without (`kv_cache=False`, one .onnx file). Then generates `--new-tokens`
greedy tokens after a prompt of real text (`--prompt-tokens` tokens of the first long enough document of `--data`):

- with the cache (`OrtDecoder`): one prefill over the prompt, then one decode step per new token;
- without: every new token runs the graph over the prompt and all the tokens generated so far.

Both sequences must equal transformers' `generate(do_sample=False)` on the factorized model. The two loops run in
alternating rounds; it prints the median time per decoded token of each (after the first token: the cache's decode
step, the no-cache graph over the whole prefix) and their ratio, all measured in the same run, plus the prefill.

    python tests/benchmarks/bench_onnx_kv_cache.py /tmp/smol-k2 --data /work/assets/smollm2-text/val.jsonl --work /tmp/bench-kv
    python tests/benchmarks/bench_onnx_kv_cache.py /tmp/smol-k2 --work /tmp/bench-kv --reuse   # the timing again, no export

optimum's ORTModelForCausalLM on the exported folder, in an environment where optimum-onnx installs (it wants
transformers < 4.58; lowrank is not imported in this mode): it generates from the same prompt and compares with the
tokens the first run saved.

    python tests/benchmarks/bench_onnx_kv_cache.py --optimum /tmp/bench-kv/kv-onnx --expect /tmp/bench-kv/tokens.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _prompt(folder: Path, data: Path, tokens: int) -> np.ndarray:
    """The first `tokens` tokens of the first document of `data` (jsonl with a `text` field) that has as many."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    for line in data.read_text().splitlines():
        ids = tok(json.loads(line)["text"])["input_ids"]
        if len(ids) >= tokens:
            return np.array([ids[:tokens]], np.int64)
    raise SystemExit(f"no document of {data} has {tokens} tokens")


def with_cache(decoder, prompt: np.ndarray, n: int) -> tuple[list[int], float, list[float]]:
    """Greedy tokens, the prefill's seconds and each decode step's seconds."""
    t = time.perf_counter()
    logits, past = decoder.prefill(prompt)
    prefill = time.perf_counter() - t
    tokens, steps = [int(logits.argmax(-1))], []
    for _ in range(n - 1):
        t = time.perf_counter()
        logits, past = decoder.decode(np.array([[tokens[-1]]], np.int64), past)
        steps.append(time.perf_counter() - t)
        tokens.append(int(logits.argmax(-1)))
    return tokens, prefill, steps


def without_cache(session, prompt: np.ndarray, n: int) -> tuple[list[int], float, list[float]]:
    """Greedy tokens, the first token's seconds (the prompt alone) and each later token's (the whole prefix again)."""
    ids, tokens, times = prompt, [], []
    for _ in range(n):
        t = time.perf_counter()
        logits = session.run(["output"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        times.append(time.perf_counter() - t)
        tokens.append(int(logits[0, -1].argmax()))
        ids = np.concatenate([ids, [[tokens[-1]]]], axis=1)
    return tokens, times[0], times[1:]


def run_optimum(folder: Path, expect: Path, threads: int) -> None:
    """ORTModelForCausalLM.from_pretrained(folder) generates from the saved prompt; its tokens against the saved ones."""
    import onnxruntime as ort
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    saved = json.loads(expect.read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(str(folder), session_options=options)
    prompt = torch.tensor(saved["prompt"])
    t = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=len(saved["tokens"]),
                         eos_token_id=None, pad_token_id=0)
    seconds = time.perf_counter() - t
    got = out[0, prompt.shape[1]:].tolist()
    from importlib.metadata import version

    print(f"optimum-onnx {version('optimum-onnx')} (transformers {transformers.__version__}): ORTModelForCausalLM "
          f"can_use_cache={model.can_use_cache}, inputs {list(model.input_names)[:4]}...; {len(got)} greedy tokens in {seconds:.2f} s "
          f"({threads} thread); equal to PyTorch's: {got == saved['tokens']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path, nargs="?", help="a factorized causal LM (Hub folder)")
    ap.add_argument("--data", type=Path, default=Path("/work/assets/smollm2-text/val.jsonl"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-kv"), help="where the two exports and tokens.json go")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="time the two exports already in --work (no export)")
    ap.add_argument("--optimum", type=Path, help="only: load this exported folder with optimum's ORTModelForCausalLM")
    ap.add_argument("--expect", type=Path, help="with --optimum: the tokens.json a first run wrote")
    args = ap.parse_args()
    if args.optimum:
        return run_optimum(args.optimum, args.expect, args.threads)

    from lowrank_cli.export.onnx_cache import OrtDecoder
    from lowrank_cli.models import load
    from lowrank_cli.pipelines.export import export_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    exports = {}
    for name, kv, out in (("kv cache", True, args.work / "kv-onnx"), ("no cache", False, args.work / "nocache.onnx")):
        if args.reuse:
            continue
        t = time.perf_counter()
        exports[name] = export_checkpoint(args.checkpoint, "onnx", out, kv_cache=kv, force=True)
        v = exports[name].verification
        greedy = v.get("greedy")
        print(f"export {name}: {time.perf_counter() - t:.0f} s, logits max |Δ| {v['max_abs_diff']:.2e} = {v['relative_diff']:.1e} "
              "of max |y|" + (f"; greedy {greedy['new_tokens']} tokens equal to PyTorch's: {greedy['tokens_equal']}" if greedy else ""))
    prompt = _prompt(args.checkpoint, args.data, args.prompt_tokens)
    model = load(args.checkpoint)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long), do_sample=False,
                             max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    (args.work / "tokens.json").write_text(json.dumps({"prompt": prompt.tolist(), "tokens": ref}))
    torch.set_num_threads(args.threads)
    decoder = OrtDecoder(_session(args.work / "kv-onnx" / "model.onnx", args.threads))
    plain = _session(args.work / "nocache.onnx", args.threads)
    firsts: dict[str, list[float]] = {"kv cache": [], "no cache": []}
    steps: dict[str, list[float]] = {"kv cache": [], "no cache": []}
    for r in range(args.rounds):
        order = [("kv cache", lambda: with_cache(decoder, prompt, args.new_tokens)),
                 ("no cache", lambda: without_cache(plain, prompt, args.new_tokens))]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            tokens, first, times = fn()
            assert tokens == ref, f"{name}: onnxruntime's greedy tokens differ from PyTorch's: {tokens} vs {ref}"
            firsts[name].append(first)
            steps[name].extend(times)
    per = {k: statistics.median(v) for k, v in steps.items()}
    print(f"prompt of {prompt.shape[1]} tokens, {args.new_tokens} greedy tokens equal to transformers' generate in both; "
          f"onnxruntime, {args.threads} thread(s), {args.rounds} rounds interleaved")
    for name in ("kv cache", "no cache"):
        print(f"  {name:8s}: first token (prefill) {1e3 * statistics.median(firsts[name]):7.1f} ms, per decoded token median "
              f"{1e3 * per[name]:7.2f} ms (IQR {1e3 * np.subtract(*np.percentile(steps[name], [75, 25])):.2f} ms)")
    print(f"  per decoded token, no cache / kv cache: {per['no cache'] / per['kv cache']:.1f}×")


if __name__ == "__main__":
    main()
