"""Feature-database builds and lookups on smollm2-135m (CPU, one thread).

    .venv/bin/python benchmarks/bench_features.py            # ~5 min on 2 shared cores
    .venv/bin/python benchmarks/bench_features.py --quick    # ~2 min
    .venv/bin/python benchmarks/bench_features.py --wide     # adds a 131,072-latent SAE (~10 min, ~1 GB)

Three measurements, for the 1,536 MLP neurons of layer 3 and a random TopK SAE (k=32, 16,384
latents) on ``blocks.6.hook_resid_post``:

1. **pass overhead**: what one batch of the streaming pass costs beyond the forward it needs.
   ``harvest_batch`` alone (the forward, stopping after the hook's layer) against
   ``harvest_batch`` + ``encode`` + ``RunningStats.update``, timed alternately with
   ``_timing.compare`` on batches of real contexts (8 x 128 tokens). The running state is first
   filled with ``--warm`` batches, so the timing is the steady state of a long pass, where few
   features change their kept examples per batch.
2. **build**: ``build_features`` end to end into a fresh directory (tokenising, the pass,
   logit effects, neighbours, writing Parquet), tokens/s and where the time goes.
3. **lookups**: ``db.feature(i)`` for random ids (median and 95th percentile), and a
   ``db.features(order_by="max")`` page, on the database just built.

Ratios are the numbers to read on a loaded machine; absolute times vary with the load.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from itertools import islice

import numpy as np
import torch
from _timing import compare, machine

import mechscope as ms
from mechscope.data.contexts import ContextConfig, context_stream
from mechscope.data.corpus import default_corpus
from mechscope.features import FeatureConfig, Neurons, build_features, feature_source
from mechscope.features.build import _stats_shape
from mechscope.features.stats import RunningStats
from mechscope.saes.arch import make_sae
from mechscope.saes.harvest import harvest_batch, plan_hooks
from mechscope.saes.sae import SAEConfig

MODEL, CONTEXT, BATCH = "smollm2-135m", 128, 8


def batches(model: ms.HookedModel, n: int) -> list[torch.Tensor]:
    stream = context_stream(model, default_corpus(), ContextConfig(context_length=CONTEXT))
    idx = [torch.from_numpy(c.index) for c in islice(stream, n * BATCH)]
    return [torch.stack(idx[i : i + BATCH]) for i in range(0, len(idx), BATCH)]


def pass_overhead(model, source, data: list[torch.Tensor], warm: int, repeats: int) -> dict:
    src = feature_source(model, source)
    plan = plan_hooks(model, [src.hook])
    cfg = FeatureConfig()
    stats = RunningStats(_stats_shape(src, cfg))
    done = [0]

    def step(index: torch.Tensor) -> None:
        acts = harvest_batch(model, index[..., 0].long(), plan)[src.hook]
        stats.update(src.encode(acts).view(BATCH, CONTEXT, -1), index, done[0], done[0] // BATCH)
        done[0] += BATCH

    for index in data[:warm]:
        step(index)
    rest = iter(data[warm:] * repeats)
    i = [0]

    def forward():
        return harvest_batch(model, data[i[0] % len(data)][..., 0].long(), plan)

    def full():
        i[0] += 1
        step(next(rest))

    r = compare(forward, full, repeats=repeats, warmup=0)
    return {
        "forward_s": r["plain_median_s"],
        "pass_s": r["cand_median_s"],
        "ratio": r["ratio"],
        "ci95": r["ci95"],
        "tokens_per_s": BATCH * CONTEXT / r["cand_median_s"],
    }


def build(model, source, n_tokens: int, lookups: int) -> dict:
    out = tempfile.mkdtemp()
    cfg = FeatureConfig(n_tokens=n_tokens, contexts=ContextConfig(context_length=CONTEXT), batch_size=BATCH)
    marks: list[float] = []
    t0 = time.perf_counter()
    db = build_features(
        model, source, "default", cfg, out, progress=lambda p: marks.append(time.perf_counter())
    )
    total = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, db.n_features, lookups).tolist()
    db.feature(ids[0])  # footers and vocabulary, once
    lat = []
    for i in ids:
        t = time.perf_counter()
        db.feature(i)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    db.features(order_by="max", descending=True, limit=50)
    page = time.perf_counter() - t
    size = sum(f.stat().st_size for f in db.path.iterdir() if f.is_file())
    db.close()
    shutil.rmtree(out)
    return {
        "features": db.n_features,
        "tokens": db.meta["n_tokens"],
        "total_s": total,
        "pass_s": marks[-1] - t0,  # up to the last batch: tokenising + forwards + state updates
        "after_pass_s": t0 + total - marks[-1],  # logit effects, neighbours, tables, Parquet
        "tokens_per_s": db.meta["n_tokens"] / total,
        "lookup_median_ms": statistics.median(lat) * 1e3,
        "lookup_p95_ms": float(np.percentile(lat, 95)) * 1e3,
        "page_ms": page * 1e3,
        "db_mib": size / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.add_argument("--wide", action="store_true", help="also build a 131,072-latent SAE database")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = ms.load_model(MODEL)
    d = model.cfg.d_model
    sources = {
        "neurons L3 (1,536)": Neurons(3),
        "topk SAE L6 (16,384)": make_sae(
            SAEConfig(d_in=d, d_sae=16384, kind="topk", k=32, hook_name="blocks.6.hook_resid_post", seed=0)
        ),
    }
    warm, repeats = (8, 5) if args.quick else (24, 9)
    data = batches(model, warm + repeats)
    n_tokens = 8192 if args.quick else 32768
    results: dict = {"machine": machine(), "model": MODEL, "batch": [BATCH, CONTEXT], "sources": {}}
    print(f"{MODEL}, one thread, batches of {BATCH} x {CONTEXT} tokens")
    with torch.inference_mode():
        for name, source in sources.items():
            o = pass_overhead(model, source, data, warm, repeats)
            b = build(model, source, n_tokens, 200)
            results["sources"][name] = {"pass_overhead": o, "build": b}
            print(
                f"{name}: pass {o['pass_s'] * 1e3:.0f} ms/batch vs forward {o['forward_s'] * 1e3:.0f} ms "
                f"-> {o['ratio']:.2f}x [{o['ci95'][0]:.2f}, {o['ci95'][1]:.2f}], {o['tokens_per_s']:.0f} tok/s "
                f"steady; build of {b['tokens']} tokens {b['total_s']:.1f} s ({b['pass_s']:.1f} s pass, "
                f"{b['after_pass_s']:.1f} s effects+tables), {b['tokens_per_s']:.0f} tok/s; feature(i) median "
                f"{b['lookup_median_ms']:.1f} ms, p95 {b['lookup_p95_ms']:.1f} ms; page {b['page_ms']:.1f} ms; "
                f"{b['db_mib']:.1f} MiB"
            )
        if args.wide:
            wide = make_sae(
                SAEConfig(
                    d_in=d, d_sae=131072, kind="topk", k=32, hook_name="blocks.6.hook_resid_post", seed=0
                )
            )
            b = build(model, wide, 4096, 200)
            results["sources"]["topk SAE L6 (131,072)"] = {"build": b}
            print(
                f"topk SAE L6 (131,072): build of {b['tokens']} tokens {b['total_s']:.1f} s "
                f"({b['pass_s']:.1f} s pass, {b['after_pass_s']:.1f} s effects+tables); feature(i) median "
                f"{b['lookup_median_ms']:.1f} ms, p95 {b['lookup_p95_ms']:.1f} ms; page {b['page_ms']:.1f} ms; "
                f"{b['db_mib']:.1f} MiB"
            )
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {results['peak_rss_mib']:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
