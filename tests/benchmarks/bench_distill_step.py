"""A PELA distillation step against a plain fine-tuning step of the original model.

Distillation step: teacher forward (no grad) + student forward + backward + AdamW step,
with L_fd over every block (the `deit` recipe: α = 1, β = 0). Fine-tuning step: the dense
model's forward + backward + AdamW step with cross-entropy. Same batch, same run,
interleaved; prints the median times and their ratio (PELA Table 8: 70 / 76 ms/img = 0.92).

    python tests/benchmarks/bench_distill_step.py [--model deit_small_patch16_224] [--batch 8] [--kappa 2] [--iters 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from lowrank_cli.device import resolve_device
from lowrank_cli.distill.objective import DistillationObjective
from lowrank_cli.distill.train import _autocast, create_optimizer
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import create_model, get_family
from lowrank_cli.recipe import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    recipe = load_recipe("deit").with_kappa(args.kappa)
    cfg = recipe.distill.model_copy(update={"amp": "bf16"})

    torch.manual_seed(0)
    dense = create_model(args.model).to(device).train()
    teacher = copy.deepcopy(dense).eval()
    student = copy.deepcopy(dense).cpu()
    factorize_model(student, recipe)
    student = student.to(device).train()
    objective = DistillationObjective(student, teacher, cfg, base="none", family=get_family("timm"))
    opt_dense, opt_student = create_optimizer(dense, cfg, 1e-5), create_optimizer(student, cfg, 1e-5)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def finetune_step():
        with _autocast(device, cfg.amp):
            loss = F.cross_entropy(dense(x).float(), y)
        loss.backward()
        opt_dense.step()
        opt_dense.zero_grad(set_to_none=True)

    def distill_step():
        with _autocast(device, cfg.amp):
            loss, _ = objective(student, x, None)
        loss.backward()
        opt_student.step()
        opt_student.zero_grad(set_to_none=True)

    times = {"finetune": [], "distill": []}
    for step in (finetune_step, distill_step):  # warm-up
        step()
    for _ in range(args.iters):
        for name, step in (("finetune", finetune_step), ("distill", distill_step)):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t)
    ft, ds = statistics.median(times["finetune"]), statistics.median(times["distill"])
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"{args.model} κ={args.kappa:g} batch {args.batch} on {device} ({torch.get_num_threads()} threads){peak}")
    print(f"  fine-tuning step (dense fwd+bwd+AdamW)         {ft * 1e3:8.1f} ms  ({ft / args.batch * 1e3:.1f} ms/img)")
    print(f"  distillation step (teacher fwd + student f+b)  {ds * 1e3:8.1f} ms  ({ds / args.batch * 1e3:.1f} ms/img)")
    print(f"  ratio distill / fine-tune: {ds / ft:.2f}  (PELA Table 8: 0.92; goal <= 1.0)")


if __name__ == "__main__":
    main()
