"""The one model surgery: replace selected submodules, in place, by what a function returns.

Factorization, whitening, PC-LoRA, manifests and export all swap modules through
`replace_modules`, in the manner of timm's `freeze_batch_norm_2d`: a short recursion over
`named_children()` that swaps a child with `setattr`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from torch import nn

Replace = Callable[[str, nn.Module], "nn.Module | None"]
Select = Callable[[str, nn.Module], bool]


def replace_modules(model: nn.Module, fn: Replace, select: Select) -> list[str]:
    """Swap every submodule for which `select(name, module)` holds by `fn(name, module)`, in place.

    Names are dotted paths from `model` (`blocks.0.attn.qkv`); modules are visited in
    `named_modules()` order, one at a time, so that `fn` may free memory as it goes. `fn`
    returning None (or the module itself) keeps the module, which is then searched further.
    A replacement is never searched. Returns the names replaced, in order.
    """
    return _replace(model, fn, select, "")


def _replace(parent: nn.Module, fn: Replace, select: Select, prefix: str) -> list[str]:
    replaced = []
    for child_name, child in list(parent.named_children()):
        name = prefix + child_name
        if select(name, child):
            new = fn(name, child)
            if new is not None and new is not child:
                setattr(parent, child_name, new)
                replaced.append(name)
                continue
        replaced += _replace(child, fn, select, name + ".")
    return replaced


def named_in(names) -> Select:
    """A `select` for `replace_modules` that matches the given dotted names."""
    wanted = set(names)
    return lambda name, _module: name in wanted


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (their buffers as usual).

    A parameter is created on the CPU before it is registered, but its memory is never touched
    (the initialization that would touch it runs on the meta copy), so it is never resident.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
