"""Generating text with a KV cache, one step at a time: what `lowrank bench --generate` times.

A `Decoder` splits greedy generation in the two phases a server runs: `prefill` (the prompt, in
one forward pass that fills the cache) and `step` (one new token per sequence, reading the
cache). Their costs differ in kind: prefill is bound by compute (its MACs), decode at small
batch by the bytes of weights read per token. `greedy` composes them.

`CachedDecoder` drives a transformers causal LM with its own cache (`DynamicCache`), passing
it as `cache=` (transformers ≥ 5) or `past_key_values=` (before), and asking the prefill for
the last position's logits only, as `generate` does. Other runtimes (ONNX Runtime) provide the
same two calls.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
from torch import nn


class Decoder(Protocol):
    """Greedy generation in two phases. `state` is the decoder's own (its cache, the attention mask)."""

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The prompts (`batch × length` ids and mask) → the next-token logits (`batch × vocab`) and the state."""

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """One new token per sequence (`batch × 1`) → its next-token logits and the state grown by one position."""

    def state_bytes(self, state: Any) -> int:
        """Bytes the state holds (the KV cache)."""


def cache_bytes(cache: Any) -> int:
    """Bytes a KV cache holds: every tensor in it (a transformers `Cache`'s layers, or tuples of tensors)."""
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, (list, tuple)):
        return sum(cache_bytes(c) for c in cache)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(cache_bytes([getattr(layer, "keys", None), getattr(layer, "values", None)]) for layer in layers)
    if hasattr(cache, "key_cache"):  # transformers before 4.56: lists of tensors
        return cache_bytes(list(cache.key_cache) + list(cache.value_cache))
    return 0


class CachedDecoder:
    """A transformers causal LM as a `Decoder`, in inference mode; its state is `(cache, mask)`."""

    def __init__(self, model: nn.Module):
        self.model = model
        accepted = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        # the last position's logits only, as `generate` asks (`num_logits_to_keep` in transformers 4.45–4.48, none before)
        keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in accepted), None)
        self._keep = {keep: 1} if keep else {}

    def _call(self, ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **self._keep, **kwargs)
        cache = out.cache if "cache" in out else out.past_key_values
        return out.logits[:, -1], cache

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        logits, cache = self._call(ids, mask, None)
        return logits, (cache, mask)

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        cache, mask = state
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits, cache = self._call(tokens, mask, cache)
        return logits, (cache, mask)

    def state_bytes(self, state: Any) -> int:
        return cache_bytes(state[0])


def greedy(decoder: Decoder, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The `new_tokens` tokens (`batch × new_tokens`) greedy decoding appends to the prompts; no stop at an end token."""
    logits, state = decoder.prefill(ids, mask)
    out = [logits.argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logits, state = decoder.step(out[-1], state)
        out.append(logits.argmax(-1, keepdim=True))
    return torch.cat(out, dim=1)
