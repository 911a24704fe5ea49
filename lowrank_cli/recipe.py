"""Recipes: YAML files that say which model, which layers, which ranks (and, later, how to train).

A recipe is data, validated by a pydantic schema: an unknown key or a wrong type is a
`LowrankError` naming the file, the key and what is accepted. Bundled recipes live in the
repository's `recipes/` folder and are installed as the package `lowrank_cli.recipes`, so
`--recipe swin`, `--recipe swin.yaml` and `--recipe path/to/mine.yaml` all work.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import math
import re
from pathlib import Path
from typing import Any, Literal, Sequence, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lowrank_cli.errors import LowrankError


_DURATION = re.compile(r"(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m(?:in)?)?(?:(\d+(?:\.\d*)?)s)?")
DURATIONS = "a duration such as 30m, 1h30m, 90s or 2h"


_SIZE = re.compile(r"(\d+(?:\.\d*)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?")
_SIZE_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZES = "a size such as 1.5GB, 800MB or 2GiB"


def parse_size(text: str | int) -> int:
    """Bytes of a size written `1.5GB`, `800MB`, `2GiB` or a number of bytes; ValueError for anything else."""
    m = _SIZE.fullmatch(str(text).strip().lower())
    if m is None:
        raise ValueError(f"not {SIZES}")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if size <= 0:
        raise ValueError(f"must be more than 0 bytes ({SIZES})")
    return size


def parse_duration(text: str) -> float:
    """Seconds of a duration written `2h`, `30m` (or `30min`), `90s`, `1h30m`, `1.5h`; ValueError for anything else
    (a bare number too: minutes or seconds would be a guess)."""
    m = _DURATION.fullmatch(str(text).strip().lower().replace(" ", ""))
    if m is None or not any(m.groups()):
        raise ValueError(f"not {DURATIONS}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"must be longer than 0 s ({DURATIONS})")
    return total


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Override(_Strict):
    """A per-layer exception to the recipe's rank rule; the first matching pattern wins."""

    pattern: str
    kappa: float | None = Field(default=None, gt=1)  # κ ≤ 1 would keep a layer at full size
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)
    skip: bool = False

    @model_validator(mode="after")
    def _one_rule(self) -> "Override":
        given = [k for k in ("kappa", "rank", "energy") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of kappa, rank, energy (got {', '.join(given)})")
        if not given and not self.skip:
            raise ValueError("give one of kappa, rank, energy, or skip: true")
        return self


class SelectConfig(_Strict):
    """Which linear layers are factorized.

    Patterns match a module name as a substring (as the released PELA code does), or as an
    fnmatch glob when they contain `*`, `?` or `[`. An empty `include` means every linear.
    """

    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=lambda: ["norm", "head", "patch_embed", "downsample", "pooler"])
    min_out_features: int = Field(default=10, ge=1)
    overrides: list[Override] = Field(default_factory=list)
    # latency-aware selection (plan/latency.py): time each planned layer dense vs factorized at its
    # rank on the target device, at the model's token count and `latency_batch` images, and
    # keep dense those whose factorized form is not `latency_margin`× faster
    latency_aware: bool = False
    latency_margin: float = Field(default=1.1, gt=0)
    latency_batch: int = Field(default=8, ge=1)
    latency_device: str | None = Field(default=None, pattern=r"^(cpu|cuda(:[0-9]+)?)$")  # None: cuda if available, else cpu
    latency_threads: int | None = Field(default=None, ge=1)  # None: torch's current number
    latency_runtime: Literal["torch", "onnxruntime"] = "torch"


class EmbeddingsConfig(_Strict):
    """Factorizing embedding tables too (`V × d → V × r · r × d`, ALBERT's factorized embeddings).

    Off unless given. `include` matches module names (substrings or globs); the rank is the
    tables' own: κ (`r = floor(V·d / (κ(V + d)))`) or a fixed `rank`. Tables tied to an LM head
    stay dense.
    """

    include: list[str] = Field(default_factory=lambda: ["word_embeddings", "wte", "embed_tokens"])
    kappa: float | None = Field(default=None, gt=1)
    rank: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_rule(self) -> "EmbeddingsConfig":
        if (self.kappa is None) == (self.rank is None):
            raise ValueError("give exactly one of kappa or rank")
        return self


