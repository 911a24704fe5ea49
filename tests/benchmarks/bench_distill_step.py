"""A PELA distillation step against a plain fine-tuning step of the dense model: time, images/s, peak memory, TFLOP/s, MFU.

Distillation step (what `distill.train` does per optimizer step): the frozen teacher's forward,
the student's forward and backward with L_fd over every block (and L_rwp with the swin recipe,
β = 1), gradient clipping (the recipe's `clip_grad`) and AdamW. Fine-tuning step: the dense
model's forward and backward with cross-entropy, the same clipping and AdamW. Synthetic
224×224 images, random labels, random weights (time does not depend on values).

Each step kind is measured on its own, with only its models on the device, the peak memory
reset after warm-up (it counts weights, gradients, optimizer state and activations); the ratios
are PELA / fine-tuning of the same variant, in the same run. Variants:

- `library`: the step as `distill.train` takes it: `create_optimizer` (AdamW, foreach) and
  `DistillationObjective` (the fp32 teacher under `torch.no_grad`, inside autocast).
- `fast`: the teacher cast to the autocast dtype and run under `torch.inference_mode`, fused
  AdamW for both steps, and with `--channels-last` / `--compile` those for both steps too.

FLOPs from `measure.count_macs` (one MAC = 2 FLOPs): a training step is 3 × the forward
(forward + backward), the teacher 1 ×. MFU = achieved FLOP/s over the GPU's dense bf16/fp16
peak (table below, or `--peak-tflops`); "student MFU" counts the student's forward and backward
only (PELA Table 8: the PELA step takes 0.92× the time and 0.89× the memory of fine-tuning).

    python tests/benchmarks/bench_distill_step.py --device cuda     # deit_base (κ = 2) and swin_base (swin recipe), bf16, batch 64 and 128
    python tests/benchmarks/bench_distill_step.py --model deit_tiny_patch16_224 --batch 2 --iters 2 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.device import resolve_device
from lowrank_cli.distill.losses import base_loss, feature_distill_loss
from lowrank_cli.distill.objective import DistillationObjective
from lowrank_cli.distill.train import _autocast, create_optimizer
from lowrank_cli.factorize import factorize_model
from lowrank_cli.measure import count_macs
from lowrank_cli.models import create_model, get_family
from lowrank_cli.nn import LowRankLinear
from lowrank_cli.recipe import DistillConfig, Recipe, load_recipe

# dense bf16/fp16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name() (first match)
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0)]
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
Step = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Options:
    fused: bool = False
    fast_teacher: bool = False
    channels_last: bool = False
    compile: bool = False


@dataclass
class Setup:
    """One model's dense weights, its factorized student (both on the CPU) and their MACs per image."""

    name: str
    recipe: Recipe
    dense: nn.Module
    student: nn.Module
    macs_dense: int
    macs_student: int


@dataclass
class Measured:
    ms: float
    images_per_s: float
    peak_bytes: int | None


def recipe_for(model: str, recipe: str, kappa: float | None) -> Recipe:
    name = ("swin" if "swin" in model else "deit") if recipe == "auto" else recipe
    return load_recipe(name).with_kappa(kappa)


def build_setup(model: str, recipe: Recipe) -> Setup:
    family = get_family("timm")
    torch.manual_seed(0)
    dense = create_model(model).train()
    student = copy.deepcopy(dense)
    factorize_model(student, recipe, family=family)
    one = family.example_inputs(dense)
    return Setup(model, recipe, dense, student, count_macs(dense, one).macs, count_macs(student, one).macs)


def rwp_macs(setup: Setup) -> int:
    """MACs of L_rwp's forward, per step whatever the batch: `up · down` of every factorized layer (0 when β = 0)."""
    if setup.recipe.distill.beta == 0:
        return 0
    return sum(m.out_features * m.rank * m.in_features for m in setup.student.modules() if isinstance(m, LowRankLinear))


