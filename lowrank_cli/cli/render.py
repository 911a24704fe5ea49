"""Rich tables and progress bars for the pipeline's results. Tables go to stdout; progress and notes to stderr.

Renders plain data (the pipelines' result objects and dicts); imports no pipeline. What depends on a model's
family or task (how to load an export, a task's primary figure) is asked of `models/`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lowrank_cli.models.build import DEFAULT_FAMILY
from lowrank_cli.models.family import get_family

console = Console()
err_console = Console(stderr=True)


def fmt_count(n: int | None, unit: str = "") -> str:
    """1234567 -> '1.23 M' (None -> '—')."""
    if n is None:
        return "—"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n} {unit}".strip()


def ratio(after: int | None, before: int | None) -> str:
    if not before or after is None:
        return "—"
    return f"{after / before:.1%}"


@contextlib.contextmanager
def layer_progress(description: str) -> Iterator[Callable[[int], Callable[[str], None]]]:
    """A Rich progress bar on stderr; yields `start(total) -> advance(layer_name)`."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[layer]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=False,
    )

    def start(total: int) -> Callable[[str], None]:
        task = progress.add_task(description, total=total, layer="")
        return lambda name: progress.update(task, advance=1, layer=name)

    with progress:
        try:
            yield start
        except BaseException:
            progress.live.transient = True  # on an error the bar goes, so that the error is the one line left
            raise


def summary_table(insp: Any, title: str = "Savings") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("after / before", justify="right")
    table.add_row("parameters", fmt_count(insp.params_before), fmt_count(insp.params_after), ratio(insp.params_after, insp.params_before))
    if insp.macs_before is not None:
        per = f"example ({insp.seq_len} tokens)" if getattr(insp, "seq_len", None) else "image"
        table.add_row(f"MACs / {per}", fmt_count(insp.macs_before), fmt_count(insp.macs_after), ratio(insp.macs_after, insp.macs_before))
        table.add_row(f"GFLOPs / {per}", f"{2 * insp.macs_before / 1e9:.2f}", f"{2 * insp.macs_after / 1e9:.2f}", ratio(insp.macs_after, insp.macs_before))
    linears = [p for p in insp.layers if p.kind != "embedding"]
    tables = [p for p in insp.layers if p.kind == "embedding"]
    caption = f"{sum(p.factorized for p in linears)} of {len(linears)} linear layers factorized"
    if tables:
        caption += f", {sum(p.factorized for p in tables)} of {len(tables)} embedding tables"
    table.caption = caption + (f" ({insp.rank_rule})" if insp.rank_rule else "")
    return table


def layers_table(insp: Any, spectrum: bool = False) -> Table:
    """One row per layer of the checkpoint: its tensors, and the factorization decision."""
    plans = {p.name: p for p in insp.layers}
    groups: dict[str, list[dict]] = {}
    for t in insp.tensors:
        layer, _, leaf = t["name"].rpartition(".")
        for suffix in (".down", ".up"):  # a factorized layer's halves group under the layer
            if layer.endswith(suffix) and layer[: -len(suffix)] in plans:
                layer, leaf = layer[: -len(suffix)], suffix[1:] + "." + leaf
        groups.setdefault(layer or leaf, []).append({**t, "leaf": leaf})
    for name in plans:
        groups.setdefault(name, [])

    table = Table(title="Layers", title_justify="left")
    table.add_column("layer", no_wrap=True)
    for col, just in (("tensors", "left"), ("dtype", "left"), ("params", "right"),
                      ("rank", "right"), ("params after", "right"), ("note", "left")):
        table.add_column(col, justify=just)
    if spectrum:
        table.add_column("energy kept", justify="right")
    for layer, tensors in groups.items():
        p = plans.get(layer)
        shapes = ", ".join(f"{t['leaf']} {'×'.join(map(str, t['shape'])) or 'scalar'}" for t in tensors)
        dtypes = ", ".join(sorted({t["dtype"] for t in tensors}))
        params = sum(t["params"] for t in tensors) if tensors else (p.params_before if p else 0)
        if p is None and tensors and all(t.get("buffer") for t in tensors):
            row = [f"[dim]{layer}", shapes, dtypes, "buffer", "", "", "[dim]not a parameter"]
        elif p is None:
            row = [layer, shapes, dtypes, fmt_count(params), "", "", ""]
        elif p.factorized:
            row = [f"[green]{layer}", shapes, dtypes, fmt_count(p.params_before), str(p.rank) if p.rank else "by energy",
                   fmt_count(p.params_after), p.rule or ""]
        else:
            row = [f"[dim]{layer}", shapes, dtypes, fmt_count(params), "dense", fmt_count(p.params_before), f"[dim]{p.reason}"]
        if spectrum:
            row.append("" if p is None or p.energy_kept is None else f"{p.energy_kept:.1%}")
        table.add_row(*row)
    return table