class FactorizeConfig(_Strict):
    """How ranks are chosen and how the factors are computed."""

    rank_rule: Literal["kappa", "rank", "energy", "budget"] = "kappa"
    kappa: float = Field(default=2.0, gt=1)  # κ ≤ 1 would keep every layer at full size
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0, le=1)
    # rank_rule 'budget': ranks allocated across layers to keep this fraction of the
    # selected layers' parameters (or MACs), greedily by truncation error (see plan/budget.py)
    target_params: float | None = Field(default=None, gt=0, le=1)
    target_macs: float | None = Field(default=None, gt=0, le=1)
    min_rank: int = Field(default=1, ge=1)
    # how ranks are spread over the layers: 'uniform' (the rule alone: κ for every layer, or the budget by
    # each layer's own truncation energy), or 'sensitivity' (each layer's truncation energy weighted by how
    # much the model's output loss feels its output, measured with one backward pass per calibration batch;
    # with rank_rule kappa, at uniform κ's parameter count; needs calib_data; docs/algorithms.md §8)
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    # 'whitened' and 'asvd'' minimise the output error on calibration inputs (docs/algorithms.md §4)
    method: Literal["svd", "whitened", "asvd"] = "svd"
    asvd_alpha: float = Field(default=0.5, gt=0)
    calib_data: str | None = None  # a folder of images, 'digits' or 'synthetic'
    calib_samples: int = Field(default=256, ge=1)
    calib_batch_size: int = Field(default=32, ge=1)
    calib_max_gram_mb: int = Field(default=2048, ge=1)
    embeddings: EmbeddingsConfig | None = None  # factorize embedding tables too (off by default)
    # the memory the command may use (1.5GB): a model whose in-memory work needs more is compressed one transformer block
    # at a time from its files (docs/algorithms.md §12); None: the machine's available memory
    max_memory: str | None = None

    @field_validator("max_memory", mode="before")
    @classmethod
    def _is_size(cls, value: str | int | None) -> str | None:
        if value is not None:
            value = str(value)  # a number of bytes too
            parse_size(value)
        return value

    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory is None else parse_size(self.max_memory)

    @model_validator(mode="after")
    def _rule_has_value(self) -> "FactorizeConfig":
        if self.rank_rule == "rank" and self.rank is None:
            raise ValueError("rank_rule 'rank' needs 'rank: N'")
        if self.rank_rule == "energy" and self.energy is None:
            raise ValueError("rank_rule 'energy' needs 'energy: F' with 0 < F <= 1")
        targets = [k for k in ("target_params", "target_macs") if getattr(self, k) is not None]
        if self.rank_rule == "budget" and len(targets) != 1:
            got = f" (got both {' and '.join(targets)})" if targets else ""
            raise ValueError(f"rank_rule 'budget' needs exactly one of 'target_params: F' or 'target_macs: F' with 0 < F <= 1{got}")
        if self.rank_rule != "budget" and targets:
            raise ValueError(f"'{targets[0]}' is only used with 'rank_rule: budget' (rank_rule is '{self.rank_rule}')")
        if self.allocation == "sensitivity" and self.rank_rule not in ("kappa", "budget"):
            raise ValueError(f"allocation 'sensitivity' spreads a parameter count over the layers: use it with rank_rule 'kappa' or "
                             f"'budget' (rank_rule is '{self.rank_rule}', which fixes every layer's rank itself)")
        return self

    def rule_label(self) -> str:
        """`kappa=2`, `energy=0.9`, `budget_params=0.5`: the rule as reports and manifests show it."""
        if self.rank_rule == "budget":
            kind = "params" if self.target_params is not None else "macs"
            label = f"budget_{kind}={getattr(self, f'target_{kind}'):g}"
        else:
            label = f"{self.rank_rule}={getattr(self, self.rank_rule):g}"
        return label + (" (sensitivity)" if self.allocation == "sensitivity" else "")


