"""Circuits and toy-model benchmarks, each against its naive baseline in the same process.

1. Composition scores for every head pair of a model: mechscope's batched Gram-matrix computation
   vs a per-pair loop over dense d_model x d_model products (the textbook formula).
2. Toy models of superposition: one vectorised run of N instances vs N single-instance runs
   (the single-run time is measured on a few and extrapolated, stated in the output).

Usage: .venv/bin/python benchmarks/bench_circuits.py [--model smollm2-135m] [--pairs 200]
"""

from __future__ import annotations

import argparse
import time

import torch

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
    p.add_argument("--steps", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)

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

    sparsities = tuple(torch.linspace(0, 0.99, args.instances).tolist())
    start = time.perf_counter()
    sp.train(sp.ToyConfig(sparsities=sparsities, steps=args.steps), log_every=0)
    vectorised = time.perf_counter() - start
    singles = []
    for s in sparsities[:5]:
        start = time.perf_counter()
        sp.train(sp.ToyConfig(sparsities=(s,), steps=args.steps), log_every=0)
        singles.append(time.perf_counter() - start)
    single = sum(singles) / len(singles)
    print(f"superposition, {args.instances} instances x {args.steps} steps:")
    print(f"  one vectorised run {vectorised:.1f} s; one single-instance run {single:.2f} s (mean of 5)")
    print(
        f"  vectorised run = {vectorised / single:.1f} single runs; {args.instances} separate runs would be {args.instances * single / vectorised:.1f}x slower"
    )


if __name__ == "__main__":
    main()
