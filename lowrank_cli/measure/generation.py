"""Timing generation with a KV cache: prefill, time to first token and decode, interleaved across models.

`time_generation` runs greedy generation with each decoder (anything with `prefill(ids, mask)` and
`step(tokens, state)`, see `models.generation`) `repeats` times, the models' order alternating every
round as `timing.time_interleaved` does, and times the three phases a server sees:

- prefill: the forward pass over the prompts that fills the cache;
- time to first token: the prefill and the choice of the first new token;
- decode: each later step, one token per sequence (the mean step of a run).

`weight_bytes_per_token` is what one decoding step reads of the weights: at small batch, decode is
bound by it, so the ratio of two models' bytes is the ideal decode speedup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowrank_cli.measure.timing import Timing


@dataclass
class GenerationTiming:
    """One model's generation at one batch size: seconds per prefill, to the first token, and per decode step."""

    batch: int
    prompt_len: int
    new_tokens: int
    prefill: Timing  # the forward pass over `batch × prompt_len` tokens
    ttft: Timing  # prefill and the first token chosen
    decode: Timing  # one step: `batch` new tokens

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill.median_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch / self.decode.median_s


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every parameter once (shared ones once), except that an embedding
    table only looked up contributes one row; a table the output head shares (tied weights) is read whole."""
    looked_up: dict[int, nn.Parameter] = {}
    used_whole: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            (looked_up if isinstance(module, nn.Embedding) else used_whole)[id(param)] = param
    whole = sum(p.numel() * p.element_size() for p in used_whole.values())
    rows = sum(p[0].numel() * p.element_size() for k, p in looked_up.items() if k not in used_whole and p.dim() == 2)
    return whole + rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(decoder: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, sync: Callable[[], None]) -> tuple[float, float, float]:
    """(prefill, time to first token, mean decode step) of one greedy generation, in seconds."""
    sync()
    start = time.perf_counter()
    logits, state = decoder.prefill(ids, mask)
    sync()
    prefilled = time.perf_counter()
    token = logits.argmax(-1, keepdim=True)
    sync()
    first = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, state = decoder.step(token, state)
        token = logits.argmax(-1, keepdim=True)
    sync()
    end = time.perf_counter()
    return prefilled - start, first - start, (end - first) / (new_tokens - 1)


def time_generation(
    decoders: dict[str, Any],
    ids: torch.Tensor,
    mask: torch.Tensor,
    new_tokens: int,
    *,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | None = None,
) -> dict[str, GenerationTiming]:
    """Greedy generation of `new_tokens` (at least 2) after the prompts `ids`, with each decoder, interleaved: see the
    module docstring. Every run generates all `new_tokens`, whatever the tokens are (no stop at an end token). `device`:
    where the work runs, to synchronise with (default: the prompts' device)."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens {new_tokens}: at least 2 (a first token and one decode step)")
    sync = lambda: _sync(device or ids.device)  # noqa: E731
    for _ in range(warmup):
        for decoder in decoders.values():
            _run_once(decoder, ids, mask, new_tokens, sync)
    samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in decoders}
    keys = list(decoders)
    for i in range(repeats):
        for key in keys if i % 2 == 0 else reversed(keys):
            samples[key].append(_run_once(decoders[key], ids, mask, new_tokens, sync))
    batch, length = ids.shape
    return {
        k: GenerationTiming(batch, length, new_tokens, Timing.of([s[0] for s in v]), Timing.of([s[1] for s in v]), Timing.of([s[2] for s in v]))
        for k, v in samples.items()
    }