class DataConfig(_Strict):
    """Where training and validation images come from (`compress`, `distill`, `evaluate`).

    `source`: an image folder in timm's layout (`root/train/<class>/*`, `root/val/<class>/*`),
    `digits` (scikit-learn's handwritten digits, resized) or `synthetic` (random, seeded); for a text
    model, a `.txt`/`.jsonl`/`.csv`/`.tsv`/`.parquet`/`.arrow` file, a folder of them, a folder saved by
    `datasets.save_to_disk` or `pydoc`, streamed when large (`streaming`); its text in `text_field` (docs/data.md).
    """

    source: str | None = None
    # text: tokens per document (default: the fewest that hold 95 % of the training documents whole, a multiple of 8, at most
    # 512 and the model's positions; a packed stream's: that bound), stated in the report
    max_length: int | None = Field(default=None, ge=1)
    # text: the field (.jsonl) or column (tables) that holds each document (default: `text`, else chat `messages`, rendered
    # by the checkpoint's chat template)
    text_field: str | None = Field(default=None, min_length=1)
    num_workers: int = Field(default=2, ge=0)
    skip_unreadable: bool = False  # an image folder's unreadable images: an error (default), or left out and counted
    synthetic_size: int = Field(default=256, ge=8)
    # digits: each training image shifted at random by up to this many pixels each way (None: 2); no other source takes it
    max_shift: int | None = Field(default=None, ge=0, le=16)
    # text read lazily (docs/algorithms.md §10): auto streams a file or folder of more than 256 MiB, true any file or folder, false none
    streaming: Literal["auto"] | bool = "auto"
    shuffle_window: int = Field(default=1024, ge=0)  # streamed text: sequences permuted within windows of this many (0 or 1: stream order)
    val_documents: int = Field(default=1000, ge=1)  # streamed text: the held-out documents evaluated (the first ones)


class PCLoRAConfig(_Strict):
    """PC-LoRA progressive compression (docs/algorithms.md §3): `distill.method: pclora`.

    The adapters' ranks come from the recipe's `factorize:` rule (κ or a fixed rank), so a
    PC-LoRA and a PELA student of the same recipe have the same structure and size. λ
    follows `schedule` from 1 at step 0 to exactly 0 at step `decay_end × total steps` and
    stays 0; the loss is `task_weight·L_task + (1 − task_weight)·L_featKD`.
    """

    schedule: Literal["linear", "sine", "one_minus_cosine"] = "sine"
    decay_end: float = Field(default=0.5, gt=0, le=1)  # q as a fraction of the total optimizer steps
    init: Literal["lora", "svd"] = "lora"  # lora: A random, B = C = 0 (the paper); svd: top-r SVD of W
    task_weight: float = Field(default=0.5, ge=0, le=1)  # α_task


class LocalConfig(_Strict):
    """Local (block-wise) distillation before the end-to-end stage (`distill.local`, docs/algorithms.md §9):
    each student block trained alone, `steps` Adam steps at `lr` (cosine to 0), to reproduce its teacher
    block's output on the cached inputs of `examples` training examples, from the student's own input
    (`inputs: student`, blocks one after the other) or the teacher's (`inputs: teacher`)."""

    steps: int = Field(default=150, ge=1)
    rounds: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0, le=10)
    examples: int = Field(default=1024, ge=1)
    batch_size: int = Field(default=32, ge=1)
    inputs: Literal["student", "teacher"] = "student"
    # with distill.budget: the share of the training time (the budget less loading, calibration, factorization and the
    # evaluations) that goes to this stage; `steps` is then the most a block trains, its count set from timed steps
    budget_share: float = Field(default=0.3, gt=0, lt=1)
    # with distill.budget: the fewest steps a block trains, whatever its part of the time (a few steps at the full rate
    # make a block worse); the blocks the stage's deadline leaves no time for stay as the factorization made them
    min_steps: int = Field(default=20, ge=1)


