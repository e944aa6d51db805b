"""Steering: the cost of steered generation, and the batched coefficient x layer sweep against a loop.

1. **generation**: ``model.generate`` (no hooks) against the same call inside
   ``mechscope.steering.steer(model, v)`` — an ActAdd "Love" - "Hate" block at layer 6 (added on the
   prompt pass only) and a ``[d_model]`` vector added at every position (each decode step). Greedy,
   16-token prompt, 32 new tokens (``min_new_tokens`` = ``max_new_tokens``). Interleaved repeats in one
   process (``_timing.compare``); target: ratio <= 1.05.
2. **sweep**: :func:`mechscope.steering.evaluate.sweep` (variants on the batch axis, per-row
   coefficients) against the obvious loop (one ``steer`` forward per vector x coefficient x text),
   same numbers (max abs difference printed). Wall time of each, and the speed-up.
3. **generation sweep**: :func:`~mechscope.steering.evaluate.sweep_generations` (every layer x
   coefficient x prompt in one batched ``generate``) against one steered ``generate`` per variant.

One CPU thread. Usage: .venv/bin/python benchmarks/bench_steering.py [--repeats 15] [--json out.json] [--only gen|sweep|gensweep]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _timing import compare, describe, machine

import mechscope as ms
from mechscope.models.generate import generate
from mechscope.steering import SteeringVector, actadd, random_like, steer
from mechscope.steering.evaluate import SweepConfig, concept_metric, sweep, sweep_generations

PROMPT = "I hate you because you never listen to me and you always say that the weather"
PROMPTS = ["I hate you because", "My opinion of him is that", "Yesterday my friend said", "The movie was"]
WORDS = [" love", " loved", " lovely", " beautiful", " wonderful"]


def bench_generation(model, repeats: int) -> dict:
    gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, return_tokens=True)
    prompt = model.to_tokens(PROMPT)[0, :16]
    vectors = {
        "actadd_front": actadd(model, "Love", "Hate", 6, coeff=5.0),
        "every_position": SteeringVector(
            hook_name="blocks.6.hook_resid_pre", direction=torch.randn(model.cfg.d_model), coeff=0.5
        ),
    }
    out = {}
    for name, v in vectors.items():

        def plain():
            return generate(model, prompt, **gen)

        def steered(v=v):
            with steer(model, v):
                return generate(model, prompt, **gen)

        out[name] = compare(plain, steered, repeats=repeats, warmup=1)
        print(f"generation, {name:15s} {describe(out[name])}", flush=True)
    return out


def sweep_loop(model, vectors, prompts, cfg: SweepConfig) -> torch.Tensor:
    """effect [vector coeff] by one forward per (vector, coefficient, text); KL on neutral text too."""
    metric, _ = concept_metric(model, WORDS)
    vecs = vectors + [random_like(v, seed=cfg.random_seed + j) for j, v in enumerate(vectors)]
    with torch.no_grad():
        ref = [float(metric(model(p)[:, -1])) for p in prompts]
        base = [model(t).log_softmax(-1) for t in cfg.neutral]
        effect = torch.zeros(len(vecs), len(cfg.coeffs))
        kl = torch.zeros(len(vecs), len(cfg.coeffs))
        for i, v in enumerate(vecs):
            for j, c in enumerate(cfg.coeffs):
                with steer(model, v.with_coeff(c)):
                    effect[i, j] = sum(
                        float(metric(model(p)[:, -1])) - r for p, r in zip(prompts, ref, strict=True)
                    ) / len(ref)
                    for t, b in zip(cfg.neutral, base, strict=True):
                        lp = model(t).log_softmax(-1)
                        kl[i, j] += float((b.exp() * (b - lp)).sum(-1).mean()) / len(cfg.neutral)
    return torch.cat([effect, kl])


def bench_sweep(model, repeats: int) -> dict:
    vecs = [actadd(model, "Love", "Hate", layer) for layer in (2, 6, 10)]
    cfg = SweepConfig(coeffs=(2.0, 5.0, 10.0), batch_size=16)
    times: dict[str, list[float]] = {"loop": [], "batched": []}
    for i in range(repeats):
        for key in ("loop", "batched") if i % 2 == 0 else ("batched", "loop"):
            t0 = time.perf_counter()
            if key == "loop":
                loop = sweep_loop(model, vecs, PROMPTS, cfg)
            else:
                r = sweep(model, vecs, PROMPTS, WORDS, cfg=cfg)
            times[key].append(time.perf_counter() - t0)
    batched = torch.cat([torch.cat([r.effect, r.random_effect]), torch.cat([r.kl, r.random_kl])])
    diff = float((batched - loop).abs().max())
    loop_s, batched_s = min(times["loop"]), min(times["batched"])
    n_var = 2 * len(vecs) * len(cfg.coeffs)
    print(
        f"sweep, {n_var} variants x ({len(PROMPTS)} prompts + {len(cfg.neutral)} neutral texts): "
        f"loop {loop_s:.1f} s ({n_var * (len(PROMPTS) + len(cfg.neutral))} forwards), batched {batched_s:.1f} s "
        f"({r.forwards} forwards of <= {cfg.batch_size} rows): speed-up {loop_s / batched_s:.2f}x; "
        f"max |difference| {diff:.2e}",
        flush=True,
    )
    return {
        "loop_s": times["loop"],
        "batched_s": times["batched"],
        "speedup": loop_s / batched_s,
        "max_diff": diff,
    }


def bench_generation_sweep(model, new_tokens: int) -> dict:
    """3 layers x 3 coefficients x 4 prompts of greedy generation: one batched call against 36 calls."""
    vecs = [actadd(model, "Love", "Hate", layer) for layer in (2, 6, 10)]
    coeffs = (2.0, 5.0, 10.0)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    t0 = time.perf_counter()
    loop = []
    for v in vecs:
        for c in coeffs:
            for p in PROMPTS:
                with steer(model, v.with_coeff(c)):
                    loop.append(generate(model, p, **gen))
    loop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = sweep_generations(model, vecs, PROMPTS, coeffs, **gen)
    batched_s = time.perf_counter() - t0
    same = sum(a == b["text"] for a, b in zip(loop, batched, strict=True))
    print(
        f"generation sweep, {len(loop)} generations of {new_tokens} tokens: loop {loop_s:.1f} s, one batched "
        f"call {batched_s:.1f} s: speed-up {loop_s / batched_s:.2f}x; identical texts {same}/{len(loop)}",
        flush=True,
    )
    return {"loop_s": loop_s, "batched_s": batched_s, "speedup": loop_s / batched_s, "identical": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sweep-repeats", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--only", choices=["gen", "sweep", "gensweep"], help="run one part only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ms.load_model(args.model)
    results: dict = {"machine": machine()}
    with torch.inference_mode():
        if args.only in (None, "gen"):
            results["generation"] = bench_generation(model, args.repeats)
    if args.only in (None, "sweep"):
        results["sweep"] = bench_sweep(model, args.sweep_repeats)
    with torch.inference_mode():
        if args.only in (None, "gensweep"):
            results["generation_sweep"] = bench_generation_sweep(model, 20)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
