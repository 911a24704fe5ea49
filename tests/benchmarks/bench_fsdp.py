"""FSDP2 (`distill.strategy: fsdp`) on 2 gloo processes against 1, on a SmolLM2-135M-shaped Llama (issue 18, item 1).

The student: a Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 key/value heads,
intermediate 1536, vocabulary 49152, tied embeddings), random weights built here in a Hub folder
with a byte-level BPE tokenizer trained on Python's own documentation, every projection factorized
by plain SVD at κ = 1.25 (the tied table and LM head stay dense), distilled against its dense self
(`lowrank compress`'s pipeline: `compress_checkpoint`) on the CPU in fp32, batch 8 × 128 tokens.
The same global batch on both sides: 1 process × 8 against 2 processes × 4.

Printed: each run's per-process bytes of parameters, gradients and AdamW state after the first
step (`report.json`'s `train.state_bytes`; under FSDP the process's shards), the ratio of the
2-process FSDP run to the 1-process run (goal ≤ 0.6), and the largest relative difference of the
logged losses over the steps (goal ≤ 1e-4). With `--ddp`, a 2-process DDP run too (ratio ~1).

`--sweep`: for ddp and fsdp, 2 processes, a run killed (SIGKILL of rank 0; torchrun then stops the
other) right after each step k = 1 … steps−1, resumed, against the uninterrupted run: the same
losses and the same final student, bit for bit. Then one killed run resumed on 1 process, which
either goes on or stops with one line saying why.

Measured on a shared 2-core CPU (torch 2.14.1, gloo), the full setting: 113.2 M student parameters, 1811.5 MB per
process alone against 906.7 MB under FSDP (ratio 0.501), the losses within 9.2e-7 relative over 20 steps;
`--sweep` (2 layers, hidden 64, vocabulary 512, 4 steps, a checkpoint every 2): exact after every kill, ddp and fsdp.

    python tests/benchmarks/bench_fsdp.py                         # the full setting: 30 layers, 20 steps (15 min on 2 cores)
    python tests/benchmarks/bench_fsdp.py --layers 4 --steps 5    # a reduced one
    python tests/benchmarks/bench_fsdp.py --layers 2 --steps 4 --hidden 64 --vocab 512 --sweep
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TESTS = Path(__file__).resolve().parents[1]


def build(root: Path, args) -> tuple[Path, Path]:
    """The teacher's Hub folder and a text file of `steps` × 8 training lines (and 16 held-out)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(TESTS))
    from hf_models import _byte_bpe

    from lowrank_cli.data.text import pydoc_documents

    folder = root / "smollm2-135m-shaped"
    folder.mkdir(parents=True)
    tokenizer = _byte_bpe(folder)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 3), intermediate_size=args.hidden * 8 // 3, vocab_size=args.vocab,
                         tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if args.hidden == 576:
        config.intermediate_size = 1536
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    words = " ".join(pydoc_documents().texts).split()
    count = args.steps * 8 * 5 // 4 + 8  # 80 % of them train: at least `steps` batches of 8
    words = words * (1 + count * 200 // len(words))  # the documentation again if it is too short
    lines = [" ".join(words[i * 200:(i + 1) * 200]) for i in range(count)]  # 200 words > 128 tokens each
    data = root / "text.txt"
    data.write_text("\n".join(lines) + "\n")
    return folder, data


def recipe(root: Path, name: str, args, strategy: str, batch: int, checkpoint_every: int = 0) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "select": {"exclude": ["lm_head"], "min_out_features": 10},
        "factorize": {"rank_rule": "kappa", "kappa": 1.25, "method": "svd"},
        "data": {"source": None, "max_length": 128, "num_workers": 0},
        "distill": {"strategy": strategy, "batch_size": batch, "epochs": 1, "max_steps": args.steps, "lr": 1e-4, "warmup_epochs": 0,
                    "amp": "none", "dropout": False, "log_every": 1, "checkpoint_every": checkpoint_every or args.steps,
                    "keep_checkpoints": 100, "seed": 0},
    }))
    return path


