"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for distillation on several processes: `distill.strategy: fsdp`.

The student is sharded per transformer block (its family's `blocks`), then as a whole (what no
block holds: embeddings, norms, the head); the frozen teacher alike, so that no process holds
either whole between forward passes. Every parameter is sharded, trainable or not; those that do
not train (the teacher's, PC-LoRA's fading dense weights) get no gradient and no optimizer state,
so they cost their shard and nothing more.

What a run writes does not depend on the strategy: a checkpoint gathers the student's full state
dict (the same safetensors that DDP or one process write) and the optimizer's full state, in the
optimizer's own index order, to rank 0. A resumed run loads that full state on every process,
which keeps its own shard: so it resumes on any number of processes. At the end, `Sharded.restore`
gives back a plain module of the original structure holding the gathered weights, which the run
evaluates, saves and exports as it does any student.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def mixed_precision(device: torch.device, amp: str) -> MixedPrecisionPolicy:
    """On CUDA with `distill.amp` bf16: weights all-gathered and used in bf16, gradients reduced in fp32; fp32 otherwise."""
    if device.type == "cuda" and amp == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


class Sharded:
    """`model` sharded in place over the default process group: each of `blocks`, then the rest.

    The module keeps its identity (hooks registered on it and on its blocks before, such as the
    objective's, keep working); `restore()` returns a plain copy with the full weights once
    training is over. `frozen` modules (a teacher) are sharded again after each forward pass,
    the root included: no backward pass will need their weights.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module], policy: MixedPrecisionPolicy, frozen: bool = False):
        self.model = model
        self._skeleton = _skeleton(model)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy, reshard_after_forward=True if frozen else None)

    def restore(self) -> nn.Module:
        """A plain module of the structure `model` had, holding its full weights (every process takes part, each gets them)."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        return _fill(self._skeleton, full)


def _skeleton(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory) and without forward hooks; buffers are copied."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for m in model.modules():
        for attr in _HOOKS:
            if hasattr(m, attr):
                memo[id(getattr(m, attr))] = OrderedDict()
    return copy.deepcopy(model, memo)


def _fill(skeleton: nn.Module, full: dict[str, torch.Tensor]) -> nn.Module:
    """Put `full`'s tensors into `skeleton`'s parameters (a parameter shared by two modules stays shared) and persistent buffers."""
    made: dict[int, nn.Parameter] = {}
    for prefix, module in skeleton.named_modules(remove_duplicate=False):
        for name, placeholder in list(module._parameters.items()):
            if placeholder is None:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if id(placeholder) not in made:
                if key not in full:
                    raise RuntimeError(f"the gathered state has no '{key}'")
                made[id(placeholder)] = nn.Parameter(full[key].detach().clone(), requires_grad=placeholder.requires_grad)
            module._parameters[name] = made[id(placeholder)]
        for name, buffer in list(module._buffers.items()):
            key = f"{prefix}.{name}" if prefix else name
            if buffer is not None and key in full:
                module._buffers[name] = full[key].detach().clone()
    return skeleton


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in its index order (the order of `optimizer.state_dict()`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict and the optimizer's, whole: under FSDP gathered to rank 0's CPU (every process takes
    part; the others get empty ones), with the optimizer's state by index, as `optimizer.state_dict()` gives it."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    gathered = get_optimizer_state_dict(model, optimizer, options=options)
    names = _optimizer_names(model, optimizer)
    state = {i: gathered["state"][n] for i, n in enumerate(names) if n in gathered.get("state", {})}
    return weights, {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole optimizer state (`full_state`'s, by index); under FSDP each process keeps its own shard of it."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    names = _optimizer_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