def make_optimizer(model: nn.Module, cfg: DistillConfig, fused: bool) -> torch.optim.Optimizer:
    """The library's AdamW (`create_optimizer`), or the same parameter groups with `fused=True`."""
    opt = create_optimizer(model, cfg, 1e-5)
    if not fused:
        return opt
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    return torch.optim.AdamW(groups, lr=1e-5, fused=True)


def optimizer_step(loss: torch.Tensor, params: list[torch.Tensor], opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   clip: float | None) -> None:
    """Backward, clipping and the optimizer step, as `distill.train` takes them."""
    scaler.scale(loss).backward()
    if clip is not None:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


class FastObjective(DistillationObjective):
    """The library's objective with the teacher under `torch.inference_mode` (its features cloned
    into ordinary tensors, which autograd may save); images only (no attention mask)."""

    def base_and_feature_terms(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            teacher_logits = self.forward(self.teacher, inputs)
            teacher_feats = self.teacher_blocks.take()
        teacher_logits, teacher_feats = teacher_logits.clone(), [t.clone() for t in teacher_feats]
        logits = self.forward(model, inputs)
        student_feats = self.student_blocks.take()
        base = base_loss(self.base, logits, labels, teacher_logits) * (self.logit_weight if self.base in ("logits", "kl") else 1.0)
        return base, feature_distill_loss(student_feats, teacher_feats)


def _prepare(model: nn.Module, device: torch.device, opts: Options) -> nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if opts.channels_last else model


def _scaler(device: torch.device, cfg: DistillConfig) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")


def finetune_step(setup: Setup, cfg: DistillConfig, device: torch.device, opts: Options) -> Step:
    model = _prepare(copy.deepcopy(setup.dense), device, opts).train()
    opt, scaler = make_optimizer(model, cfg, opts.fused), _scaler(device, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = torch.compile(model) if opts.compile else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with _autocast(device, cfg.amp):
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer_step(loss, params, opt, scaler, cfg.clip_grad)
    return step


def pela_step(setup: Setup, cfg: DistillConfig, device: torch.device, opts: Options) -> Step:
    teacher = _prepare(copy.deepcopy(setup.dense), device, opts)
    student = _prepare(copy.deepcopy(setup.student), device, opts).train()
    kind = FastObjective if opts.fast_teacher else DistillationObjective
    objective = kind(student, teacher, cfg, base="none", family=get_family("timm"))
    if opts.fast_teacher and device.type == "cuda" and cfg.amp in AMP_DTYPES:
        objective.pairs = [(layer, w.detach().clone()) for layer, w in objective.pairs]  # L_rwp keeps the fp32 dense weights
        teacher.to(AMP_DTYPES[cfg.amp])  # in place: the objective's hooks stay on its blocks
    if opts.compile:
        objective.teacher = torch.compile(teacher)
    opt, scaler = make_optimizer(student, cfg, opts.fused), _scaler(device, cfg)
    params = [p for p in student.parameters() if p.requires_grad]
    forward = torch.compile(student) if opts.compile else student

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with _autocast(device, cfg.amp):
            loss, _ = objective(forward, x, None)
        optimizer_step(loss, params, opt, scaler, cfg.clip_grad)
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(make: Callable[[], Step], x: torch.Tensor, y: torch.Tensor, device: torch.device, warmup: int, iters: int) -> Measured:
    """Median time of `iters` steps after `warmup` (optimizer state and compilation happen there), and the peak memory."""
    step = make()
    for _ in range(warmup):
        step(x, y)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        step(x, y)
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    s = statistics.median(times)
    return Measured(s * 1e3, len(x) / s, peak)


def peak_tflops(device: torch.device, amp: str, given: float | None) -> float | None:
    """The dense tensor-core peak of this GPU in the autocast dtype (None: unknown, or no autocast)."""
    if given is not None:
        return given
    if device.type != "cuda" or amp == "none":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def rows_for(setup: Setup, batch: int, variants: dict[str, Options], cfg: DistillConfig, device: torch.device, peak: float | None,
             warmup: int, iters: int) -> list[str]:
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = cfg.amp if device.type == "cuda" else "fp32 (CPU)"
    rows = []
    for variant, opts in variants.items():
        xv = x.contiguous(memory_format=torch.channels_last) if opts.channels_last else x
        ft = measure(lambda: finetune_step(setup, cfg, device, opts), xv, y, device, warmup, iters)
        pela = measure(lambda: pela_step(setup, cfg, device, opts), xv, y, device, warmup, iters)
        for kind, m in (("fine-tune", ft), ("PELA", pela)):
            flops = 6 * setup.macs_dense if kind == "fine-tune" else 2 * setup.macs_dense + 6 * setup.macs_student
            tflops = flops * m.images_per_s / 1e12
            student_mfu = 6 * setup.macs_student * m.images_per_s / 1e12 / peak if peak and kind == "PELA" else None
            time_ratio, mem_ratio = m.ms / ft.ms, (m.peak_bytes / ft.peak_bytes if m.peak_bytes and ft.peak_bytes else None)
            rows.append(
                f"| {setup.name} | {setup.recipe.name} κ={setup.recipe.factorize.kappa:g} | {batch} | {amp} | {variant} | {kind} | "
                f"{m.ms:.1f} | {m.images_per_s:.1f} | {_fmt(m.peak_bytes and m.peak_bytes / 2**30, '.2f')} | {time_ratio:.3f} | "
                f"{_fmt(mem_ratio, '.3f')} | {tflops:.2f} | {_fmt(peak and tflops / peak, '.1%')} | {_fmt(student_mfu, '.1%')} |"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["deit_base_patch16_224", "swin_base_patch4_window7_224"])
    ap.add_argument("--recipe", default="auto", choices=["auto", "deit", "swin"], help="auto: swin for swin_* models, else deit")
    ap.add_argument("--kappa", type=float, default=None, help="default: the recipe's (deit 2, swin 1.5)")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"], help="autocast dtype on CUDA (the CPU runs fp32)")
    ap.add_argument("--variants", nargs="+", default=["library", "fast"], choices=["library", "fast"])
    ap.add_argument("--channels-last", action="store_true", help="fast variant: models and images in channels_last")
    ap.add_argument("--compile", action="store_true", help="fast variant: torch.compile the models")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for MFU (default: from the GPU's name)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    fast = Options(fused=True, fast_teacher=True, channels_last=args.channels_last, compile=args.compile)
    variants = {v: Options() if v == "library" else fast for v in args.variants}
    peak = peak_tflops(device, args.amp, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({where}); peak {_fmt(peak, 'g')} TFLOP/s; median of {args.iters} steps after {args.warmup}")

    rows = []
    for model in args.model:
        recipe = recipe_for(model, args.recipe, args.kappa)
        cfg = recipe.distill.model_copy(update={"amp": args.amp})
        setup = build_setup(model, recipe)
        print(f"{model}: {setup.macs_dense / 1e9:.2f} → {setup.macs_student / 1e9:.2f} GMACs/image (recipe {recipe.name}, "
              f"α={cfg.alpha:g} β={cfg.beta:g}, clip_grad {cfg.clip_grad}); L_rwp {rwp_macs(setup) / 1e9:.2f} GMACs per step "
              "in fp32 whatever the batch (not counted below)", flush=True)
        for batch in args.batch:
            rows += rows_for(setup, batch, variants, cfg, device, peak, args.warmup, args.iters)
    print()
    print("| model | recipe | batch | amp | variant | step | ms/step | images/s | peak GiB | time × FT | memory × FT | TFLOP/s | MFU | student MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    print("\ngoal: PELA ≤ 0.92× the time and ≤ 0.90× the memory of fine-tuning (PELA Table 8: 0.92 / 0.89); student MFU ≥ 40 %")


if __name__ == "__main__":
    main()