def run(nproc: int, teacher: Path, recipe_path: Path, data: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """This script's `--worker` under torchrun (or alone for one process)."""
    worker = [str(Path(__file__).resolve()), "--worker", str(teacher / "model.safetensors"), str(recipe_path), str(data), str(out), *extra]
    cmd = [sys.executable, *worker] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker]
    threads = str(max(1, (os.cpu_count() or 2) // nproc))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)})
    if check and proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def worker(argv: list[str]) -> int:
    """One process: `compress_checkpoint`; `--kill K`: rank 0 kills itself (SIGKILL) right after step K; `--resume`."""
    from lowrank_cli.errors import LowrankError
    from lowrank_cli.pipelines.compress import compress_checkpoint, with_run_options
    from lowrank_cli.recipe import load_recipe

    ckpt, recipe_path, data, out, *rest = argv
    kill = int(rest[rest.index("--kill") + 1]) if "--kill" in rest else 0

    def hook(pos):
        if pos.step == kill and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        compress_checkpoint(ckpt, with_run_options(load_recipe(recipe_path), data), out=out, device="cpu", resume="--resume" in rest,
                            step_hook=hook if kill else None)
    except LowrankError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def state_bytes(out: Path) -> dict[str, int]:
    return json.loads((out / "report.json").read_text())["train"]["state_bytes"]


def weights(out: Path) -> dict:
    from lowrank_cli import load

    return load(out / "student.safetensors").state_dict()


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def compare(root: Path, teacher: Path, data: Path, args) -> None:
    runs = [("1 process", 1, "ddp", 8), ("2 processes, fsdp", 2, "fsdp", 4)] + ([("2 processes, ddp", 2, "ddp", 4)] if args.ddp else [])
    results = {}
    for label, nproc, strategy, batch in runs:
        t0 = time.perf_counter()
        out = root / f"run-{nproc}-{strategy}"
        run(nproc, teacher, recipe(root, f"{strategy}{nproc}", args, strategy, batch), data, out)
        results[label] = (state_bytes(out), losses(out), time.perf_counter() - t0)
    base_bytes, base_losses, _ = results["1 process"]
    total = lambda b: b["params"] + b["grads"] + b["optimizer"]  # noqa: E731
    print(f"{'run':<20} {'params MB':>10} {'grads MB':>9} {'AdamW MB':>9} {'total MB':>9} {'ratio':>6} {'max rel Δloss':>14} {'wall s':>7}")
    for label, (b, ls, seconds) in results.items():
        rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(ls, base_losses)) if len(ls) == len(base_losses) else float("nan")
        print(f"{label:<20} {b['params'] / 1e6:>10.1f} {b['grads'] / 1e6:>9.1f} {b['optimizer'] / 1e6:>9.1f} {total(b) / 1e6:>9.1f} "
              f"{total(b) / total(base_bytes):>6.3f} {rel:>14.2e} {seconds:>7.0f}")
    print(f"steps {len(base_losses)}, losses (1 process): {', '.join(f'{x:.5f}' for x in base_losses)}")


def sweep(root: Path, teacher: Path, data: Path, args) -> None:
    for strategy in ("ddp", "fsdp"):
        r = recipe(root, f"sweep-{strategy}", args, strategy, 4, checkpoint_every=2)
        full = root / f"sweep-{strategy}-full"
        run(2, teacher, r, data, full)
        exact = []
        for k in range(1, args.steps):
            cut = root / f"sweep-{strategy}-{k}"
            killed = run(2, teacher, r, data, cut, "--kill", str(k), check=False)
            assert killed.returncode != 0, f"{strategy}: the run killed at step {k} finished"
            if not any(cut.glob("checkpoint-*.state.safetensors")):  # killed before its first checkpoint: nothing to resume
                exact.append(f"{k}:fresh")
                continue
            run(2, teacher, r, data, cut, "--resume")
            ok = losses(cut) == losses(full) and same_weights(cut, full)
            exact.append(f"{k}:{'exact' if ok else 'DIFFERS'}")
        print(f"{strategy}: killed after step k and resumed on 2 processes: {' '.join(exact)}")
        other = root / f"sweep-{strategy}-other"
        run(2, teacher, r, data, other, "--kill", str(args.steps - 1), check=False)
        proc = run(1, teacher, r, data, other, "--resume", check=False)
        said = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        went_on = f"went on to step {len(losses(other))} (the global batch and data order follow 1 process from the checkpoint on)"
        print(f"{strategy}: killed after step {args.steps - 1}, resumed on 1 process: " + (said[-1] if said else went_on))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(worker(sys.argv[2:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ddp", action="store_true", help="also a 2-process DDP run")
    parser.add_argument("--sweep", action="store_true", help="the kill-at-any-step sweep, ddp and fsdp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, data = build(root, args)
        print(f"student: Llama, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}, κ = 1.25; batch 8 × 128, fp32, CPU (gloo)")
        if args.sweep:
            sweep(root, teacher, data, args)
        else:
            compare(root, teacher, data, args)


if __name__ == "__main__":
    main()
