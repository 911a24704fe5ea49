"""The compression matrix (issue 17): family × factorization method × rank rule × distillation × embeddings × export
format × checkpoint dtype × export dtype × processes, each cell run through the command line and its numbers checked.

`all_pairs` picks a few dozen cells that hold every pair of values (tests/test_matrix.py); `product` is the whole
matrix (tests/benchmarks/bench_matrix.py). A cell is one of:

- `ok`: it must work. `factorize` (no distillation) or `compress` (PELA or PC-LoRA, 2 steps; `--nproc 2` on the CPU
  over gloo), then `export`; checked: the plan's ranks against the rank rule (recomputed here from the layer shapes
  and, for energy, from the teacher's spectrum), the strict reload of the factorized file and of the export, the
  dtype of every tensor written, and the export's outputs against the factorized model's relative to their scale
  (fp32: max|Δ| ≤ 5e-4·max|y|; bf16/fp16: ≤ 3e-2·max|y| and top-1 agreement ≥ 99 % at the positions whose fp32
  top-2 margin is at least the dtype's resolution at the output's scale, at least half of them);
- refused: a combination that cannot work. The command that is given it must stop with one `error:` line holding
  the expected words, exit status 1, and write nothing;
- skipped: a combination that means nothing (no distillation on two processes; embedding tables of an image model).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

FACTORS: dict[str, tuple[str, ...]] = {
    "family": ("llama", "gpt2", "bert", "hf-vit", "deit", "swin"),
    "method": ("svd", "whitened", "asvd"),
    "rule": ("kappa", "rank", "energy", "budget"),
    "distill": ("none", "pela", "pclora"),
    "embeddings": ("dense", "factorized"),
    "export": ("dense", "onnx", "safetensors"),
    "ckpt_dtype": ("fp32", "bf16"),
    "export_dtype": ("fp32", "bf16", "fp16"),
    "nproc": ("1", "2"),
}
TEXT = ("llama", "gpt2", "bert")
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
HEADER_DTYPE = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
RULES = {"kappa": {"kappa": 2.0}, "rank": {"rank": 4}, "energy": {"energy": 0.9}, "budget": {"target_params": 0.5}}
EXCLUDE = {"llama": ["lm_head"], "gpt2": ["lm_head"], "bert": ["pooler", "classifier"], "hf-vit": ["pooler", "classifier"],
           "deit": ["norm", "head", "patch_embed"], "swin": ["norm", "head", "patch_embed", "downsample"]}


@dataclass(frozen=True)
class Verdict:
    kind: str  # "ok", "refused" or "skip"
    why: str = ""
    command: str = ""  # the command that refuses: "compress" (`factorize` where nothing is distilled) or "export"
    needles: tuple[str, ...] = ()


def _refusals(c: dict[str, str]) -> list[Verdict]:
    """The reasons a cell must be refused, in the order the commands check them (the recipe's rank rule before its method)."""
    out = []
    if c["distill"] == "pclora" and c["rule"] in ("energy", "budget"):
        out.append(Verdict("refused", "PC-LoRA's ranks come from κ or a fixed rank", "compress",
                           ("distill.method 'pclora' takes its adapter ranks from factorize.rank_rule 'kappa' or 'rank'",)))
    if c["distill"] == "pclora" and c["method"] != "svd":
        out.append(Verdict("refused", "PC-LoRA initialises its own adapters", "compress", ("distill.method 'pclora'", "set factorize.method to 'svd'")))
    if c["method"] == "asvd" and c["family"] in ("llama", "gpt2") and c["rule"] in ("kappa", "rank"):
        out.append(Verdict("refused", "ASVD at one rank rule ruins causal LMs", "compress",
                           ("factorize.method 'asvd' with factorize.allocation 'uniform'", "factorize.method 'whitened'")))
    if c["export"] == "onnx" and c["export_dtype"] != "fp32":
        out.append(Verdict("refused", "ONNX exports are float32", "export",
                           (f"--dtype {TORCH_DTYPE[c['export_dtype']]} is not supported for the onnx format", "accepted: float32")))
    return out


def verdict(c: dict[str, str]) -> Verdict:
    """What a cell must do: work, be refused by one command with one line (the first refusal, when there are
    several), or be left out as meaningless."""
    if c["nproc"] == "2" and c["distill"] == "none":
        return Verdict("skip", "factorize runs in one process: --nproc is compress's")
    if c["embeddings"] == "factorized" and c["family"] not in TEXT:
        return Verdict("skip", "an image model has no embedding table to factorize")
    refusals = _refusals(c)
    return refusals[0] if refusals else Verdict("ok")


def product() -> list[dict[str, str]]:
    """Every cell of the matrix, in a fixed order."""
    return [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]


def _pair_ids(cells: list[dict[str, str]]) -> tuple[np.ndarray, int]:
    """Each cell's pairs of (factor, value) as integer ids: a (cells × pairs-per-cell) array, and the number of ids."""
    names = list(FACTORS)
    offsets, n = {}, 0
    for f in names:
        offsets[f] = n
        n += len(FACTORS[f])
    value_id = [[offsets[f] + FACTORS[f].index(c[f]) for f in names] for c in cells]
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    ids = np.array([[row[i] * n + row[j] for i, j in pairs] for row in value_id], dtype=np.int64).reshape(len(cells), len(pairs))
    return ids, n * n


def _greedy_cover(ids: np.ndarray, uncovered: np.ndarray) -> list[int]:
    """Rows of `ids` chosen greedily (the first row covering the most uncovered pairs, until none is left); marks `uncovered`."""
    chosen = []
    while True:
        gain = uncovered[ids].sum(axis=1)  # a cell's pairs are distinct: one count each
        best = int(gain.argmax())
        if gain[best] == 0:
            return chosen
        chosen.append(best)
        uncovered[ids[best]] = False


def all_pairs() -> list[dict[str, str]]:
    """A few dozen cells holding every pair of values that some cell holds: first every pair that a working cell can
    hold, from working cells; then the pairs that only a refused cell holds (ONNX in fp16), from cells refused for
    that one reason.
    Deterministic (greedy, first best in product order); skipped combinations hold no pair."""
    cells = product()
    kinds = [verdict(c).kind for c in cells]
    ids, n = _pair_ids(cells)
    ok = np.array([k == "ok" for k in kinds])
    refused = np.array([len(_refusals(c)) == 1 and k == "refused" for c, k in zip(cells, kinds)])  # for one reason only
    uncovered = np.zeros(n, dtype=bool)
    uncovered[ids[ok].ravel()] = True
    ok_rows = np.flatnonzero(ok)
    picked = [int(ok_rows[i]) for i in _greedy_cover(ids[ok], uncovered)]
    uncovered[ids[refused].ravel()] = True
    uncovered[ids[picked].ravel()] = False
    uncovered[ids[ok].ravel()] = False  # pairs a working cell could hold are covered by working cells above
    refused_rows = np.flatnonzero(refused)
    picked += [int(refused_rows[i]) for i in _greedy_cover(ids[refused], uncovered)]
    return [cells[i] for i in picked]


def cell_id(c: dict[str, str]) -> str:
    emb = "+emb" if c["embeddings"] == "factorized" else ""
    return (f"{c['family']}-{c['ckpt_dtype']}-{c['method']}-{c['rule']}-{c['distill']}{emb}-np{c['nproc']}"
            f"-{c['export']}-{c['export_dtype']}")


# ---- running a cell --------------------------------------------------------------------------------------------


def recipe_for(c: dict[str, str]) -> dict[str, Any]:
    """The cell's recipe: the family's selection, the rule and method, tiny calibration and 2 training steps."""
    text = c["family"] in TEXT
    source = "pydoc" if text else "digits"
    factorize: dict[str, Any] = {"rank_rule": c["rule"], **RULES[c["rule"]], "method": c["method"]}
    if c["method"] != "svd":
        factorize.update(calib_data=source, calib_samples=16, calib_batch_size=8)
    if c["embeddings"] == "factorized":
        factorize["embeddings"] = {"kappa": 2.0}
    distill: dict[str, Any] = {"epochs": 1, "max_steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_epochs": 0, "log_every": 1,
                               "eval_examples": 8, "amp": "none"}
    if c["distill"] == "pclora":
        distill.update(method="pclora", pclora={"init": "svd"})
    data: dict[str, Any] = {"source": source, "num_workers": 0}
    if text:
        data["max_length"] = 16
    return {"name": f"matrix-{c['family']}", "select": {"exclude": EXCLUDE[c["family"]]}, "factorize": factorize, "data": data, "distill": distill}


@dataclass
class CellResult:
    cell: dict[str, str]
    status: str  # passed, failed, refused, skipped
    seconds: float = 0.0
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


def cli_in_process(*args: Any) -> tuple[int, str, str]:
    """`lowrank ARGS...` in this process, as the console script runs it: (exit status, stdout, stderr)."""
    from lowrank_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


def cli_subprocess(*args: Any) -> tuple[int, str, str]:
    """`python -m lowrank_cli ARGS...` in a new process (what `--nproc 2` relaunches under torchrun)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def _one_line(code: int, err: str, needles: tuple[str, ...]) -> None:
    lines = err.strip().splitlines()
    assert code == 1, f"exit status {code}, not 1: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def run_cell(c: dict[str, str], checkpoint: Callable[[str, str], Path], work: Path, cli: Callable[..., tuple[int, str, str]] = cli_in_process) -> CellResult:
    """Run one cell under `work` (an empty folder) on `checkpoint(family, dtype)`; raises AssertionError when a check fails."""
    v = verdict(c)
    if v.kind == "skip":
        return CellResult(c, "skipped", detail=v.why)
    start = time.perf_counter()
    source = checkpoint(c["family"], c["ckpt_dtype"])
    recipe = work / "recipe.json"  # JSON is YAML
    recipe.write_text(json.dumps(recipe_for(c)))
    before = sorted(p.name for p in work.iterdir())
    factorized_out = work / "factorized"
    if c["distill"] == "none":
        code, out, err = cli("factorize", source, "--recipe", recipe, "--out", factorized_out, "--device", "cpu", "--json")
        factorized = factorized_out
    else:
        launcher = cli_subprocess if c["nproc"] == "2" else cli
        code, out, err = launcher("compress", source, "--recipe", recipe, "--out", factorized_out, "--device", "cpu",
                                  "--nproc", c["nproc"], "--json")
        factorized = factorized_out / "student.safetensors"
    if v.kind == "refused" and v.command == "compress":  # `factorize` where nothing is distilled
        _one_line(code, err, v.needles)
        assert sorted(p.name for p in work.iterdir()) == before, "a refused factorize or compress wrote something"
        return CellResult(c, "refused", time.perf_counter() - start, err.strip())
    assert code == 0, f"{'factorize' if c['distill'] == 'none' else 'compress'} failed ({code}): {err[-3000:]}"
    if c["distill"] != "none":  # trained by as many processes as asked, each to the same weights
        report = json.loads((factorized_out / "report.json").read_text())
        assert report.get("world_size", 1) == int(c["nproc"]) and report["method"] == c["distill"], (report.get("world_size"), report["method"])
        assert len(set(report.get("rank_weight_sha256") or [None])) == 1, report.get("rank_weight_sha256")
        assert report["train"]["steps"] == 2, report["train"]
    figures: dict[str, Any] = {}
    check_plan(c, source, factorized, figures)
    kv_cache = c["export"] == "onnx" and c["family"] in ("llama", "gpt2")  # a causal LM's ONNX export: a folder with its KV cache
    exported = work / ("export-onnx" if kv_cache else "export.onnx" if c["export"] == "onnx" else "export.safetensors"
                       if c["export"] == "safetensors" or c["family"] in ("deit", "swin") else "export")
    listing = sorted(p.name for p in work.iterdir())
    code, out, err = cli("export", factorized, "--format", c["export"], "--out", exported, "--dtype", TORCH_DTYPE[c["export_dtype"]], "--json")
    if v.kind == "refused":
        _one_line(code, err, v.needles)
        assert sorted(p.name for p in work.iterdir()) == listing, "a refused export wrote something"
        return CellResult(c, "refused", time.perf_counter() - start, err.strip())
    assert code == 0, f"export failed ({code}): {err[-3000:]}"
    check_export(c, factorized, exported, figures)
    return CellResult(c, "passed", time.perf_counter() - start, figures=figures)


# ---- the checks ------------------------------------------------------------------------------------------------


def _teacher_weight(teacher: torch.nn.Module, name: str) -> torch.Tensor:
    w = teacher.get_submodule(name).weight.detach().float()
    return w


def check_plan(c: dict[str, str], source: Path, factorized: Path, figures: dict[str, Any]) -> None:
    """Every rank in the factorized file's manifest is the rule's, recomputed here; the file reloads strictly (every
    planned layer a low-rank module)."""
    from lowrank_cli.decompose.ranks import rank_for_energy, rank_for_kappa, shrinks
    from lowrank_cli.io.manifest import Manifest
    from lowrank_cli.io.safetensors import read_header
    from lowrank_cli.models import build_model, load
    from lowrank_cli.nn.lowrank import LowRankLinear

    manifest = Manifest.from_header(read_header(factorized))
    assert manifest is not None and manifest.layers, "no factorized layer"
    linears = {k: e for k, e in manifest.layers.items() if e.kind != "embedding"}
    tables = {k: e for k, e in manifest.layers.items() if e.kind == "embedding"}
    assert linears, "no factorized linear"
    if c["embeddings"] == "factorized" and c["family"] == "bert":  # llama's and GPT-2's tables are tied to their heads: dense
        assert tables, "factorize.embeddings given, and no table factorized"
        for name, e in tables.items():
            assert e.rank == rank_for_kappa(e.d_in, e.d_out, 2.0), (name, e.rank)
    else:
        assert not tables, sorted(tables)
    rule = c["rule"]
    if rule == "kappa":
        bad = {k: e.rank for k, e in linears.items() if e.rank != rank_for_kappa(e.d_in, e.d_out, 2.0)}
    elif rule == "rank":
        bad = {k: e.rank for k, e in linears.items() if e.rank != min(4, e.d_in, e.d_out)}
    elif rule == "energy" and c["method"] == "svd":
        teacher = build_model(source).model
        bad = {k: e.rank for k, e in linears.items()
               if e.rank != rank_for_energy(torch.linalg.svdvals(_teacher_weight(teacher, k)), 0.9)}
    elif rule == "energy":  # the spectrum of the whitened or scaled weight: a rank the matrix has
        bad = {k: e.rank for k, e in linears.items() if not 1 <= e.rank <= min(e.d_in, e.d_out)}
    else:  # budget: every factorized layer shrinks, and together they keep at most half their dense parameters
        bad = {k: e.rank for k, e in linears.items() if not shrinks(e.d_in, e.d_out, e.rank)}
        kept = sum(e.rank * (e.d_in + e.d_out) for e in linears.values())
        dense = sum(e.d_in * e.d_out for e in linears.values())
        biases = sum(e.d_out for e in linears.values() if e.bias)
        assert kept <= 0.5 * dense + biases, (kept, dense)
        figures["budget_kept"] = round(kept / dense, 3)
    assert not bad, f"ranks not the rule's ({rule}): {bad}"
    expected_rule = {"kappa": "kappa=2", "rank": "rank=4", "energy": "energy=0.9", "budget": "budget_params=0.5"}[rule]
    assert {e.rule for e in linears.values()} == {expected_rule}, {e.rule for e in linears.values()}
    method = "pclora" if c["distill"] == "pclora" else c["method"]
    assert {e.method for e in linears.values()} == {method}, {e.method for e in linears.values()}
    model = load(factorized)  # strict: a missing or unexpected tensor is an error
    n_low = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert n_low == len(linears), (n_low, len(linears))
    figures["ranks"] = sorted({e.rank for e in linears.values()})


def _inputs(family, model, seed: int = 1):
    """Random inputs with enough outputs for "99 % of the top-1s" to allow a flip: 128 images, or 8 × 32 tokens.
    (Random weights give near-tied logits, which any rounding may reorder: one flip in 48 positions is 97.9 %.)"""
    limit = family.max_positions(model)
    g = torch.Generator().manual_seed(seed)
    if limit is None:
        return family.example_inputs(model, 128, generator=g)
    return family.example_inputs(model, 8, generator=g, seq_len=min(32, limit))


RESOLUTION = {"bf16": 2.0**-7, "fp16": 2.0**-10}  # one unit in the last place at the output's scale, relative


def _compare(got: torch.Tensor, want: torch.Tensor, export_dtype: str) -> dict[str, float]:
    """max|Δ| relative to max|y|, and for a 16-bit export the top-1 agreement at the positions the fp32 outputs decide
    by at least the dtype's resolution at their scale: a top-2 margin below one unit in the last place is decided by
    rounding, not by the export (a tiny random LM has such near-ties; a real 135 M one had 77 of 4 096). At least half
    the positions must be decided, so that the check is never vacuous."""
    got, want = got.float(), want.float()
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max()
    rel = ((got - want).abs().max() / scale).item()
    figures = {"relative_diff": rel, "top1": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}
    low = export_dtype != "fp32"
    tol = 3e-2 if low else 5e-4
    assert rel <= tol, f"max|Δ| = {rel:.3g}·max|y|, above {tol:g}"
    if low:
        top2 = want.topk(2, dim=-1).values
        decided = (top2[..., 0] - top2[..., 1]) >= RESOLUTION[export_dtype] * scale
        share = decided.float().mean().item()
        assert share >= 0.5, f"only {100 * share:.0f} % of the positions decided by more than {export_dtype}'s resolution"
        top1 = (got.argmax(-1) == want.argmax(-1))[decided].float().mean().item()
        figures.update(top1_decided=top1, decided=share)
        assert top1 >= 0.99, f"top-1 agreement {100 * top1:.1f} % < 99 % on the {100 * share:.0f} % of positions decided"
    return figures


@torch.no_grad()
def check_export(c: dict[str, str], factorized: Path, exported: Path, figures: dict[str, Any]) -> None:
    """The export reloads strictly in its library, holds tensors of the asked dtype only, and matches the factorized
    model's outputs relative to their scale."""
    from lowrank_cli.io.safetensors import read_header
    from lowrank_cli.models import build_model, load

    built = build_model(factorized)
    family, reference = built.family, built.model.float().eval()
    x = _inputs(family, reference)
    want = family.forward(reference, x)
    if c["export"] == "onnx":
        import onnx
        import onnxruntime as ort

        from lowrank_cli.export.onnx_cache import OrtDecoder

        proto = onnx.load(str(exported / "model.onnx" if exported.is_dir() else exported))  # a causal LM's folder (KV cache)
        types = {onnx.TensorProto.DataType.Name(t.data_type) for t in proto.graph.initializer}
        assert types <= {"FLOAT", "INT64", "INT32", "BOOL"}, types
        if exported.is_dir():  # the prompt's logits, with an empty past
            got = torch.from_numpy(OrtDecoder.from_path(exported).forward(x["input_ids"], x["attention_mask"])[0])
        else:
            session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
            feeds = x if isinstance(x, dict) else {session.get_inputs()[0].name: x}
            got = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in feeds.items()})[0])
    else:
        dtypes = {t.dtype for t in read_header(exported).tensors.values() if t.dtype in ("F32", "F16", "BF16", "F64")}
        assert dtypes == {HEADER_DTYPE[c["export_dtype"]]}, f"written {dtypes}, asked {c['export_dtype']}"
        if c["export"] == "safetensors":
            model = load(exported)  # the cast factorized file, strict
        elif exported.is_dir():  # a Hub folder: transformers' own loader, strict
            import transformers

            config = json.loads((exported / "config.json").read_text())
            assert (config.get("dtype") or config.get("torch_dtype")) == TORCH_DTYPE[c["export_dtype"]], config.get("dtype")
            cls = getattr(transformers, config["architectures"][0])
            model, info = cls.from_pretrained(str(exported), dtype="auto", output_loading_info=True)
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            assert {p.dtype for p in model.parameters()} == {getattr(torch, TORCH_DTYPE[c["export_dtype"]])}  # loaded as written
        else:  # a timm state dict: timm's model, strict
            import timm
            from safetensors.torch import load_file

            from lowrank_cli.io.manifest import Manifest

            m = Manifest.from_header(read_header(factorized))
            model = timm.create_model(m.architecture, pretrained=False, **m.model_kwargs)
            model.load_state_dict(load_file(str(exported)), strict=True)
        got = family.forward(model.float().eval(), x)
    figures.update(_compare(got, want, c["export_dtype"]))
