"""Calling one transformer block of a model alone, on cached inputs: what local (block-wise)
distillation and block-by-block calibration need, for every family.

A model's blocks (`ModelFamily.blocks`) are called one after the other by the model's own
forward, each with the previous one's output as its hidden states and the same other
arguments (a text model's attention mask, its rotary position embeddings; nothing for a ViT).
`BlockRunner` captures those arguments once per batch, at the first block's input (the rest
of the forward is cut short), and then calls any block on any hidden states with them. Between
two blocks a family may place a module of its own (`ModelFamily.block_links`: Swin's patch
merging before each stage's first block). `BlockRunner.check` verifies on a real batch that
chaining the blocks this way reproduces the model's own forward, so that a family whose
blocks are called otherwise is refused rather than distilled wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.models.family import Inputs, ModelFamily


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once the first block's input is known."""


@dataclass
class BlockCall:
    """What a block is called with besides its hidden states: the other positional arguments and the keywords."""

    args: tuple
    kwargs: dict[str, Any]
    tuple_out: bool = False  # the block returned a tuple (hidden states first) when last called

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = block(hidden, *self.args, **self.kwargs)
        self.tuple_out = isinstance(out, tuple)
        return out[0] if self.tuple_out else out


def _split_call(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockCall]:
    """(hidden states, the rest) of a block's call, whether the hidden states came by position or by name."""
    kwargs = {k: v for k, v in kwargs.items() if not _is_cache(v)}  # a KV cache would grow with every replay
    if args:
        return args[0], BlockCall(tuple(args[1:]), kwargs)
    if "hidden_states" in kwargs:
        hidden = kwargs.pop("hidden_states")
        return hidden, BlockCall((), kwargs)
    raise LowrankError("a transformer block was called without hidden states as its first argument; local distillation "
                       "cannot replay it (recipe key distill.local)", param="distill.local")


def _is_cache(value: Any) -> bool:
    return type(value).__name__.endswith("Cache")


class BlockRunner:
    """The blocks of one model, their links, and the calls that replay them (see the module docstring)."""

    def __init__(self, family: ModelFamily, model: nn.Module):
        self.family, self.model = family, model
        self.blocks = family.blocks(model)
        self.links = family.block_links(model)
        if len(self.links) != len(self.blocks):
            raise ValueError(f"{len(self.links)} block links for {len(self.blocks)} blocks")

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def block(self, i: int) -> nn.Module:
        return self.blocks[i][1]

    def link(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block i's input from block i − 1's output (identity, or the family's module between them)."""
        module = self.links[i]
        return hidden if module is None else module(hidden)

    @torch.no_grad()
    def first_input(self, inputs: Inputs) -> tuple[torch.Tensor, BlockCall]:
        """The first block's hidden states for a batch, and the call that replays every block on it.

        The forward pass stops at the first block: only the embeddings run.
        """
        seen: dict[str, Any] = {}

        def grab(_module, args, kwargs):
            seen["hidden"], seen["call"] = _split_call(args, kwargs)
            raise _Stop

        handle = self.block(0).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.family.forward(self.model, inputs)
        except _Stop:
            pass
        finally:
            handle.remove()
        if "hidden" not in seen:
            raise LowrankError(f"{type(self.model).__name__}: its first block was never called; local distillation needs the blocks "
                               "the family names (recipe key distill.local)", param="distill.local")
        return seen["hidden"].detach(), seen["call"]

    @torch.no_grad()
    def check(self, inputs: Inputs, rtol: float = 1e-3) -> None:
        """A LowrankError unless replaying the blocks one after the other from the first block's input, with the
        first block's other arguments, gives every block's input and output as the model's own forward does."""
        ins: list[tuple[torch.Tensor, BlockCall]] = []
        outs: list[torch.Tensor] = []
        handles = []
        for _, block in self.blocks:
            handles.append(block.register_forward_pre_hook(lambda _m, a, k: ins.append(_split_call(a, k)), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o)))
        try:
            self.family.forward(self.model, inputs)
        finally:
            for h in handles:
                h.remove()
        if len(ins) != len(self.blocks) or len(outs) != len(self.blocks):
            raise self._refuse(f"its {len(self.blocks)} blocks were called {len(ins)} times in one forward pass")
        hidden, call = ins[0]
        for i in range(len(self.blocks)):
            if i:
                hidden = self.link(i, hidden)
                if not _close(hidden, ins[i][0], rtol):
                    raise self._refuse(f"block {self.names[i]}'s input is not the previous block's output")
            hidden = call(self.block(i), hidden)
            if not _close(hidden, outs[i], rtol):
                raise self._refuse(f"block {self.names[i]} replayed with the first block's arguments does not give its own output")

    def head(self, inputs: Inputs, hidden: torch.Tensor, as_tuple: bool = False) -> torch.Tensor:
        """The model's output for a batch whose last block's output is `hidden`: the model's own forward with every block
        passed through (the first to the next, the last giving `hidden`), so that only the embeddings (their output unused)
        and what follows the blocks (a final norm, a head) run. Gradients flow into `hidden`. `as_tuple`: the blocks
        return tuples (the hidden states first), as some families' do."""
        last = len(self.blocks) - 1
        swapped = [(name, _Passthrough(hidden if i == last else None, as_tuple)) for i, (name, _) in enumerate(self.blocks)]
        _swap(self.model, swapped)
        try:
            return self.family.forward(self.model, inputs)
        finally:
            _swap(self.model, self.blocks)

    def _refuse(self, why: str) -> LowrankError:
        return LowrankError(f"{type(self.model).__name__}: {why}, so its blocks cannot be distilled one at a time; "
                            "turn local distillation off (recipe key distill.local)", param="distill.local")


class _Passthrough(nn.Module):
    """A block stand-in for `BlockRunner.head`: gives its input back, or `out` when given."""

    def __init__(self, out: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.out, self.as_tuple = out, as_tuple

    def forward(self, hidden: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        hidden = kwargs.get("hidden_states") if hidden is None else hidden
        out = hidden if self.out is None else self.out
        return (out,) if self.as_tuple else out


def _swap(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> None:
    """Put each (dotted name, module) in its place in `model`."""
    for name, module in modules:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    if a.shape != b.shape:
        return False
    scale = b.float().abs().max().clamp_min(1e-12)
    return bool(((a.float() - b.float()).abs().max() / scale) <= rtol)
