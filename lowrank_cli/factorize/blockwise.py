"""A model compressed one transformer block at a time from its checkpoint's files (docs/algorithms.md §12).

- `BlockSource`: the model's skeleton (`models.skeleton`: parameters on the meta device) whose weights are read from
  the checkpoint onto a device one block (or the part outside the blocks) at a time, and dropped again.
- `ActivationStore`: the hidden states a pass keeps (one tensor per batch and level), in memory while they fit under
  its limit, else in memory-mapped files on disk.
- `measure_streamed`: what a data-aware allocation across layers needs (`factorize.allocation: sensitivity` with
  `factorize.method: whitened`), block by block: a forward pass through the dense blocks (each block's calibration
  inputs kept, its layers' whitened spectra taken from their Grams), the model's head on the last block's output, then a
  backward pass from the last block to the first, each block's forward recomputed from its kept inputs with the gradient of
  its output handed in. The sums are those of `sensitivity.layer_sensitivity` on the whole model up to float rounding
  (the Grams summed over its micro-batches, the head's logits computed a few sequences at a time), with the labels drawn
  in the same order from the same generators; on a tiny Llama and on SmolLM2-135M the ranks are the in-memory path's.
- `factorize_block`: one dense block's low-rank copy, by whitened SVD on the block's calibration inputs (which it passes
  on) or plain SVD, at the ranks already allocated or by the rank rule.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from lowrank_cli.decompose.svd import svd
from lowrank_cli.decompose.whiten import projection_factors, whitened_basis
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.calibrate import _batches_of, collect_input_stats
from lowrank_cli.factorize.sensitivity import (LayerSensitivity, SensitivityTaps, check_felt, draw_targets, is_distribution, micro_batches,
                                               target_loss)
from lowrank_cli.factorize.stream import _materialize, _to_meta
from lowrank_cli.models.blocks import BlockCall, BlockRunner
from lowrank_cli.models.family import Inputs, ModelFamily, inputs_to
from lowrank_cli.models.skeleton import state_names
from lowrank_cli.models.tasks import Task
from lowrank_cli.nn.lowrank import LowRankLinear, dense_weight
from lowrank_cli.nn.surgery import named_in, replace_modules
from lowrank_cli.plan.select import LayerPlan, rule_of, set_rank
from lowrank_cli.recipe import Recipe


class BlockSource:
    """The skeleton `model` of `family`, its weights read by `get(sources[name])` onto `device` a block at a time."""

    def __init__(self, model: nn.Module, family: ModelFamily, get: Callable[[str], torch.Tensor], sources: dict[str, str],
                 device: torch.device):
        self.model, self.family, self.get, self.sources, self.device = model, family, get, sources, device
        self.runner = BlockRunner(family, model)
        if any(link is not None for link in self.runner.links):
            raise LowrankError(f"{type(model).__name__} has modules between its blocks; it cannot be compressed one block at a time "
                               "(raise factorize.max_memory)", param="factorize.max_memory")
        self.prefixes = tuple(f"{name}." for name in self.runner.names)
        for module in model.modules():  # the skeleton's real buffers (rotary tables) on the device
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
        self.keys = [names[0] for names in state_names(model)]  # saved names, in the state dict's order

    def __len__(self) -> int:
        return len(self.runner.names)

    def prefix(self, i: int) -> str:
        return self.prefixes[i]

    def outside(self, key: str) -> bool:
        return not key.startswith(self.prefixes)

    def load_outside(self) -> None:
        _materialize(self.model, self, self.outside)

    def drop_outside(self) -> None:
        _to_meta(self.model, self.outside)

    def load(self, i: int) -> nn.Module:
        """Block i with its weights read (frozen), on the device."""
        _materialize(self.model, self, lambda key: key.startswith(self.prefixes[i]))
        return self.runner.block(i)

    def drop(self, i: int) -> None:
        _to_meta(self.model, lambda key: key.startswith(self.prefixes[i]))

    def first_inputs(self, batches: list[Inputs]) -> tuple[list[torch.Tensor], list[BlockCall], list[torch.Tensor | None]]:
        """(first block's input, the call that replays every block, attention mask) of each batch: the weights outside the
        blocks are read for it and dropped after."""
        self.load_outside()
        hidden, calls, masks = [], [], []
        try:
            for inputs in batches:
                inputs = inputs_to(inputs, self.device)
                h, call = self.runner.first_input(inputs)
                hidden.append(h)
                calls.append(call)
                masks.append(inputs.get("attention_mask") if isinstance(inputs, dict) else None)
        finally:
            self.drop_outside()
        return hidden, calls, masks


class ActivationStore:
    """Lists of tensors kept under names (one tensor per batch): in memory while the kept bytes stay under `limit`, else
    written to a memory-mapped file in `folder` (read back page by page as they are used). `peak_disk` and `peak_memory`:
    the most bytes held each way at once."""

    def __init__(self, folder: Path | None, limit: int):
        self.folder, self.limit = folder, limit
        self.lists: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, tuple[int, bool]] = {}  # name -> (bytes, on disk)
        self.peak_disk = self.peak_memory = 0

    def _held(self, on_disk: bool) -> int:
        return sum(n for n, disk in self.sizes.values() if disk == on_disk)

    def put(self, name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Keep `tensors` under `name` (replacing what it held); the tensors as kept."""
        self.drop(name)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if self.folder is None or self._held(False) + nbytes <= self.limit or not tensors:
            self.lists[name], self.sizes[name] = list(tensors), (nbytes, False)
        else:  # read back onto the device they came from, one at a time as they are used
            self.lists[name], self.sizes[name] = _Spilled(self._to_disk(name, tensors, nbytes), tensors[0].device), (nbytes, True)
        self.peak_disk, self.peak_memory = max(self.peak_disk, self._held(True)), max(self.peak_memory, self._held(False))
        return self.lists[name]

    def _to_disk(self, name: str, tensors: list[torch.Tensor], nbytes: int) -> list[torch.Tensor]:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.bin"
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise ValueError(f"activations '{name}' mix dtypes")
        with open(path, "wb") as f:  # written through the file, so that no page of it is resident until it is read
            for t in tensors:
                f.write(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        flat = torch.from_file(str(path), shared=True, size=nbytes // tensors[0].element_size(), dtype=dtype)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view(t.shape))
            offset += t.numel()
        return out

    def get(self, name: str) -> list[torch.Tensor]:
        return self.lists[name]

    def drop(self, name: str) -> None:
        self.lists.pop(name, None)
        size = self.sizes.pop(name, None)
        if size is not None and size[1] and self.folder is not None:
            (self.folder / f"{name}.bin").unlink(missing_ok=True)

    def close(self) -> None:
        for name in list(self.lists):
            self.drop(name)
        if self.folder is not None and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


class _Spilled(list):
    """Tensors kept on the host (memory-mapped), each handed out on `device`."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        super().__init__(tensors)
        self.device = device

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return [t.to(self.device) for t in item] if isinstance(i, slice) else item.to(self.device)

    def __iter__(self):
        return (t.to(self.device) for t in super().__iter__())


def measure_streamed(src: BlockSource, plans: list[LayerPlan], recipe: Recipe, calibration: Iterable, task: Task, store: ActivationStore,
                     seed: int = 0, progress: Callable[[int, int], None] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, LayerSensitivity] | None]:
    """(each planned layer's whitened spectrum, its squared output error per row of one unit of that spectrum's energy,
    each budget-ruled layer's `LayerSensitivity` when the allocation is by sensitivity): see the module docstring.
    `progress(done, total)` after each block of each pass."""
    fac = recipe.factorize
    if fac.method != "whitened":
        raise LowrankError(f"factorize.method '{fac.method}' with ranks allocated across layers is not computed one block at a time; "
                           "use factorize.method 'whitened', or raise factorize.max_memory", param="factorize.method")
    todo = {p.name: p for p in plans if p.factorized}
    sensitive = fac.allocation == "sensitivity"
    pieces: list[tuple[int, Inputs]] = []  # the sensitivity pass's micro-batches, each with its batch's index
    for i, inputs in enumerate(_batches_of(calibration)):
        pieces += [(i, piece) for piece in micro_batches(inputs_to(inputs, src.device))]
    if not pieces:
        raise LowrankError("calibration data is empty: give at least one example (factorize.calib_samples)", param="calib_samples")
    hidden, calls, masks = src.first_inputs([piece for _, piece in pieces])
    store.put("measure-0", hidden)
    del hidden  # the store holds it (in memory or on disk)
    sigmas, unit = {}, {}
    for b in range(len(src)):
        prefix, block = src.prefix(b), src.load(b)
        names = [n[len(prefix):] for n in todo if n.startswith(prefix)]
        outs, stats = _pass(block, names, store.get(f"measure-{b}"), calls, masks)
        for name in names:
            st = stats.pop(name)
            sigmas[prefix + name] = whitened_basis(dense_weight(block.get_submodule(name))[0], st.gram, device=src.device)[1].cpu()
            unit[prefix + name] = 1.0 / max(st.rows, 1)
        src.drop(b)
        store.put(f"measure-{b + 1}", outs)
        if not sensitive:
            store.drop(f"measure-{b}")
        if progress is not None:
            progress(b + 1, len(src) * (2 if sensitive else 1))
    if not sensitive:
        store.drop(f"measure-{len(src)}")
        return sigmas, unit, None
    measured = {n for n, p in todo.items() if p.rule is not None and p.rule.startswith("budget")}
    return sigmas, {n: u for n, u in unit.items() if n in measured}, _backward(src, pieces, calls, masks, measured, task, store, seed, progress)


def _pass(block: nn.Module, names: list[str], hidden: list[torch.Tensor], calls: list[BlockCall], masks: list) -> tuple[list[torch.Tensor], dict]:
    """The block's outputs on every batch of `hidden`, and the input statistics (Grams) of its layers `names`."""
    outs: list[torch.Tensor] = []

    def run(blk: nn.Module, item: dict) -> torch.Tensor:
        out = calls[int(item["index"])](blk, item["hidden"])
        outs.append(out)
        return out

    items = [{"hidden": h, "index": torch.tensor(j), **({"attention_mask": m} if m is not None else {})} for j, (h, m) in enumerate(zip(hidden, masks))]
    if names:
        return outs, collect_input_stats(block, names, items, gram=True, call=run)
    with torch.no_grad():
        for item in items:
            run(block, item)
    return outs, {}


def _backward(src: BlockSource, pieces: list[tuple[int, Inputs]], calls: list[BlockCall], masks: list, measured: set[str], task: Task,
              store: ActivationStore, seed: int, progress: Callable[[int, int], None] | None) -> dict[str, LayerSensitivity]:
    """The sensitivity pass, block by block from the head back (see the module docstring); frees the kept inputs as it goes."""
    n = len(src)
    src.load_outside()
    grads, generator, last = [], None, None
    try:
        for j, (i, piece) in enumerate(pieces):
            if i != last:  # one generator per calibration batch, as `layer_sensitivity` draws the labels
                generator, last = torch.Generator(device=src.device).manual_seed(seed * 1_000_003 + i), i
            final = store.get(f"measure-{n}")[j].detach().clone().requires_grad_(True)
            _head_backward(src, piece, final, calls[j].tuple_out, task, masks[j], generator)
            grads.append(final.grad)
    finally:
        src.drop_outside()
    store.drop(f"measure-{n}")
    grads = store.put("grad", grads)
    stats: dict[str, LayerSensitivity] = {}
    for b in reversed(range(n)):
        prefix = src.prefix(b)
        names = {name: name[len(prefix):] for name in measured if name.startswith(prefix)}
        block = src.load(b)
        taps = SensitivityTaps(block, names)
        new = []
        try:
            for j, h in enumerate(store.get(f"measure-{b}")):
                taps.current["mask"] = masks[j]
                x = h.detach().clone().requires_grad_(b > 0)
                with torch.enable_grad():
                    out = calls[j](block, x)
                    if out.requires_grad:
                        out.backward(grads[j].to(out.dtype))
                new.append(x.grad if x.grad is not None else torch.zeros_like(x))
        finally:
            taps.remove()
            src.drop(b)
        stats.update(taps.stats)
        store.drop(f"measure-{b}")
        grads = store.put("grad", new) if b > 0 else []
        if progress is not None:
            progress(2 * n - b, 2 * n)
    store.drop("grad")
    check_felt(stats)
    return stats


HEAD_ELEMENTS = 1 << 23  # the most output values (logits) one call of the head makes: a sequence's over a vocabulary at least


def _head_backward(src: BlockSource, piece: Inputs, final: torch.Tensor, as_tuple: bool, task: Task, mask: torch.Tensor | None,
                   generator: torch.Generator) -> None:
    """`output_loss` of the model's output on `piece` from its last block's output `final`, backward into `final.grad`: the
    targets drawn on the whole piece as `layer_sensitivity` draws them, the output computed a few examples at a time, so
    that a vocabulary's logits are never held for the whole piece more than once (the probabilities the labels are drawn from)."""
    batch = final.shape[0]
    with torch.no_grad():
        probe = src.runner.head(_rows(piece, 0, 1), final[:1], as_tuple)
    rows = max(1, HEAD_ELEMENTS // max(1, probe.numel()))
    chunks = [(e, min(batch, e + rows)) for e in range(0, batch, rows)]
    if not is_distribution(probe, task):  # features: z of the output's shape
        with torch.no_grad():
            out = torch.cat([src.runner.head(_rows(piece, a, b), final[a:b], as_tuple) for a, b in chunks])
        targets = draw_targets(out, task, mask, generator)
        del out
        for a, b in chunks:
            with torch.enable_grad():
                target_loss(src.runner.head(_rows(piece, a, b), final[a:b], as_tuple), task, _mask(mask, a, b), targets[a:b]).backward()
        return
    with torch.no_grad():  # the labels: one draw over every real token's probabilities, as on the whole model
        probs = torch.cat([_real_rows(torch.softmax(src.runner.head(_rows(piece, a, b), final[a:b], as_tuple).float(), -1), _mask(mask, a, b))
                           for a, b in chunks])
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        del probs
    offset = 0
    for a, b in chunks:
        sub = _mask(mask, a, b)
        count = int(sub.sum()) if sub is not None and probe.dim() == 3 else (b - a) * (probe[0].numel() // probe.shape[-1])
        with torch.enable_grad():
            target_loss(src.runner.head(_rows(piece, a, b), final[a:b], as_tuple), task, sub, labels[offset:offset + count]).backward()
        offset += count


def _rows(inputs: Inputs, a: int, b: int) -> Inputs:
    """Examples a..b of a batch."""
    if not isinstance(inputs, dict):
        return inputs[a:b]
    n = next(v.shape[0] for v in inputs.values() if torch.is_tensor(v) and v.dim())
    return {k: v[a:b] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v for k, v in inputs.items()}


def _mask(mask: torch.Tensor | None, a: int, b: int) -> torch.Tensor | None:
    return None if mask is None else mask[a:b]


def _real_rows(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is not None and probs.dim() == 3 and tuple(probs.shape[:2]) == tuple(mask.shape):
        probs = probs[mask.bool()]
    return probs.reshape(-1, probs.shape[-1])


def factorize_block(block: nn.Module, prefix: str, todo: dict[str, LayerPlan], recipe: Recipe, device: torch.device, allocated: bool,
                    calibration: tuple[list[torch.Tensor], list[BlockCall], list] | None = None) -> tuple[nn.Module, list[torch.Tensor] | None]:
    """(a low-rank copy of the dense `block`, its dense outputs on the calibration inputs): each planned layer of the block
    (`todo`: full name -> plan) by whitened SVD on `calibration` ((inputs, calls, masks): the block's inputs on the dense model)
    or by plain SVD, at the plan's rank when `allocated`, else at the rank its rule sets from the spectrum. A layer whose rank
    would not shrink it stays dense. The copy's parameters are trainable; `block` is unchanged."""
    names = [n[len(prefix):] for n in todo if n.startswith(prefix)]
    whitened = recipe.factorize.method == "whitened"
    outs, stats = None, {}
    if whitened:
        if calibration is None:
            raise LowrankError("factorize.method 'whitened' needs calibration data (factorize.calib_data)", param="calib_data")
        outs, stats = _pass(block, names, *calibration)

    def swap(name: str, linear: nn.Module) -> nn.Module | None:
        plan = todo[prefix + name]
        weight, bias = dense_weight(linear)
        if whitened:
            U, sigma = whitened_basis(weight, stats.pop(name).gram, device=device)
        else:
            factors = svd(weight, device)
            sigma = factors[1]
        if not allocated:
            set_rank(plan, *rule_of(plan), sigma.cpu())
        if not plan.factorized:
            return None
        if not whitened:
            return LowRankLinear.from_linear(linear, plan.rank, factors)
        up, down = projection_factors(weight, U[:, : plan.rank])
        return LowRankLinear.from_factors(up.to(weight.device).contiguous(), down.to(weight.device).contiguous(),
                                          None if bias is None else bias.detach().clone())

    student = copy.deepcopy(block)
    replace_modules(student, swap, named_in(names))
    for param in student.parameters():
        param.requires_grad_(True)
    return student, outs
