"""Circuits and toy-model benchmarks, each against its naive baseline in the same process.

1. Composition scores for every head pair of a model: mechscope's batched Gram-matrix computation
   vs a per-pair loop over dense d_model x d_model products (the textbook formula).
2. Toy models of superposition: one vectorised run of ``--instances`` instances vs ``--singles``
   single-instance runs (different sparsities), timed alternately in one process with
   ``_timing.compare``; reported as instances trained per second, and the vectorised run's cost in
   single runs. A third timing runs the same vectorised sweep through autograd (the loop
   ``train`` used before its hand-written backward), to show what the hand-written pass buys.

Usage: .venv/bin/python benchmarks/bench_circuits.py [--model smollm2-135m] [--pairs 200] [--skip-composition]
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import compare, describe, machine

import mechscope as ms
from mechscope.circuits.composition import composition_scores
from mechscope.models.weights import fold_norms
from mechscope.toy import superposition as sp


def naive_pair_scores(model, pairs: int) -> float:
    """Seconds per head pair for the dense per-pair formula (Q, K and V)."""
    blocks = fold_norms(model.weights).blocks
    c = model.cfg
    fro = torch.linalg.matrix_norm
    start, done = time.perf_counter(), 0
    for la in range(c.n_layers):
        for lb in range(la + 1, c.n_layers):
            for ha in range(c.n_heads):
                ov_a = blocks[la].W_V[ha] @ blocks[la].W_O[ha]
                for hb in range(c.n_heads):
                    qk = blocks[lb].W_Q[hb] @ blocks[lb].W_K[hb].T
                    ov_b = blocks[lb].W_V[hb] @ blocks[lb].W_O[hb]
                    for read in (qk, qk.T, ov_b):
                        fro(ov_a @ read) / (fro(ov_a) * fro(read))
                    done += 1
                    if done >= pairs:
                        return (time.perf_counter() - start) / done
    return (time.perf_counter() - start) / done


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--pairs", type=int, default=200, help="pairs timed for the naive loop (then extrapolated)"
    )
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--singles", type=int, default=5, help="single-instance runs per timing")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-composition", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(machine())
    if not args.skip_composition:
        bench_composition(args)
    bench_superposition(args)


def autograd_fit(cfg: sp.ToyConfig) -> sp.ToyModel:
    """The sweep trained through autograd on the public forward / loss (the loop before the hand-written backward)."""
    model = sp.ToyModel(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(cfg.steps):
        x = model.sample(cfg.batch_size, g)
        loss = model.loss(x, model(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def bench_superposition(args) -> None:
    sparsities = tuple(torch.linspace(0, 0.99, args.instances).tolist())
    vectorised = sp.ToyConfig(sparsities=sparsities, steps=args.steps)
    singles = [
        sp.ToyConfig(sparsities=(s,), steps=args.steps) for s in sparsities[:: args.instances // args.singles]
    ]
    singles = singles[: args.singles]

    def run_singles():
        for cfg in singles:
            sp.train(cfg, log_every=0)

    r = compare(run_singles, lambda: sp.train(vectorised, log_every=0), repeats=args.repeats, warmup=0)
    single = r["plain_median_s"] / len(singles)
    per_s = (args.instances / r["cand_median_s"]) / (len(singles) / r["plain_median_s"])
    print(f"superposition, {args.instances} instances x {args.steps} steps vs {len(singles)} single runs:")
    print(f"  {describe(r)}")
    print(
        f"  one vectorised run {r['cand_median_s']:.2f} s = {r['cand_median_s'] / single:.1f} single runs "
        f"({single:.3f} s each); instances per second {per_s:.1f}x those of single runs"
    )
    start = time.perf_counter()
    autograd_fit(vectorised)
    old = time.perf_counter() - start
    print(
        f"  the same sweep through autograd: {old:.2f} s ({old / r['cand_median_s']:.1f}x the hand-written pass)"
    )


def bench_composition(args) -> None:
    model = ms.load_model(args.model)
    c = model.cfg
    n_pairs = c.n_heads**2 * c.n_layers * (c.n_layers - 1) // 2
    start = time.perf_counter()
    composition_scores(model)
    batched = time.perf_counter() - start
    per_pair = naive_pair_scores(model, args.pairs)
    naive = per_pair * n_pairs
    print(f"composition, {args.model}, {n_pairs} head pairs x 3 modes, 1 thread:")
    print(
        f"  batched {batched:.1f} s; naive loop {per_pair * 1e3:.1f} ms/pair (timed on {args.pairs}) -> {naive:.0f} s"
    )
    print(f"  ratio naive / batched = {naive / batched:.1f}x")


if __name__ == "__main__":
    main()