def allocation_table(alloc: dict) -> Table:
    """`rank_rule: budget`: each layer's allocated rank beside the uniform-κ rank at the same budget."""
    uni = alloc.get("uniform_kappa")
    sens = alloc.get("allocation") == "sensitivity"
    rule = f"κ = {alloc['kappa']:g}'s parameters, {alloc['fraction']:.4g}" if alloc.get("kappa") is not None else f"target_{alloc['target']} = {alloc['fraction']:g}"
    weighted = " × √(c / d_out), by sensitivity" if sens else ""
    table = Table(title=f"{'Sensitivity' if sens else 'Budget'} allocation vs uniform κ ({rule}, σ of {alloc['spectrum']}{weighted})", title_justify="left")
    for col, just in (("layer", "left"), ("budget rank", "right"), ("uniform-κ rank", "right"),
                      ("error budget", "right"), ("error uniform", "right")) + ((("sensitivity c", "right"),) if sens else ()):
        table.add_column(col, justify=just, no_wrap=col == "layer")

    def err(dropped, energy):
        return "—" if dropped is None else f"{(dropped / energy) ** 0.5:.3f}" if energy > 0 else "0"

    for layer in alloc["layers"]:
        table.add_row(
            layer["name"], "dense" if layer["rank"] is None else str(layer["rank"]),
            "—" if uni is None else "dense" if layer["uniform_rank"] is None else str(layer["uniform_rank"]),
            err(layer["dropped"], layer["energy"]), err(layer["uniform_dropped"], layer["energy"]),
            *((f"{layer['sensitivity']:.3g}" if layer.get("sensitivity") is not None else "—",) if sens else ()),
        )
    b = alloc["budget"]
    total = f"budget: {b['fraction']:.3f} of the selected layers' {alloc['target']}, Σ dropped σ² = {b['dropped']:.4g} (relative {b['relative_error']:.3g})"
    if uni is not None:
        total += f"; uniform κ = {uni['kappa']:.3f}: {uni['fraction']:.3f}, Σ dropped σ² = {uni['dropped']:.4g} (relative {uni['relative_error']:.3g})"
    table.caption = total + ". error = √(dropped σ² / Σσ²) per layer"
    return table


def latency_table(lat: dict) -> Table:
    """`select.latency_aware`: the layers kept dense because factorized was not faster by the margin, with their times."""
    table = Table(
        title=f"Latency-aware selection: kept dense ({lat['runtime']} on {lat['device']}, batch {lat['batch']}, "
              f"{lat['threads']} threads, margin {lat['margin']:.2f}×)",
        title_justify="left",
    )
    for col in ("layer", "d_in→d_out", "rank", "rows", "dense", "factorized", "speedup", "params given up"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=col == "layer")
    for name in lat["kept_dense"]:
        e = lat["layers"][name]
        table.add_row(name, f"{e['d_in']}→{e['d_out']}", str(e["rank"]), str(e["rows"]), _ms(e["dense_s"]), _ms(e["factorized_s"]),
                      f"{e['speedup']:.2f}×", fmt_count(e["params_given_up"]))
    table.caption = (f"{len(lat['kept_dense'])} of {len(lat['layers'])} timed layers kept dense ({lat['shapes_timed']} shapes timed); "
                     f"parameters given up: {fmt_count(lat['params_given_up'])}, MACs / image given up: {fmt_count(lat['macs_given_up'])}")
    return table


