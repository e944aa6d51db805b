"""Harvest throughput on smollm2-135m (CPU, one thread): a layer-L hook vs a full forward.

Target (issue #5): harvesting a layer-L hook runs at >= n_layers / (L + 1) x the throughput of
a full forward, i.e. the early exit (``run_with_cache(..., stop_at_layer=L + 1)``) really saves
the blocks after L and the unembedding.

    .venv/bin/python benchmarks/bench_harvest.py            # ~4 min on 2 shared cores
    .venv/bin/python benchmarks/bench_harvest.py --quick    # ~1.5 min

Two measurements, both in this one process:

1. **forward step**, per layer L: ``harvest_batch`` (the exact call ``harvest`` makes per batch:
   hooks, early exit, copy to the stored dtype) against the plain ``transformers`` forward
   ``hf_model(input_ids=x, use_cache=False)`` on the same batch of real contexts (default corpus,
   ``--batch`` x 128 tokens), timed alternately with ``_timing.compare``;
   ``speedup = median(full) / median(harvest)``.
2. **end to end**: ``harvest(...)`` of ``blocks.5.hook_resid_post``, 8 batches into a fresh store
   (everything a user pays: corpus tokenising, model fingerprint, batching, writing and fsyncing
   shards with checksums, the manifest), against 8 full forwards of the same batch shape,
   timed alternately. Documents and contexts in corpus order here (shuffle buffers of 1), so
   the first context needs one document tokenised rather than the whole corpus.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
from itertools import islice

import torch
from _timing import compare, machine

import mechscope as ms
from mechscope.data.contexts import ContextConfig, context_stream
from mechscope.data.corpus import default_corpus
from mechscope.saes.harvest import HarvestConfig, harvest, harvest_batch, plan_hooks

MODEL = "smollm2-135m"
CONTEXT = 128


def contexts(model: ms.HookedModel, n: int) -> torch.Tensor:
    stream = context_stream(model, default_corpus(), ContextConfig(context_length=CONTEXT))
    return torch.stack([torch.from_numpy(c.index[:, 0].astype("int64")) for c in islice(stream, n)])


def forward_step(model: ms.HookedModel, ids: torch.Tensor, layer: int, repeats: int) -> dict:
    plan = plan_hooks(model, [f"blocks.{layer}.hook_resid_post"])
    hf = model.hf_model

    def full():
        return hf(input_ids=ids, use_cache=False).logits

    def cand():
        return harvest_batch(model, ids, plan)

    r = compare(full, cand, repeats=repeats, warmup=1)
    n = model.cfg.n_layers
    speedup = 1 / r["ratio"]
    return {
        "layer": layer,
        "stop_at_layer": plan.stop_at_layer,
        "full_s": r["plain_median_s"],
        "harvest_s": r["cand_median_s"],
        "speedup": speedup,
        "ci95": (1 / r["ci95"][1], 1 / r["ci95"][0]),
        "speedup_of_mins": 1 / r["ratio_of_mins"],
        "target": n / (layer + 1),
        "meets_target": speedup >= n / (layer + 1),
        "full_tokens_per_s": ids.numel() / r["plain_median_s"],
        "harvest_tokens_per_s": ids.numel() / r["cand_median_s"],
    }


def end_to_end(model: ms.HookedModel, ids: torch.Tensor, layer: int, n_batches: int, repeats: int) -> dict:
    """``harvest()`` of ``n_batches`` batches into a fresh store vs as many full forwards, interleaved."""
    batch = ids.shape[0]
    corpus = default_corpus()
    # Corpus order (buffers of 1): the first context needs one document tokenised, not the corpus.
    ctx = ContextConfig(context_length=CONTEXT, document_buffer=1, context_buffer=1)
    cfg = HarvestConfig(
        hooks=(f"blocks.{layer}.hook_resid_post",),
        n_tokens=n_batches * batch * CONTEXT,
        contexts=ctx,
        batch_size=batch,  # shards of the default size, as a user gets them
    )
    hf = model.hf_model

    def full():
        for _ in range(n_batches):
            hf(input_ids=ids, use_cache=False)

    def cand():
        out = tempfile.mkdtemp()
        try:
            harvest(model, corpus, out, cfg)
        finally:
            shutil.rmtree(out)

    with torch.inference_mode():
        r = compare(full, cand, repeats=repeats, warmup=0)
    n = model.cfg.n_layers
    return {
        "layer": layer,
        "tokens": cfg.n_tokens,
        "full_s": r["plain_median_s"],
        "harvest_s": r["cand_median_s"],
        "speedup": 1 / r["ratio"],
        "ci95": (1 / r["ci95"][1], 1 / r["ci95"][0]),
        "speedup_of_mins": 1 / r["ratio_of_mins"],
        "target": n / (layer + 1),
        "harvest_tokens_per_s": cfg.n_tokens / r["cand_median_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and layers")
    p.add_argument("--batch", type=int, default=4, help="contexts of 128 tokens per forward")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = ms.load_model(MODEL)
    ids = contexts(model, args.batch)
    layers = [0, 5, 14, 29] if not args.quick else [5, 29]
    repeats = 3 if args.quick else 7
    results: dict = {"machine": machine(), "model": MODEL, "batch": list(ids.shape), "forward_step": []}
    n = model.cfg.n_layers
    print(f"{MODEL}: {n} layers; batch {args.batch} x {CONTEXT} tokens; one thread; repeats {repeats}")
    print(f"{'layer':>5} {'full ms':>9} {'harvest ms':>11} {'speedup':>8} {'target':>7}  95% CI  min/min")
    with torch.inference_mode():
        for layer in layers:
            r = forward_step(model, ids, layer, repeats)
            results["forward_step"].append(r)
            ok = "ok" if r["meets_target"] else "MISSED"
            print(
                f"{layer:>5} {r['full_s'] * 1e3:>9.1f} {r['harvest_s'] * 1e3:>11.1f} {r['speedup']:>7.2f}x"
                f" {r['target']:>6.2f}x  [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]  {r['speedup_of_mins']:.2f}x {ok}"
            )
    e2e = end_to_end(model, ids, 5, 4 if args.quick else 8, 2 if args.quick else 3)
    results["end_to_end"] = e2e
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"end to end, harvest() of blocks.5.hook_resid_post, {e2e['tokens']} tokens into a fresh store: "
        f"{e2e['harvest_s']:.2f} s vs {e2e['full_s']:.2f} s of full forwards -> {e2e['speedup']:.2f}x "
        f"[{e2e['ci95'][0]:.2f}, {e2e['ci95'][1]:.2f}], min/min {e2e['speedup_of_mins']:.2f}x "
        f"(target {e2e['target']:.2f}x), "
        f"{e2e['harvest_tokens_per_s']:.0f} tok/s; peak RSS {results['peak_rss_mib']:.0f} MiB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