class DistillConfig(_Strict):
    """PELA intermediate pre-training: `L = L_base + alpha·L_fd + beta·L_rwp` (docs/algorithms.md §2).

    `batch_size` is per process; the learning rate is `lr` when given, else `lr_base`
    scaled (linearly or by the square root) from `lr_base_size` to the global batch
    (`batch_size × processes × accum_steps`), as timm does.
    """

    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=0.0, ge=0)
    epsilon: float = Field(default=1e-3, ge=0)
    rwp_form: Literal["hinge", "squared", "paper"] = "hinge"
    # auto: ce when the data's labels match the model's classes, kl for a causal LM, logits when there
    # are classes but no matching labels, none for a model of features (an encoder without a head)
    base_loss: Literal["auto", "ce", "logits", "lm", "kl", "none"] = "auto"
    logit_weight: float = Field(default=1.0, ge=0)
    pooled_cosine: float = Field(default=0.0, ge=0)  # text encoders: weight of 1 − cos of the mean-pooled embeddings
    # text: the fraction of each end-to-end training batch's tokens (neither a document's first nor its last; the local
    # stage's cached examples stay as they are) replaced, for
    # teacher and student alike, by tokens drawn from the same batch, so that the student matches the teacher on
    # inputs beyond the training text (0: off; evaluations always see the text as it is)
    token_noise: float = Field(default=0.0, ge=0, lt=1)
    epochs: int = Field(default=50, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    # wall time for the whole command (`30m`, `1h30m`), from its start: loading, calibration and factorization, the local
    # stage (its `budget_share`), the end-to-end stage and the evaluations. The step counts (`epochs`, `max_steps`,
    # `local.steps`) become upper bounds, each stage's count set from its first steps timed (docs/algorithms.md §11)
    budget: str | None = None
    batch_size: int = Field(default=64, ge=1)
    accum_steps: int = Field(default=1, ge=1)
    lr: float | None = Field(default=None, gt=0, le=10)  # beyond 10, AdamW only overflows
    lr_base: float = Field(default=5e-4, gt=0, le=10)
    lr_base_size: int = Field(default=512, ge=1)
    lr_base_scale: Literal["linear", "sqrt"] = "linear"
    min_lr: float = Field(default=1e-6, ge=0, le=10)
    warmup_epochs: float = Field(default=5, ge=0)
    warmup_steps: int | None = Field(default=None, ge=0)  # the warm-up in optimizer steps instead (a streamed source's, whose epochs have no known length)
    weight_decay: float = Field(default=0.05, ge=0)
    clip_grad: float | None = Field(default=5.0, gt=0)
    amp: Literal["bf16", "fp16", "none"] = "bf16"
    seed: int = 0
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=0, ge=0)
    keep_checkpoints: int = Field(default=2, ge=1)
    # `pela` trains an SVD-factorized student (alpha, beta, epsilon, rwp_form); `pclora` fades
    # the dense weights out beside low-rank adapters (the `pclora:` settings)
    method: Literal["pela", "pclora"] = "pela"
    pclora: PCLoRAConfig = Field(default_factory=PCLoRAConfig)
    # false: the student trains without dropout (nn.Dropout and attention dropout at 0), matching the teacher only
    dropout: bool = True
    local: LocalConfig | None = None  # block-wise distillation before the end-to-end stage (off unless given)
    # held-out evaluation every `eval_every` optimizer steps (0: only before and after training), on at most
    # `eval_examples` held-out examples (None: all), logged with the wall time to metrics.jsonl and the report
    eval_every: int = Field(default=0, ge=0)
    eval_examples: int | None = Field(default=None, ge=1)
    # text: each batch of documents of similar length (drawn from chunks of 64 shuffled batches), so that padding to the
    # longest wastes little; the batches' order stays shuffled. false: documents drawn at random (images: no effect)
    group_by_length: bool = True
    # several processes: `ddp` keeps a whole student, its gradients and optimizer state on each; `fsdp` (FSDP2) shards
    # them per transformer block over the processes, and the frozen teacher too (one process trains alike with either)
    strategy: Literal["ddp", "fsdp"] = "ddp"

    @field_validator("budget", mode="before")
    @classmethod
    def _a_duration(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"not {DURATIONS} (a bare number would be a guess between minutes and seconds)")
        parse_duration(value)
        return value.strip()

    def budget_seconds(self) -> float | None:
        """`budget` in seconds (None: no budget, the step counts decide)."""
        return None if self.budget is None else parse_duration(self.budget)

    @model_validator(mode="after")
    def _fsdp_limits(self) -> "DistillConfig":
        if self.strategy == "fsdp" and self.amp == "fp16":
            raise ValueError("distill.strategy 'fsdp' trains with distill.amp bf16 or none (fp16's grad scaler is not sharded); set amp to bf16")
        if self.strategy == "fsdp" and self.beta > 0:
            raise ValueError("distill.beta (PELA's L_rwp) reads every whole weight outside the forward pass, which distill.strategy 'fsdp' "
                             "keeps sharded; set beta to 0 or strategy to ddp")
        return self


