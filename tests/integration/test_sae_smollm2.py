"""A small SAE trained end to end on SmolLM2: harvest a few thousand tokens, train, evaluate, cross-check."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from mechscope.data.contexts import ContextConfig
from mechscope.saes.evals import evaluate_sae, store_contexts
from mechscope.saes.harvest import HarvestConfig, harvest
from mechscope.saes.sae import SAEConfig
from mechscope.saes.sources import StoreSource
from mechscope.saes.train import TrainConfig, train_sae

pytestmark = pytest.mark.slow
HOOK = "blocks.3.hook_resid_post"
K = 16


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("sae")
    cfg = HarvestConfig(
        hooks=(HOOK,), n_tokens=4096, contexts=ContextConfig(context_length=128), batch_size=8
    )
    store = harvest(smollm2, "default", root / "store", cfg)
    d = smollm2.cfg.d_model
    sae = train_sae(
        StoreSource(store),
        SAEConfig(d_in=d, d_sae=4 * d, kind="topk", k=K, hook_name=HOOK, model_name="smollm2-135m"),
        TrainConfig(n_tokens=60 * 512, batch_size=512, lr=1e-3, log_every=10, init_tokens=4096),
        root / "run",
    )
    return store, sae, root / "run"


def test_training_moves_the_metrics_the_right_way(run):
    _, _, out = run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < 0.6 * rows[0]["fvu"], (rows[0]["fvu"], rows[-1]["fvu"])
    assert all(r["l0"] <= K for r in rows) and rows[-1]["l0"] > K - 1  # TopK: L0 at its target


def test_eval_agrees_with_plain_torch_and_beats_zero_ablation(smollm2, run):
    store, sae, _ = run
    rows = store.read(HOOK, list(range(store.n_tokens)))
    special = torch.from_numpy(store.index_rows(list(range(store.n_tokens)))[:, 1] < 0)
    x = rows[~special]
    ev = evaluate_sae(
        sae,
        islice(StoreSource(store).batches(len(x), seed=0), 1),
        model=smollm2,
        contexts=store_contexts(store, 4),
    )
    with torch.no_grad():  # independent: plain torch on the same rows
        codes = sae.encode(x)
        recon = sae.decode(codes).double()
    xd = x.double()
    fvu = float((recon - xd).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum())
    assert ev.reconstruction.n_tokens == len(x)
    assert ev.reconstruction.fvu == pytest.approx(fvu, rel=1e-6)
    assert ev.reconstruction.l0 == pytest.approx(float((codes > 0).sum(-1).double().mean()), rel=1e-9)
    down = ev.downstream
    assert down.ce_loss_clean < down.ce_loss_sae < down.ce_loss_zero
    assert 0 < down.ce_loss_recovered < 1 and down.kl > 0
