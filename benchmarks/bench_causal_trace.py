"""ROME causal tracing: mechscope's ``causal_trace`` against one full forward per restoring variant.

A full trace of one prompt on ``smollm2-135m``: hidden state, MLP and attention (window 10) at every
layer x position, ``--samples`` noise draws. Two ways to get the same three grids:

1. **loop**: one full forward per (kind, layer, position), the noise samples on the batch axis,
   plain ``model.hooks`` (corrupt the subject's embeddings, restore the clean activations);
2. **causal_trace**: variants on the batch axis, each forward starting at its lowest restored
   layer from the corrupted run's cached residual stream, positions before the subject not run,
   only the last position unembedded.

Two prompts: the subject first (nothing to skip by position) and the subject late. Both ways include
their clean and corrupted runs; they alternate in one process, one CPU thread; the grids must agree
(max abs difference printed).

Usage: .venv/bin/python benchmarks/bench_causal_trace.py [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
from _timing import machine

import mechscope as ms
from mechscope.interventions.causal_trace import KINDS, causal_trace, subject_positions, window_layers

PROMPTS = [
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower"),
    ("The capital of Italy is", "Italy"),
]


def loop(
    model, prompt: str, subject: str, samples: int, window: int, noise: float
) -> dict[str, torch.Tensor]:
    ids = model.to_tokens(prompt)
    subj = subject_positions(model, prompt, subject)
    n_layers, n_pos = model.cfg.n_layers, ids.shape[1]
    names = {k: [f"blocks.{i}.{h}" for i in range(n_layers)] for k, h in KINDS.items()}
    logits, clean = model.run_with_cache(ids, [n for v in names.values() for n in v])
    target = int(logits[0, -1].argmax())
    draws = torch.randn(samples, len(subj), model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    draws = draws * noise

    def corrupt(x, hook):
        y = x.clone()
        y[:, subj] += draws
        return y

    rows = ids.repeat(samples, 1)
    with model.hooks({"hook_embed": corrupt}):
        model(rows)  # the corrupted run, as causal_trace makes it
    out = {}
    for kind, hook_names in names.items():
        grid = torch.empty(n_layers, n_pos)
        for layer in range(n_layers):
            span = range(layer, layer + 1) if kind == "state" else window_layers(layer, window, n_layers)
            for p in range(n_pos):

                def restore(x, hook, p=p):
                    y = x.clone()
                    y[:, p] = clean[hook.name][0, p]
                    return y

                with model.hooks({"hook_embed": corrupt, **{hook_names[j]: restore for j in span}}):
                    grid[layer, p] = model(rows)[:, -1].float().softmax(-1)[:, target].mean()
        out[kind] = grid
    return out


def _scores(model, prompt: str, subject: str, **settings) -> dict[str, torch.Tensor]:
    return causal_trace(model, prompt, subject, **settings).scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--window", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ms.load_model(args.model)
    results = []
    with torch.inference_mode():
        for prompt, subject in PROMPTS:
            noise = 0.1  # about 3 x the std of SmolLM2's embeddings; its size does not change the cost
            settings = dict(samples=args.samples, window=args.window, noise=noise)
            ways = {
                "loop": partial(loop, model, prompt, subject, **settings),
                "causal_trace": partial(_scores, model, prompt, subject, **settings),
            }
            times: dict[str, list[float]] = {k: [] for k in ways}
            grids = {}
            for r in range(args.repeats):
                for key in list(ways)[r % 2 :] + list(ways)[: r % 2]:
                    t0 = time.perf_counter()
                    grids[key] = ways[key]()
                    times[key].append(time.perf_counter() - t0)
                    print(f"{prompt!r} repeat {r} {key:12s} {times[key][-1]:7.2f} s", flush=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            results.append(
                {
                    "prompt": prompt,
                    "subject": subject,
                    "tokens": model.to_tokens(prompt).shape[1],
                    "subject_positions": subject_positions(model, prompt, subject),
                    "median_s": med,
                    "speedup_vs_loop": med["loop"] / med["causal_trace"],
                    "max_abs_diff": {
                        k: float((grids["causal_trace"][k] - grids["loop"][k]).abs().max()) for k in KINDS
                    },
                    "times_s": times,
                }
            )
            print(json.dumps({k: v for k, v in results[-1].items() if k != "times_s"}), flush=True)
    result = {"machine": machine(), "samples": args.samples, "window": args.window, "prompts": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
