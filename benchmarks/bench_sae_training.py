"""SAE training throughput: mechscope's Trainer vs SAELens' and sparsify's, same activations, same architecture.

Issue #5's target: tokens/s >= 2x SAELens' at equal or better FVU at equal L0. Run it in a virtual
environment that has the peers (SAELens pins its own dependencies, so it lives beside the project's):

    python -m venv /tmp/slvenv && /tmp/slvenv/bin/pip install torch==2.13.0 sae-lens eai-sparsify
    echo /work/main/src > /tmp/slvenv/lib/python3.11/site-packages/mechscope.pth   # mechscope importable
    mechscope harvest smollm2-135m /tmp/bench_store --hook blocks.6.hook_resid_post --tokens 131072
    /tmp/slvenv/bin/python benchmarks/bench_sae_training.py /tmp/bench_store [--steps 40 --threads 2]

What runs, in this one process: a TopK SAE (d_in 576, d_sae 8 x 576, k 32, AuxK, Adam, batch 4096, both
libraries' defaults for initialisation and input normalisation "expected_average_only_in") trained by
each library's *public one-step call* (mechscope ``Trainer.train_step``, SAELens ``SAETrainer.step``)
on the same batches in the same order, the two alternating step by step so that machine load hits both
alike. SAELens runs twice: its default (dense) TopK and its ``use_sparse_activations=True`` option.
Checkpointing and logging are off for both. FVU is then measured on 8192 held-out rows; L0 is k for
all. Peak memory: each trainer alone in a child process, the peak RSS (``VmHWM``, reset once the data is
loaded) minus the RSS at that moment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from _timing import machine

from mechscope.saes.sae import SAEConfig
from mechscope.saes.sources import TensorSource
from mechscope.saes.store import ActivationStore
from mechscope.saes.train import TrainConfig, Trainer

D_SAE_FACTOR, K, BATCH, HELD_OUT = 8, 32, 4096, 8192


def load_rows(path: str) -> torch.Tensor:
    store = ActivationStore.open(path)
    (hook,) = store.hooks
    rows = [r for chunk in store.row_order(seed=0, epochs=1) for r in chunk.tolist()]
    return store.read(hook, rows)


def mechscope_trainer(x: torch.Tensor, steps: int, out: str) -> Trainer:
    from mechscope.saes.arch import make_sae

    d = x.shape[1]
    sae = make_sae(SAEConfig(d_in=d, d_sae=D_SAE_FACTOR * d, kind="topk", k=K))
    cfg = TrainConfig(
        n_tokens=steps * BATCH,
        batch_size=BATCH,
        lr=4e-4,
        lr_warmup=0,
        lr_decay=0,
        log_every=10**9,
        checkpoint_every=10**9,
    )
    t = Trainer(sae, TensorSource(x), cfg, out)
    t.out.mkdir(parents=True, exist_ok=True)
    t._initialise()  # what fit() does before the loop: normalisation, b_dec at the geometric median
    t.sae.train()
    return t


def saelens_trainer(x: torch.Tensor, steps: int, sparse: bool):
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    d = x.shape[1]
    cfg = TopKTrainingSAEConfig(
        d_in=d,
        d_sae=D_SAE_FACTOR * d,
        k=K,
        dtype="float32",
        device="cpu",
        normalize_activations="expected_average_only_in",
        use_sparse_activations=sparse,
    )
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(
        total_training_samples=steps * BATCH,
        train_batch_size_samples=BATCH,
        lr=4e-4,
        lr_end=4e-4,
        device="cpu",
        n_batches_for_norm_estimate=2,
    )
    trainer = SAETrainer(tcfg, sae, data_provider=iter(x.split(BATCH)))
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=d, data_provider=iter(x.split(BATCH)), n_batches_for_norm_estimate=2
    )
    return trainer


class SparsifyStep:
    """EleutherAI sparsify's training step on its ``SparseCoder`` (the body of its ``Trainer.fit`` for the
    FVU loss, without the model forward): unit-norm decoder, TopK forward with AuxK on latents that have
    not fired for ``dead_tokens``, loss ``fvu + auxk_alpha * auxk``, gradient parallel to the decoder rows
    removed, Adam. ``b_dec`` starts at the data mean, as its trainer does. Runs on CPU with its eager
    (non-Triton) decoder."""

    def __init__(self, x: torch.Tensor, dead_tokens: int = 1 << 20, auxk_alpha: float = 1 / 32):
        from sparsify import SparseCoder, SparseCoderConfig

        d = x.shape[1]
        self.sae = SparseCoder(d, SparseCoderConfig(k=K, num_latents=D_SAE_FACTOR * d), device="cpu")
        with torch.no_grad():
            self.sae.b_dec.copy_(x[:8192].mean(0))
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=4e-4)
        self.since = torch.zeros(self.sae.num_latents, dtype=torch.long)
        self.dead_tokens, self.alpha = dead_tokens, auxk_alpha

    def step(self, b: torch.Tensor) -> None:
        self.sae.set_decoder_norm_to_unit_norm()
        out = self.sae(b, dead_mask=self.since > self.dead_tokens)
        (out.fvu + self.alpha * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()
        fired = torch.zeros_like(self.since, dtype=torch.bool)
        fired[out.latent_indices.flatten()] = True
        self.since += len(b)
        self.since[fired] = 0


@torch.no_grad()
def fvu_sparsify(t: SparsifyStep, x: torch.Tensor) -> float:
    return float(t.sae(x).fvu)


@torch.no_grad()
def fvu_mechscope(t: Trainer, x: torch.Tensor) -> float:
    t.sae.eval()
    r = t.sae(x).recon
    return float((r - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@torch.no_grad()
def fvu_saelens(t, x: torch.Tensor) -> float:
    t.sae.eval()
    xs = t.activation_scaler(x)
    r = t.sae(xs)
    return float((r - xs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())


def batches(x: torch.Tensor, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [x[torch.randint(0, len(x), (BATCH,), generator=g)] for _ in range(steps)]


def make_trainers(x: torch.Tensor, steps: int, out: str, only: str | None = None) -> dict:
    """name -> (one training step on a batch, FVU on held-out rows), for every trainer that imports."""
    made: dict = {}
    if only in (None, "mechscope"):
        t = mechscope_trainer(x, steps, out)
        made["mechscope"] = (t.train_step, lambda h, t=t: fvu_mechscope(t, h))
    for name, sparse in (("saelens", False), ("saelens-sparse", True)):
        if only in (None, name):
            t = saelens_trainer(x, steps, sparse)

            def step(b, t=t):
                t.step(b)
                t.n_training_steps += 1

            made[name] = (step, lambda h, t=t: fvu_saelens(t, h))
    if only in (None, "sparsify"):
        try:
            t = SparsifyStep(x)
            made["sparsify"] = (t.step, lambda h, t=t: fvu_sparsify(t, h))
        except ImportError as e:  # an optional peer
            print(f"sparsify not importable ({e}); skipped", file=sys.stderr)
    return made


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(which: str, path: str, steps: int) -> None:
    """Peak memory of one trainer alone."""
    x = load_rows(path)[:-HELD_OUT]
    data = batches(x, steps)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS (Linux)
        f.write("5")
    base = _status_kib("VmRSS")
    step, _ = make_trainers(x, steps, "/tmp/bench_sae_mem", only=which)[which]
    for b in data:
        step(b)
    print(json.dumps({"which": which, "peak_mib": (_status_kib("VmHWM") - base) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("store")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.child:
        return child(a.child, a.store, 4)
    x = load_rows(a.store)
    train, held = x[:-HELD_OUT], x[-HELD_OUT:]
    data = batches(train, a.steps)
    trainers = make_trainers(train, a.steps, "/tmp/bench_sae_run")
    runners = {name: step for name, (step, _) in trainers.items()}
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    failed: dict[str, str] = {}
    for i, b in enumerate(data):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            try:
                runners[name](b)
            except Exception as e:  # a peer option that does not run here is reported, not hidden
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                names.remove(name)
                del trainers[name], times[name]
                continue
            times[name].append(time.perf_counter() - t0)
    warm = 2  # the first steps pay one-off allocations
    med = {k: statistics.median(v[warm:]) for k, v in times.items()}
    result = {
        "machine": machine(),
        "threads": a.threads,
        "steps": a.steps,
        "batch": BATCH,
        "d_in": x.shape[1],
        "d_sae": D_SAE_FACTOR * x.shape[1],
        "k": K,
        "tokens_per_s": {k: BATCH / v for k, v in med.items()},
        "speedup_vs": {k: med[k] / med["mechscope"] for k in med if k != "mechscope"},
        "failed": failed,
        "fvu_held_out": {k: fvu(held) for k, (_, fvu) in trainers.items()},
    }
    mem = {}
    for which in names:
        out = subprocess.run(
            [sys.executable, __file__, a.store, "--child", which, "--threads", str(a.threads)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        mem[which] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    result["peak_mib_above_data"] = mem
    print(json.dumps(result, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