class Recipe(_Strict):
    """A whole recipe: rules for a family of models. The architecture belongs to the checkpoint: `model` is
    used when its tensors fit it (or for random weights), else `architectures` (timm name patterns) are
    searched for one that does. `checkpoint` is a default input."""

    name: str = "custom"
    description: str = ""
    model: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    architectures: list[str] = Field(default_factory=lambda: ["deit_*", "vit_*"])
    checkpoint: str | None = None
    select: SelectConfig = Field(default_factory=SelectConfig)
    factorize: FactorizeConfig = Field(default_factory=FactorizeConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _pclora_needs_a_fixed_rank_rule(self) -> "Recipe":
        if self.distill.method == "pclora":
            if self.factorize.rank_rule not in ("kappa", "rank"):
                raise ValueError(f"distill.method 'pclora' takes its adapter ranks from factorize.rank_rule 'kappa' or 'rank' (got '{self.factorize.rank_rule}')")
            if self.factorize.method != "svd":
                raise ValueError(f"distill.method 'pclora' initialises its adapters itself (distill.pclora.init); set factorize.method to 'svd' (got '{self.factorize.method}')")
            if self.factorize.allocation != "uniform":
                raise ValueError(f"distill.method 'pclora' gives every layer the recipe's own rank; set factorize.allocation to 'uniform' (got '{self.factorize.allocation}')")
            if self.distill.beta > 0:
                raise ValueError("distill.beta (PELA's L_rwp) is not used by distill.method 'pclora'; set it to 0")
            if self.distill.budget is not None:
                raise ValueError("distill.budget sets the step count from timed steps, and distill.method 'pclora' fades λ to 0 at a step "
                                 "fixed in advance; drop distill.budget (size the run with distill.max_steps) or use distill.method 'pela'")
            if self.distill.local is not None:
                raise ValueError("distill.local trains factorized blocks, and distill.method 'pclora' keeps the dense weights until λ reaches 0; "
                                 "drop distill.local or use distill.method 'pela'")
        return self

    def with_kappa(self, kappa: float | None) -> "Recipe":
        """A copy with the rank rule set to κ for every layer (the command line's `--kappa`)."""
        if kappa is None:
            return self
        if not (math.isfinite(kappa) and kappa > 1):
            raise LowrankError(f"kappa must be a finite number > 1 (got {kappa}); κ = 2 halves a layer, κ ≤ 1 would keep it at full size", param="kappa")
        recipe = self.model_copy(deep=True)
        # one copy with all three changed: assigning them one by one would fail validation
        recipe.factorize = recipe.factorize.model_copy(update={"rank_rule": "kappa", "kappa": float(kappa), "target_params": None, "target_macs": None})
        return recipe

    def with_calibration_default(self) -> "Recipe":
        """A copy whose data-aware factorization (`whitened`, `asvd`, `allocation: sensitivity`) calibrates on the training part of `data.source`
        when `factorize.calib_data` is not given (unchanged otherwise): the recipe then records what was used."""
        f = self.factorize
        if (f.method == "svd" and f.allocation != "sensitivity") or f.calib_data is not None or self.data.source is None:
            return self
        return self.model_copy(update={"factorize": f.model_copy(update={"calib_data": self.data.source})})

    def with_latency_aware(self, on: bool = False) -> "Recipe":
        """A copy with `--latency-aware` applied (`select.latency_aware: true`); unchanged when off."""
        if not on:
            return self
        recipe = self.model_copy(deep=True)
        recipe.select = recipe.select.model_copy(update={"latency_aware": True})
        return recipe

    def with_overrides(self, overrides: Sequence[str] = ()) -> "Recipe":
        """A copy with `overrides` (`["distill.lr=1e-4", ...]`, see `apply_overrides`) applied and validated; unchanged when none."""
        if not overrides:
            return self
        return recipe_from_dict(apply_overrides(self.to_dict(), overrides), source=f"recipe '{self.name}' with {' '.join(overrides)}")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def bundled_recipes_dir() -> Path:
    """The folder of recipes shipped with the package (or the repository's, from a checkout)."""
    installed = Path(str(importlib.resources.files("lowrank_cli"))) / "recipes"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "recipes"


def bundled_recipe_names() -> list[str]:
    return sorted(p.stem for p in bundled_recipes_dir().glob("*.yaml"))


def resolve_recipe_path(spec: str | Path) -> Path:
    """A recipe path from a path, a bundled file name (`swin.yaml`) or a bundled name (`swin`)."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise LowrankError(f"recipe '{spec}': is a folder, expected a YAML recipe file", param="recipe")
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name[:-4] if path.name.endswith(".yml") else path.name
    if path.parent == Path(".") or str(path.parent) == "recipes":
        bundled = bundled_recipes_dir() / f"{name}.yaml"
        if bundled.is_file():
            return bundled
    names = bundled_recipe_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise LowrankError(f"recipe '{spec}': no such file or bundled recipe{hint}; bundled: {', '.join(names)}")


def load_recipe(spec: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Load and validate a recipe; None gives the defaults (the ViT/DeiT selection rules, κ = 2). `overrides`
    (`["distill.lr=1e-4", "factorize.kappa=3"]`, see `apply_overrides`) change its keys, validated like the file."""
    if spec is None:
        return Recipe().with_overrides(overrides)
    path = resolve_recipe_path(spec)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowrankError(f"{path}: a recipe must be UTF-8 text (byte {e.start} is not)") from None
    except OSError as e:
        raise LowrankError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LowrankError(f"{path}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LowrankError(f"{path}: a recipe must be a YAML mapping of keys, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    recipe = recipe_from_dict(data, source=str(path))  # the file's own errors name the file alone
    if not overrides:
        return recipe
    return recipe_from_dict(apply_overrides(data, overrides), source=f"{path} with {' '.join(overrides)}")


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (e.g. the one stored in a manifest)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise LowrankError(f"{source}: {_describe(e)}") from None


_EXPONENT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-4: a number, which YAML 1.1 reads as a string
OVERRIDE_FORM = "KEY=VALUE with a dotted recipe key, e.g. distill.lr=1e-4 or factorize.kappa=3"


def parse_override(item: str) -> tuple[list[str], Any, str]:
    """`"distill.lr=1e-4"` → `(["distill", "lr"], 0.0001, "1e-4")`: the dotted key, the value read as YAML (`3`, `true`,
    `null`, `[a, b]`, `{steps: 50}`; `1e-4` a number too) and its text."""
    key, sep, text = str(item).partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not sep or not all(parts):
        raise LowrankError(f"override '{item}': expected {OVERRIDE_FORM}", param="overrides")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise LowrankError(f"override '{item}': '{text}' is not a YAML value (a number, true, false, null, a string, [a, b] or "
                           "{key: value})", param="overrides") from None
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    return parts, value, text.strip()


def _field_kind(model: type[BaseModel], name: str) -> tuple[str, type[BaseModel] | None]:
    """What a recipe key holds: ("section", its schema), ("mapping", None) (free keys: `model_kwargs`), ("list", None),
    ("text", None) (a string alone) or ("value", None)."""
    ann = model.model_fields[name].annotation
    args = get_args(ann) if get_origin(ann) is not None and get_origin(ann) not in (dict, list, Literal) else (ann,)
    section = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if section is not None:
        return "section", section
    origins = {get_origin(a) or a for a in args}
    if dict in origins:
        return "mapping", None
    if list in origins:
        return "list", None
    return ("text", None) if {a for a in args if a is not type(None)} == {str} else ("value", None)


def _unknown_key(item: str, parts: list[str], i: int, model: type[BaseModel]) -> LowrankError:
    accepted = list(model.model_fields)
    close = difflib.get_close_matches(parts[i], accepted, n=len(accepted), cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    where = f"under {'.'.join(parts[:i])}" if i else "at the top level"
    order = close + [k for k in accepted if k not in close]
    return LowrankError(f"override '{item}': unknown recipe key '{'.'.join(parts[:i + 1])}'{hint}; accepted {where}: {', '.join(order)}",
                        param="overrides")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the recipe mapping `data` with each `KEY=VALUE` of `overrides` set, in order (a later one wins).

    Each key is checked against the schema level by level: an unknown key is an error naming the keys accepted at
    its level (the closest first). A key below an optional section that is off (`distill.local`,
    `factorize.embeddings`) turns the section on with its defaults; a list is set whole (`select.exclude=[norm, head]`);
    a key that holds a string alone keeps the text as given (`name=2024`). The values' types are checked by validating
    the result (`recipe_from_dict`)."""
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value, text = parse_override(item)
        node, model = out, Recipe
        for i, part in enumerate(parts):
            if model is None:  # below a free mapping (model_kwargs): any key
                kind, section = "mapping", None
            elif part not in model.model_fields:
                raise _unknown_key(item, parts, i, model)
            else:
                kind, section = _field_kind(model, part)
            if i == len(parts) - 1:
                node[part] = text if kind == "text" and isinstance(value, (int, float)) else value  # bool is an int
                break
            if kind in ("list", "text", "value"):
                key = ".".join(parts[:i + 1])
                what = f"a list: set it whole, e.g. {key}=[...]" if kind == "list" else "a single value, not a section of keys"
                raise LowrankError(f"override '{item}': '{key}' is {what}", param="overrides")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, model = node[part], section
    return out


def _schema_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model


def _describe(error: ValidationError) -> str:
    """One line for all of a ValidationError's problems, with accepted keys and did-you-mean."""
    parts = []
    for err in error.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _schema_for(loc[:-1])
            accepted = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            parts.append(f"unknown key '{key}'{hint}; accepted: {', '.join(accepted)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
            parts.append(f"{key}: {msg}{got_s}")
    return "; ".join(parts)