def print_notes(notes: list[str]) -> None:
    for note in notes:
        console.print(f"[dim]note: {note}[/]")


def print_inspection(insp: Any, spectrum: bool = False) -> None:
    head = insp.checkpoint or "(random weights)"
    arch = f" — {insp.architecture}" if insp.architecture else " — weight-only (no architecture; --model gives MACs)"
    kind = " — factorized checkpoint" if insp.factorized_checkpoint else ""
    console.print(f"[bold]{head}[/]{arch}{kind}")
    print_notes(insp.notes)
    console.print(layers_table(insp, spectrum))
    if insp.allocation is not None:
        console.print(allocation_table(insp.allocation))
    if insp.latency is not None:
        console.print(latency_table(insp.latency))
    console.print(summary_table(insp))


def _fmt_bytes(n: int) -> str:
    for div, unit in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def export_table(result) -> Table:
    """`lowrank export`'s report: sizes, parameters, MACs and what was verified."""
    table = Table(title=f"Exported {result.format} → {result.out}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("file size before → after", f"{_fmt_bytes(result.bytes_before)} → {_fmt_bytes(result.bytes_after)} ({ratio(result.bytes_after, result.bytes_before)})")
    table.add_row("parameters", fmt_count(result.params))
    table.add_row("MACs / example", fmt_count(result.macs))
    table.add_row("dtype", result.dtype)
    table.add_row("factorized layers", str(result.factorized_layers))
    if result.onnx_ops:
        table.add_row("ONNX MatMul / Gemm nodes", f"{result.onnx_ops['MatMul']} / {result.onnx_ops['Gemm']} ({result.onnx_ops['nodes']} nodes)")
    if len(result.weight_files) > 1:
        table.add_row("weight files", f"{len(result.weight_files)} shards and model.safetensors.index.json")
    v = result.verification or {}
    if "relative_diff" in v:
        batches = f", batches {v['batches']}" if "batches" in v else ""
        top1 = f", top-1 agreement {100 * v['top1_agreement']:.1f} % (≥ {100 * v['min_top1_agreement']:g} % needed)" if v.get("min_top1_agreement") else ""
        table.add_row("verified", f"{v['check']}: max abs diff {v['max_abs_diff']:.2e} = {v['relative_diff']:.2e} of max |y| "
                                  f"{v['scale']:.3g} (tolerance {v['tolerance']:g}{batches}){top1}")
    elif "max_abs_diff" in v:
        table.add_row("verified", f"{v['check']}: max abs diff {v['max_abs_diff']:.2e}")
    elif v:
        table.add_row("verified", f"{v['check']}: dtypes {', '.join(v['dtypes'])}, manifest kept: {v['manifest_kept']}")
    for extra in result.extra_files:
        table.add_row("external data", extra)
    if result.format == "dense" and result.architecture:
        table.caption = get_family(result.family or DEFAULT_FAMILY).load_instructions(result.architecture, result.out, result.model_kwargs)
    elif getattr(result, "usage", None):
        table.caption = result.usage
    return table


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def bench_tables(result) -> list[Table]:
    """`lowrank bench`'s report: latency of both models and the speedup against the MAC ideal; per layer on request."""
    shape = f"batch {result.batch} × {result.seq_len} tokens" if getattr(result, "seq_len", None) else f"batch {result.batch}"
    runtime = f"{result.runtime} ({', '.join(result.providers)})" if result.providers else result.runtime
    table = Table(title=f"{runtime} on {result.device}, {shape}, {result.threads} threads", title_justify="left")
    for col, just in (("", "left"), ("median", "right"), ("IQR", "right"), ("min", "right"), ("MACs / example", "right"), ("params", "right")):
        table.add_column(col, justify=just)
    for label, t, macs, params in (("dense: " + result.baseline, result.dense, result.macs_dense, result.params_dense),
                                   ("factorized", result.factorized, result.macs_factorized, result.params_factorized)):
        table.add_row(label, _ms(t.median_s), _ms(t.iqr_s), _ms(t.min_s), fmt_count(macs), fmt_count(params))
    table.caption = (f"speedup {result.speedup:.2f}× measured vs {result.ideal_speedup:.2f}× ideal (MAC ratio): "
                     f"efficiency {result.efficiency:.0%} ({result.factorized.runs} interleaved runs each)")
    tables = [table]
    if result.layers:
        lt = Table(title="Per layer: dense vs factorized", title_justify="left")
        for col in ("layer", "d_in→d_out", "rank", "rows", "dense", "factorized", "speedup", "ideal"):
            lt.add_column(col, justify="left" if col == "layer" else "right")
        for l in result.layers:
            style = "red" if l.slower else ""
            lt.add_row(l.name, f"{l.d_in}→{l.d_out}", str(l.rank), str(l.batch * l.tokens), _ms(l.dense_s), _ms(l.factorized_s),
                       f"[{style}]{l.speedup:.2f}×[/]" if style else f"{l.speedup:.2f}×", f"{l.ideal_speedup:.2f}×")
        slower = sum(l.slower for l in result.layers)
        lt.caption = f"{slower} of {len(result.layers)} factorized layers slower than dense (red)"
        tables.append(lt)
    for note in result.notes:
        tables.append(Table(title=f"note: {note}", title_justify="left", show_header=False))
    return tables


def generation_tables(result) -> list[Table]:
    """`lowrank bench --generate`'s report: prefill, first token and decode of both models per batch size, the speedups
    against their ideals (decode: weight bytes per token; prefill: MACs), and the memory generation adds."""
    compiled = ", torch.compile" if result.compiled else ""
    table = Table(title=f"Generation: {result.runtime}{compiled} on {result.device}, {result.threads} threads, {result.prompt_len}-token prompts, "
                        f"{result.new_tokens} new tokens (greedy, KV cache)", title_justify="left")
    for col in ("batch", "model", "prefill tok/s", "first token", "decode tok/s", "decode step"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in result.rows:
        for label, t in (("dense", row.dense), ("factorized", row.factorized)):
            table.add_row(str(row.batch), label, f"{t.prefill_tokens_per_s:,.0f}", _ms(t.ttft.median_s), f"{t.decode_tokens_per_s:,.1f}",
                          _ms(t.decode.median_s))
        table.add_row("", "[bold]speedup[/]", f"{row.speedup('prefill'):.2f}× ({result.efficiency(row, 'prefill'):.0%})",
                      f"{row.speedup('ttft'):.2f}×", f"{row.speedup('decode'):.2f}× ({result.efficiency(row, 'decode'):.0%})", "", end_section=True)
    table.caption = (f"ideal: decode {result.ideal_decode_speedup:.2f}× (weight bytes per token {fmt_count(result.bytes_per_token_dense, 'B')} → "
                     f"{fmt_count(result.bytes_per_token_factorized, 'B')}), prefill {result.ideal_prefill_speedup:.2f}× (MACs); "
                     f"(efficiency = measured / ideal); medians of {result.rows[0].dense.decode.runs} interleaved runs")
    tables = [table]
    if result.memory:
        mt = Table(title=f"Memory a fresh process adds to load and generate (batch {result.rows[-1].batch})", title_justify="left")
        for col in ("model", "after imports", "peak", "added", "weights", "KV cache", "added / (weights + KV)"):
            mt.add_column(col, justify="left" if col == "model" else "right")
        for name, m in result.memory.items():
            mt.add_row(name, *(fmt_count(v, "B") for v in (m.after_imports, m.peak, m.added, m.weights, m.kv_cache)), f"{m.ratio:.2f}")
        tables.append(mt)
    for note in result.notes:
        tables.append(Table(title=f"note: {note}", title_justify="left", show_header=False))
    return tables
