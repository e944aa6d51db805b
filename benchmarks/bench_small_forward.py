"""Where bench_core's (a) and (b) spend their time above plain transformers at batch 1 x 32.

1. **attach / detach in context**: ``with model.hooks(...)`` for (a)'s 333 and (b)'s 150 names, timed
   right after a forward (as in a user's loop: the forward has just streamed ~540 MB of weights
   through the CPU caches, so every Python object the hooks touch is cold) and, for contrast, in a
   tight loop (warm caches). Medians over the repeats, milliseconds.
2. **(b)'s forward, part by part**: a forward while hooks are registered (added before each timed
   forward and removed after it, untimed) on (b)'s 150 points that keep their tensors, on the same
   points doing nothing, on the 30 patterns only (the eager attention path) and on the other 120
   only, against a plain forward; the five run round-robin (the order rotates every repeat). Medians,
   milliseconds above plain.
3. **holding the cached tensors**: plain transformers with PyTorch forward hooks on (b)'s modules
   (each decoder layer, attention output and MLP: 91 hooks, registered before the timing) that keep
   every output alive until the call ends, against the same hooks keeping nothing
   (``_timing.compare``: interleaved, ratio of medians). What any tool pays for holding (b)'s
   tensors: held memory cannot be reused by the next layer, so its writes go to cold memory.

One CPU thread, smollm2-135m. Usage: .venv/bin/python benchmarks/bench_small_forward.py [--repeats 60]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
from _timing import compare, describe, machine
from bench_core import cached_b, noop, not_attn_internal, tokens

import mechscope as ms
from mechscope.models.adapters.base import get_module


def attach_detach(model: ms.HookedModel, names: list[str], x: torch.Tensor, repeats: int) -> dict:
    cold_enter, cold_exit, warm = [], [], []
    spec = [(n, noop) for n in names]
    for _ in range(repeats):
        model.hf_model(input_ids=x, use_cache=False)
        t0 = time.perf_counter()
        ctx = model.hooks(spec)
        ctx.__enter__()
        t1 = time.perf_counter()
        model(x)
        t2 = time.perf_counter()
        ctx.__exit__(None, None, None)
        t3 = time.perf_counter()
        cold_enter.append(t1 - t0)
        cold_exit.append(t3 - t2)
    for _ in range(repeats):
        t0 = time.perf_counter()
        with model.hooks(spec):
            pass
        warm.append(time.perf_counter() - t0)
    return {
        "hooks": len(names),
        "enter_ms": _median_ms(cold_enter),
        "exit_ms": _median_ms(cold_exit),
        "warm_both_ms": _median_ms(warm),
    }


def _median_ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1e3, 3)


def parts(model: ms.HookedModel, x: torch.Tensor, repeats: int) -> dict:
    names = [n for n in model.hook_names if cached_b(n)]
    patterns = [n for n in names if n.endswith("attn.hook_pattern")]
    store: dict = {}

    def keep(t, hook):
        store[hook.name] = t

    specs = {
        "plain": [],
        "keep all": [(n, keep) for n in names],
        "no-op all": [(n, noop) for n in names],
        "no-op patterns": [(n, noop) for n in patterns],
        "no-op others": [(n, noop) for n in names if n not in patterns],
    }

    def timed(spec) -> float:
        removers = [model.add_hook(n, fn) for n, fn in spec]
        try:
            t0 = time.perf_counter()
            model(x)
            return time.perf_counter() - t0
        finally:
            for remove in removers:
                remove()
            store.clear()

    times: dict[str, list[float]] = {k: [] for k in specs}
    keys = list(specs)
    for k in keys:  # warm-up
        timed(specs[k])
    for i in range(repeats):
        gc.collect()
        gc.disable()
        try:
            for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
                times[k].append(timed(specs[k]))
        finally:
            gc.enable()
    plain = statistics.median(times["plain"])
    out = {"plain_ms": _median_ms(times["plain"])}
    for k in keys[1:]:
        out[f"{k} +ms"] = round((statistics.median(times[k]) - plain) * 1e3, 2)
    return out


def holding(model: ms.HookedModel, x: torch.Tensor, repeats: int) -> dict:
    hf, kept, on = model.hf_model, [], [False]

    def hook(module, args, out):
        if on[0]:
            kept.append(out[0] if isinstance(out, tuple) else out)

    a = model.adapter  # the modules of (b)'s points: resid_pre/post, attn_out, mlp_out
    modules = [model.module(a.embed)] + [
        get_module(layer, path) for layer in model.module(a.layers) for path in ("", a.attn_out, a.mlp_out)
    ]
    handles = [m.register_forward_hook(hook) for m in modules]

    def call(keep: bool):
        on[0] = keep
        try:
            return hf(input_ids=x, use_cache=False).logits
        finally:
            on[0] = False

    try:  # cand_setup returns what runs untimed after each kept call: dropping what it kept
        r = compare(lambda: call(False), lambda: call(True), repeats, warmup=3, cand_setup=lambda: kept.clear)
    finally:
        for h in handles:
            h.remove()
    print(f"holding {len(modules)} outputs vs not: {describe(r)}")
    return {"hooks": len(modules), "ratio": r["ratio"], "ci95": r["ci95"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=60)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    model = ms.load_model("smollm2-135m")
    x = tokens(model, 1, 32)
    with torch.inference_mode():
        for label, pred in (("(a)", not_attn_internal), ("(b)", cached_b)):
            names = [n for n in model.hook_names if pred(n)]
            print(f"{label} attach/detach: {attach_detach(model, names, x, args.repeats)}")
        print(f"(b) forward by part: {parts(model, x, args.repeats)}")
        holding(model, x, args.repeats * 2)


if __name__ == "__main__":
    main()
