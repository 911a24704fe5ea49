"""How much each selected layer's output error costs at the model's output (`factorize.allocation: sensitivity`).

For a loss L at the model's output whose gradient's second moment E[g gᵀ] is the Gauss–Newton
/ Fisher matrix of the output, a small change δy_l of layer l's output raises the expected loss
by about ½ δy_lᵀ E[g_l g_lᵀ] δy_l, with g_l = ∂L/∂y_l. `layer_sensitivity` measures, with one
forward and one backward pass per calibration batch,

    c_l = mean over (real) tokens of ‖∂L/∂y_l‖²

with L chosen by the model's task (docs/algorithms.md §8):

- classifiers (images, text): labels drawn from the model's own softmax, cross-entropy summed
  over examples (the true Fisher);
- causal and masked LMs: the same per token, over the real tokens;
- models of features (text encoders' last hidden states): L = Σ z ⊙ out over the real tokens,
  z ~ N(0, 1) drawn afresh per batch from a fixed seed, so that E‖g_l‖² = ‖J_l‖²_F, the squared
  Frobenius norm of the Jacobian of the output with respect to y_l.

In the same pass it takes each layer's mean input power per feature, mean ‖x‖² / d_in, and,
given a layer's right singular vectors v_i (`directions`), the mean power of its inputs along
each, mean (v_iᵀx)²: plain SVD's truncation error at rank r on the calibration inputs is then
exactly Σ_{i>r} σ_i² · mean (v_iᵀx)² per row (the u_i are orthonormal), without a Gram.

The model's weights are not changed and get no gradients: they are frozen during the pass (and
restored after), and the graph starts at the first selected layer's output. Gradients are read
by an identity autograd function on each layer's output, so that an in-place operation after the
layer does not change what is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.calibrate import _batches_of
from lowrank_cli.models.family import Inputs, batch_size, call_model, inputs_to
from lowrank_cli.models.tasks import Task, get_task
from lowrank_cli.nn.lowrank import linear_dims

@dataclass
class LayerSensitivity:
    """One layer's measurements over the calibration set (rows: real tokens × examples)."""

    grad_sq: float = 0.0  # Σ over rows of ‖∂L/∂y‖²
    input_sq: float = 0.0  # Σ over rows of ‖x‖²
    rows: int = 0  # rows seen by the backward pass
    input_rows: int = 0
    d_in: int = 0
    d_out: int = 0
    direction_sq: torch.Tensor | None = None  # Σ over rows of (v_iᵀx)², for the layer's right singular vectors v_i

    @property
    def direction_power(self) -> torch.Tensor | None:
        """mean (v_iᵀx)² for each given direction v_i (None when no directions were given)."""
        return None if self.direction_sq is None else self.direction_sq / max(self.input_rows, 1)

    @property
    def c(self) -> float:
        """c_l: the mean over rows of ‖∂L/∂y_l‖²."""
        return self.grad_sq / max(self.rows, 1)

    @property
    def input_power(self) -> float:
        """mean ‖x‖² / d_in: the mean input power per feature."""
        return self.input_sq / max(self.input_rows, 1) / max(self.d_in, 1)

    @property
    def weight(self) -> float:
        """c_l / d_out: the expected loss increase per unit of squared output error, per row (output errors taken as
        uncorrelated with the gradient's direction: E[(δyᵀg)²] = ‖δy‖² · ‖g‖² / d_out)."""
        return self.c / max(self.d_out, 1)


class _Tap(torch.autograd.Function):
    """The identity (a copy: a view could not be modified in place downstream), whose backward hands the gradient of
    its output to `record`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, record: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.record = record
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.record(grad)
        return grad, None


def _real(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a layer's input or output (…, d), restricted to the real tokens when the batch has a mask that fits."""
    if mask is not None and t.dim() == 3 and tuple(t.shape[:2]) == tuple(mask.shape):
        t = t[mask.bool()]
    return t.reshape(-1, t.shape[-1])


# Tokens per backward pass: a text batch is cut into micro-batches of at most this many tokens, so that the memory of one
# backward (the logits over a vocabulary, the activations of every block) stays bounded: a 135 M Llama's calibration
# batch of 32 × 256 tokens took 24 GB in one piece. The sums the statistics keep are the same over the pieces.
BACKWARD_TOKENS = 1024


