"""Benchmark: end-to-end speedup with and without latency-aware layer selection, in one run.

For each model (random weights: time does not depend on values), batch 8, eager PyTorch on
the CPU: the plan of every selected linear at κ = 2 ("all"), and the plan with
`select.latency_aware: true` ("latency-aware": each layer timed dense vs factorized at its
rank and real token count, kept dense unless `latency_margin`× faster). Both plans come from
`pipelines.inspect.inspect_checkpoint`, the same code `lowrank inspect/factorize` run; the structures
are built with random factors. Dense, all and latency-aware models are then timed
interleaved in the same process (`bench.time_interleaved`), after warm-up.

    python tests/benchmarks/bench_latency_aware.py                       # swin + deit, 1 and 2 threads
    python tests/benchmarks/bench_latency_aware.py --models deit --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lowrank_cli.io import Manifest
from lowrank_cli.measure import count_macs, count_params, time_interleaved
from lowrank_cli.models import create_model, get_family
from lowrank_cli.pipelines.inspect import inspect_checkpoint
from lowrank_cli.plan import manifest_layers
from lowrank_cli.recipe import load_recipe, recipe_from_dict

MODELS = {
    # every linear but norm/head/patch_embed, as in the README's bench figures
    "swin": ("swin_base_patch4_window7_224", "swin", {"exclude": ["norm", "head", "patch_embed"], "overrides": []}),
    "deit": ("deit_base_patch16_224", "deit", {}),
}


def recipe_for(name: str, kappa: float, latency: bool, threads: int, batch: int, margin: float):
    _, recipe_name, select = MODELS[name]
    data = load_recipe(recipe_name).with_kappa(kappa).to_dict()
    data["select"] = {**data["select"], **select}
    if latency:
        data["select"].update(latency_aware=True, latency_margin=margin, latency_threads=threads, latency_batch=batch, latency_device="cpu")
    return recipe_from_dict(data, f"{name} latency={latency}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["swin", "deit"], choices=list(MODELS))
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--margin", type=float, default=1.1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    rows = []
    for name in args.models:
        arch = MODELS[name][0]
        for threads in args.threads:
            torch.set_num_threads(threads)
            plain = inspect_checkpoint(None, recipe_for(name, args.kappa, False, threads, args.batch, args.margin), arch)
            t = time.perf_counter()
            aware = inspect_checkpoint(None, recipe_for(name, args.kappa, True, threads, args.batch, args.margin), arch)
            select_s = time.perf_counter() - t
            lat = aware.latency
            torch.manual_seed(0)
            dense = create_model(arch, {}).eval()
            models = {"dense": dense}
            for label, insp in (("all", plain), ("latency-aware", aware)):
                models[label] = Manifest(manifest_layers(insp.layers)).apply(copy.deepcopy(dense)).eval()
            x = torch.randn(args.batch, 3, 224, 224)

            def call(m):
                def run():
                    with torch.inference_mode():
                        return m(x)
                return run

            tm = time_interleaved({k: call(m) for k, m in models.items()}, warmup=2, repeats=args.repeats)
            macs = {k: count_macs(m, get_family("timm").example_inputs(m)).macs for k, m in models.items()}
            params = {k: count_params(m) for k, m in models.items()}
            n_all = sum(p.factorized for p in plain.layers)
            row = {
                "model": arch, "threads": threads, "dense_ms": tm["dense"].median_s * 1e3,
                "all_ms": tm["all"].median_s * 1e3, "aware_ms": tm["latency-aware"].median_s * 1e3,
                "iqr": max(t.iqr_s / t.median_s for t in tm.values()),
                "speedup_all": tm["dense"].median_s / tm["all"].median_s,
                "speedup_aware": tm["dense"].median_s / tm["latency-aware"].median_s,
                "ideal_all": macs["dense"] / macs["all"], "ideal_aware": macs["dense"] / macs["latency-aware"],
                "kept_dense": len(lat["kept_dense"]), "factorized_all": n_all,
                "params_given_up": lat["params_given_up"], "params_saved_all": params["dense"] - params["all"],
                "select_s": select_s, "shapes": lat["shapes_timed"],
            }
            rows.append(row)
            print(f"{arch} {threads} thread(s), batch {args.batch}: dense {row['dense_ms']:.0f} ms, all {row['all_ms']:.0f} ms "
                  f"({row['speedup_all']:.2f}×, ideal {row['ideal_all']:.2f}×), latency-aware {row['aware_ms']:.0f} ms "
                  f"({row['speedup_aware']:.2f}×, ideal {row['ideal_aware']:.2f}×); max IQR {row['iqr']:.0%}; "
                  f"{row['kept_dense']} of {n_all} layers kept dense, {row['params_given_up'] / 1e6:.2f} M params given up "
                  f"(of {row['params_saved_all'] / 1e6:.2f} M saved by all); selection timed {row['shapes']} shapes in {select_s:.0f} s", flush=True)
            groups: dict[tuple, list] = {}
            for n, e in lat["layers"].items():
                groups.setdefault((e["d_in"], e["d_out"], e["rank"], e["rows"]), []).append(e)
            for (d_in, d_out, r, nrows), es in groups.items():
                e = es[0]
                print(f"    {d_in:5d}->{d_out:<5d} r={r:<4d} rows={nrows:<6d} x{len(es):<3d} dense {e['dense_s'] * 1e3:7.2f} ms "
                      f"factorized {e['factorized_s'] * 1e3:7.2f} ms  {e['speedup']:.2f}×{'  kept dense' if e['kept_dense'] else ''}")

    print(f"\n| model | threads | dense | all κ={args.kappa:g} (ideal) | latency-aware (ideal) | layers kept dense | params given up | max IQR |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['model']}` | {r['threads']} | {r['dense_ms']:.0f} ms | {r['all_ms']:.0f} ms, {r['speedup_all']:.2f}× ({r['ideal_all']:.2f}×) "
              f"| {r['aware_ms']:.0f} ms, {r['speedup_aware']:.2f}× ({r['ideal_aware']:.2f}×) | {r['kept_dense']} of {r['factorized_all']} "
              f"| {r['params_given_up'] / 1e6:.2f} M of {r['params_saved_all'] / 1e6:.2f} M saved | {r['iqr']:.0%} |")


if __name__ == "__main__":
    main()
