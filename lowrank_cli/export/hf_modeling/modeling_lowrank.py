"""A low-rank factorized transformers model: its base architecture, with some layers replaced by two thin factors.

Written by `lowrank export --format hf` (the `lowrank` package). Loading it needs torch and transformers only:

    from transformers import AutoModel  # or the AutoModelFor... class that config.json's `auto_map` names
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)

`config.lowrank_layers` lists the factorized layers, `{name: {"rank", "d_in", "d_out", "bias", "kind"}}`, named as in
the base architecture. Each one is built in its low-rank form before the weights load, so that the checkpoint holds the
factors and nothing dense for it:

- `kind` "linear" (an `nn.Linear`) or "conv1d" (GPT-2's `Conv1D`, whose dense weight is stored transposed): `y = up(down(x))`,
  `<name>.down.weight` (rank × d_in), `<name>.up.weight` (d_out × rank) and, with a bias, `<name>.up.bias` (d_out);
- `kind` "embedding" (an `nn.Embedding` of d_in rows of width d_out): `E = lookup · projᵀ`, `<name>.lookup.weight`
  (d_in × rank) and `<name>.proj.weight` (d_out × rank).

The classes at the end of this file (after the marker line) are the base architecture's transformers classes with that
replacement made in `post_init`, before transformers ties weights and loads the checkpoint.
"""

import torch
import transformers
from torch import nn


class LowRankLinear(nn.Module):
    """`y = up(down(x))`: a rank-`rank` stand-in for a `d_out × d_in` linear layer (`down` without bias, `up` with the bias)."""

    def __init__(self, in_features, out_features, rank, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x):
        return self.up(self.down(x))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.up.bias is not None}"


class LowRankEmbedding(nn.Module):
    """`E ≈ lookup · projᵀ`: a rank-`rank` stand-in for an `nn.Embedding(num_embeddings, embedding_dim)`."""

    def __init__(self, num_embeddings, embedding_dim, rank, padding_idx=None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = num_embeddings, embedding_dim, rank, padding_idx
        self.lookup = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx, device=device, dtype=dtype)
        self.proj = nn.Linear(rank, embedding_dim, bias=False, device=device, dtype=dtype)

    @property
    def weight(self):
        """The dense table it stands for (rows × width), computed: for code that reads an embedding's weight."""
        return self.lookup.weight @ self.proj.weight.T

    def forward(self, ids):
        return self.proj(self.lookup(ids))

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


def _dims(module):
    """(d_in, d_out, has a bias) of an `nn.Linear` or a GPT-2 `Conv1D` (weight d_in × d_out), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    return None


def low_rank_module(name, dense, entry):
    """The empty low-rank module standing in for `dense` (on its device, in its dtype), checked against `entry`."""
    rank, d_in, d_out, kind = entry["rank"], entry["d_in"], entry["d_out"], entry.get("kind", "linear")
    weight = dense.weight
    if kind == "embedding":
        if not isinstance(dense, nn.Embedding) or (dense.num_embeddings, dense.embedding_dim) != (d_in, d_out):
            raise ValueError(f"lowrank_layers: '{name}' is an embedding of {d_in} × {d_out}, but the model has {dense!r}")
        return LowRankEmbedding(d_in, d_out, rank, dense.padding_idx, device=weight.device, dtype=weight.dtype)
    if kind not in ("linear", "conv1d"):
        raise ValueError(f"lowrank_layers: '{name}' has kind {kind!r}; accepted: linear, conv1d, embedding")
    dims = _dims(dense)
    if dims is None or dims[:2] != (d_in, d_out):
        raise ValueError(f"lowrank_layers: '{name}' is a {kind} layer {d_in} → {d_out}, but the model has {dense!r}")
    return LowRankLinear(d_in, d_out, rank, bias=entry.get("bias", True), device=weight.device, dtype=weight.dtype)


def make_low_rank(model, layers, prefix=""):
    """Replace each layer of `layers` (names in the base architecture; `prefix` the part of them above `model`, e.g.
    "model." for a base model under its causal-LM head) by its empty low-rank module; the others are kept."""
    for full_name, entry in layers.items():
        if not full_name.startswith(prefix):
            continue  # a layer outside this model (a head, when a base model is loaded alone)
        name = full_name[len(prefix):]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, low_rank_module(full_name, getattr(parent, child), entry))
    return model


class LowRankMixin:
    """Placed before a transformers model class: its factorized layers are made low-rank at the end of its construction,
    before `post_init` records tied weights and before `from_pretrained` loads the checkpoint."""

    lowrank_prefix = ""  # what the layer names have above this class's model

    def post_init(self):
        make_low_rank(self, getattr(self.config, "lowrank_layers", None) or {}, self.lowrank_prefix)
        super().post_init()


# ---- the classes of this model (written by lowrank export) ----