def micro_batches(inputs: Inputs) -> list[Inputs]:
    """`inputs` cut along the batch into pieces of at most `BACKWARD_TOKENS` tokens (text); images and short text whole."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if ids is None or ids.dim() != 2:
        return [inputs]
    rows = max(1, BACKWARD_TOKENS // max(1, ids.shape[1]))
    return [{k: v[i:i + rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == ids.shape[0] else v for k, v in inputs.items()}
            for i in range(0, ids.shape[0], rows)]


class SensitivityTaps:
    """The hooks that measure `LayerSensitivity` on the layers of `module` (`names`: the stats' key -> the layer's name in
    `module`): input power (and power along `directions[key]`) before each layer, and the gradient of its output (the graph
    starts at a layer whose output needs none). `current["mask"]`: the batch's attention mask, set by the caller."""

    def __init__(self, module: nn.Module, names: dict[str, str], directions: dict[str, torch.Tensor] | None = None):
        self.stats: dict[str, LayerSensitivity] = {}
        self.current: dict[str, torch.Tensor | None] = {}
        self.hooks = []
        for key, name in names.items():
            layer = module.get_submodule(name)
            d_in, d_out = linear_dims(layer)
            self.stats[key] = LayerSensitivity(d_in=d_in, d_out=d_out)
            V = None if directions is None else directions.get(key)
            self.hooks += [layer.register_forward_pre_hook(self._pre(self.stats[key], V)), layer.register_forward_hook(self._post(self.stats[key]))]

    def _pre(self, st: LayerSensitivity, V: torch.Tensor | None):
        def pre(_mod, args):
            x = _real(args[0].detach(), self.current.get("mask"))
            if V is not None:
                p = (x.float() @ V.to(x.device, torch.float32)).pow(2).sum(0).double()
                st.direction_sq = p if st.direction_sq is None else st.direction_sq + p
            x = x.double()
            st.input_sq += float(x.pow(2).sum())
            st.input_rows += x.shape[0]
        return pre

    def _post(self, st: LayerSensitivity):
        def record(grad: torch.Tensor) -> None:
            g = _real(grad.detach(), self.current.get("mask")).double()
            st.grad_sq += float(g.pow(2).sum())
            st.rows += g.shape[0]

        def post(_mod, _args, out):
            if not out.requires_grad:  # the first selected layer: the graph starts here
                out = out.detach().requires_grad_(True)
            return _Tap.apply(out, record)
        return post

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def output_loss(out: torch.Tensor, task: Task | str | None, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """The loss whose gradient's second moment is the Fisher / Gauss–Newton matrix of `out` (see the module docstring):
    cross-entropy for a task whose output is a distribution over classes (`Task.distribution`)."""
    return target_loss(out, task, mask, draw_targets(out, task, mask, generator))


def is_distribution(out: torch.Tensor, task: Task | str | None) -> bool:
    return get_task(task).distribution if task is not None else out.dim() == 2


def draw_targets(out: torch.Tensor, task: Task | str | None, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """What `output_loss` draws: a label per (real) row from the output's own softmax, or z ~ N(0, 1) of its shape (zero on
    padding) for a model of features."""
    if is_distribution(out, task):
        logits = out.detach().float()
        if logits.dim() == 3:  # per token: the real ones only
            logits = _real(logits, mask)
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    z = torch.randn(out.shape, generator=generator, device=out.device, dtype=torch.float32)
    if mask is not None and out.dim() == 3 and tuple(out.shape[:2]) == tuple(mask.shape):
        z = z * mask.to(z.dtype)[..., None]  # padding carries no loss
    return z


def target_loss(out: torch.Tensor, task: Task | str | None, mask: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """The loss of `out` against the `targets` `draw_targets` drew (summed: over rows, pieces of a batch add up)."""
    if is_distribution(out, task):
        logits = out.float()
        if logits.dim() == 3:
            logits = _real(logits, mask)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum")
    return (targets * out.float()).sum()


def layer_sensitivity(model: nn.Module, names: list[str], calibration: Iterable, *, task: Task | str | None = None,
                      call: Callable[[nn.Module, Inputs], Any] = call_model, seed: int = 0,
                      directions: dict[str, torch.Tensor] | None = None) -> dict[str, LayerSensitivity]:
    """c_l and the mean input power of each layer in `names`, over `calibration` (input batches, or (inputs, labels)
    pairs), with one forward and one backward pass per batch. `task` is the model's (`ModelFamily.task`, or its name); None: a
    classifier when the output is (batch, classes), else a model of features. The model runs in eval mode; its
    weights are not changed. `directions` (d_in × k per layer, e.g. its right singular vectors) adds the mean input
    power along each."""
    param = next(model.parameters())
    taps = SensitivityTaps(model, {name: name for name in names}, directions)
    stats, current = taps.stats, taps.current
    frozen = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        for p in frozen:
            p.requires_grad_(False)
        seen = 0
        for i, inputs in enumerate(_batches_of(calibration)):
            inputs = inputs_to(inputs, param.device, param.dtype)
            generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + i)
            for piece in micro_batches(inputs):
                mask = piece.get("attention_mask") if isinstance(piece, dict) else None
                current["mask"] = mask
                with torch.enable_grad():
                    out = call(model, piece)
                    if not out.requires_grad:
                        raise LowrankError("no selected layer reaches the model's output: there is no sensitivity to measure "
                                           "(factorize.allocation 'sensitivity'; check select.include / select.exclude)", param="allocation")
                    output_loss(out, task, mask, generator).backward()
            seen += batch_size(inputs)
        if seen == 0:
            raise LowrankError("calibration data is empty: give at least one example (factorize.calib_samples)", param="calib_samples")
    finally:
        taps.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    check_felt(stats)
    return stats


def check_felt(stats: dict[str, LayerSensitivity]) -> None:
    """A LowrankError when no layer's output reached the loss: nothing to weight the ranks by."""
    if not any(st.grad_sq > 0 for st in stats.values()):
        raise LowrankError("no selected layer's output changes the model's output on the calibration data (factorize.allocation "
                           "'sensitivity' has nothing to weight by); check select.include / select.exclude", param="allocation")
