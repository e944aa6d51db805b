"""Activation-patching sweep: mechscope's ``patch_sweep`` against its two naive baselines.

The sweep of issue #3: ``resid_pre`` over every layer x position of ``smollm2-135m`` for an IOI
prompt pair, denoising, metric = logit difference. Three ways to get the same grid:

1. **per cell**: one full forward per (layer, position), a plain ``model.hooks`` replacement;
2. **per layer**: one full forward per layer, the batch axis carrying that layer's positions;
3. **patch_sweep**: variants on the batch axis, each forward starting at its lowest patched layer
   from the cached base residual, only the last position unembedded.

All three include their clean/corrupted/source runs. They run alternately in one process (the
order rotates every repeat), one CPU thread; ratios are of median wall times. The grids must agree
(max abs difference printed).

Usage: .venv/bin/python benchmarks/bench_patching.py [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _timing import machine

import mechscope as ms
from mechscope.interventions import metrics
from mechscope.interventions.patching import patch_sweep

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def per_cell(model, metric) -> torch.Tensor:
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    _, src = model.run_with_cache(CLEAN, names)
    metric(model(CLEAN)), metric(model(CORRUPT))
    n_pos = src[names[0]].shape[1]
    out = torch.empty(len(names), n_pos)
    for layer, name in enumerate(names):
        for p in range(n_pos):

            def fn(x, hook, name=name, p=p):
                y = x.clone()
                y[:, p] = src[name][:, p]
                return y

            with model.hooks({name: fn}):
                out[layer, p] = metric(model(CORRUPT)).mean()
    return out


def per_layer(model, metric) -> torch.Tensor:
    names = [f"blocks.{i}.hook_resid_pre" for i in range(model.cfg.n_layers)]
    _, src = model.run_with_cache(CLEAN, names)
    metric(model(CLEAN)), metric(model(CORRUPT))
    ids = model.to_tokens(CORRUPT)
    n_pos = ids.shape[1]
    out = torch.empty(len(names), n_pos)
    for layer, name in enumerate(names):

        def fn(x, hook, name=name):
            y = x.clone()
            y[torch.arange(n_pos), torch.arange(n_pos)] = src[name][0]
            return y

        with model.hooks({name: fn}):
            out[layer] = metric(model(ids.repeat(n_pos, 1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ms.load_model(args.model)
    metric = metrics.logit_diff(model.to_single_token(" Mary"), model.to_single_token(" John"))
    ways = {
        "per_cell": lambda: per_cell(model, metric),
        "per_layer": lambda: per_layer(model, metric),
        "patch_sweep": lambda: patch_sweep(model, CLEAN, CORRUPT, metric, "resid_pre").values,
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    grids: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for r in range(args.repeats):
            order = list(ways)[r % 3 :] + list(ways)[: r % 3]
            for key in order:
                t0 = time.perf_counter()
                grids[key] = ways[key]()
                times[key].append(time.perf_counter() - t0)
                print(f"repeat {r} {key:12s} {times[key][-1]:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = {k: float((grids[k] - grids["per_cell"]).abs().max()) for k in ways}
    result = {
        "machine": machine(),
        "grid": list(grids["per_cell"].shape),
        "median_s": med,
        "patch_sweep_speedup_vs_per_cell": med["per_cell"] / med["patch_sweep"],
        "patch_sweep_speedup_vs_per_layer": med["per_layer"] / med["patch_sweep"],
        "per_layer_over_per_cell": med["per_layer"] / med["per_cell"],
        "max_abs_diff_vs_per_cell": diff,
        "times_s": times,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
