"""How many bytes each stage of `compress` holds at its peak, from a model's shape: the accounting the block-by-block path
decides with (`pipelines.common.streamed`), and the memory model of docs/memory.md.

The counts are of what the code keeps, not of what the allocator or the libraries add (a process starts at some 0.8 GB
with torch, transformers and a tokenizer loaded, on the host): weights in their stored dtype; Adam's two moments and the
gradients in the student's dtype (the code trains in the weights' dtype); cached hidden states in the weights' dtype; a
forward and backward of one block keeping about `ACTIVATIONS_PER_TOKEN` values of the hidden width per token (attention
scores aside, a sequence of T tokens adds heads × T² values per block).
"""

from __future__ import annotations

from dataclasses import dataclass

WORK_PER_BLOCK = 5  # a block's teacher, its student, the student's gradients and Adam's two moments (student ≤ teacher)
ACTIVATIONS_PER_TOKEN = 20  # values of the hidden width a transformer block keeps for its backward, per token (MLP 4×–8×, attention, norms)


@dataclass(frozen=True)
class Shape:
    """A decoder's shape: width, blocks, MLP width, vocabulary, heads (query and key/value), bytes per stored value."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    dtype_bytes: int = 2
    tied: bool = False

    @property
    def block_params(self) -> int:
        kv = self.hidden * self.kv_heads // self.heads
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def outside_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.outside_params


@dataclass(frozen=True)
class Work:
    """How much data each stage holds: calibration, local-stage and held-out sequences, their length, the training batch,
    and the student's share of the teacher's block parameters (κ = 1.25: 0.8)."""

    calib: int = 128
    local: int = 512
    val: int = 256
    tokens: int = 128
    batch: int = 8
    kept: float = 0.8


def in_memory_need(weight_bytes: int) -> int:
    """The in-memory run's weights and training state: teacher, student, gradients, Adam (`WORK_PER_BLOCK` × the weights)."""
    return WORK_PER_BLOCK * weight_bytes


def block_need(block_bytes: int, outside_bytes: int, times: int = WORK_PER_BLOCK) -> int:
    """One block's work in the block-by-block path (`times` × its weights: `WORK_PER_BLOCK` when it trains, 2 for its teacher
    and student alone), or the weights outside the blocks (read alone) if more."""
    return max(times * block_bytes, outside_bytes)


def stage_peaks(s: Shape, w: Work = Work(), processes: int = 1) -> dict[str, dict[str, float]]:
    """Bytes each stage holds at its peak, per process: {path: {stage: bytes}} for the in-memory path (one process, or
    `processes` under DDP and under FSDP as it is built today: whole models first, then sharded) and the block-by-block
    path (one process; `activations` is what its cache holds in memory or on disk)."""
    b = s.dtype_bytes
    teacher = s.params * b
    student = (s.layers * s.block_params * w.kept + s.outside_params) * b
    hidden = s.hidden * b  # one token's hidden state
    grams = s.layers * 4 * s.hidden ** 2 * 8 + s.layers * s.intermediate ** 2 * 8  # fp64; q/k/v and gate/up share an input
    micro = max(1, 1024 // max(1, w.tokens)) * w.tokens  # tokens of one sensitivity micro-batch
    logits = micro * s.vocab * 4 * 4  # in memory: its logits, probabilities, log-softmax and their gradient in fp32
    train_acts = w.batch * w.tokens * (s.layers * ACTIVATIONS_PER_TOKEN * hidden + s.layers * s.heads * w.tokens * 4) + w.batch * w.tokens * s.vocab * 4 * 3
    local_cache = 4 * w.local * w.tokens * hidden  # teacher and student, inputs and outputs of one block
    state = 3 * student  # gradients and Adam's two moments
    in_memory = {
        # the Grams' pass and the sensitivity pass (a micro-batch's backward through every block, its logits) come one after the other
        "calibration": teacher + student + max(min(grams, 2 << 30), micro * s.layers * ACTIVATIONS_PER_TOKEN * hidden + logits),
        "local stage": teacher + student + local_cache + WORK_PER_BLOCK * s.block_params * b,
        "end-to-end": teacher + student + state + train_acts,
    }
    fsdp = {
        "build (whole models)": teacher + student,
        "end-to-end": (teacher + student + state) / processes + 2 * s.block_params * b + train_acts,
    }
    chains = (w.calib + (2 + 1) * w.local + 3 * w.val) * w.tokens * hidden  # calibration, local teacher/student/target, 3 held-out
    streamed = {
        "measure: weights": max(s.block_params, s.outside_params) * b + micro * s.vocab * 4 + w.tokens * s.vocab * 4 * 3,
        "measure: activations (disk)": (s.layers + 2) * w.calib * w.tokens * hidden,
        "blocks: weights and training": block_need(s.block_params * b, s.outside_params * b),
        "blocks: activations": chains,
    }
    return {"in memory": in_memory, f"FSDP, {processes} processes": fsdp, "one block at a time": streamed}


LLAMA_7B = Shape(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32)
LLAMA_70B = Shape(hidden=8192, layers=80, intermediate=28672, vocab=128256, heads=64, kv_heads=8)
SMOLLM2_135M = Shape(hidden=576, layers=30, intermediate=1536, vocab=49152, heads=9, kv_heads=3, dtype_bytes=4, tied=True)
