"""The same computations on CUDA as on the CPU: forwards, every hook point, gradients, generation with
hooks, patching sweeps, attribution patching, causal tracing, the sparse TopK kernels, SAE training and
splicing, harvesting, feature databases, steering sweeps and ROME.

Skipped where there is no CUDA. ``MECHSCOPE_TEST_DEVICE=cpu`` runs them against a second CPU copy, which
checks the tests themselves on a machine without a GPU (every comparison is then exact or nearly so).
"""

from __future__ import annotations

import copy
import os
from itertools import islice

import pytest
import torch

import mechscope as ms
from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import Corpus, pydoc_corpus
from mechscope.models.adapters import adapters

DEVICE = os.environ.get("MECHSCOPE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or MECHSCOPE_TEST_DEVICE=cpu to check the tests)"),
]
FAMILIES = sorted(adapters())
WITH_MLP = sorted(name for name, a in adapters().items() if a.has_mlp)
# float32 on two devices: kernels sum in other orders, so values agree to rounding, not bits.
TOL = dict(atol=2e-4, rtol=2e-4)
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture(autouse=True)
def no_tf32():
    """Plain float32 matmuls on CUDA (TF32 would round to 10 mantissa bits and swamp the comparison)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def pair(name: str) -> tuple[ms.HookedModel, ms.HookedModel]:
    """The same model on the CPU and on DEVICE (tiny models are built from a fixed seed: checked)."""
    cpu, dev = ms.load_model(name), ms.load_model(name, device=DEVICE)
    assert dev.device.type == torch.device(DEVICE).type
    for (n, a), (_, b) in zip(
        cpu.hf_model.state_dict().items(), dev.hf_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b.cpu()), n
    return cpu, dev


def close(a, b, **kw) -> None:
    torch.testing.assert_close(b.detach().cpu(), a.detach().cpu(), **(kw or TOL))


def logit_diff(model: ms.HookedModel):
    from mechscope.interventions.metrics import logit_diff as ld

    return ld(model.to_single_token("M"), model.to_single_token("J"))


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus.from_texts([pydoc_corpus().document(i).text for i in range(5)], "pydoc5")


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_every_hook_point_match_the_cpu(family):
    cpu, dev = pair(f"tiny-{family}")
    prompts = [CLEAN, "a shorter one"]  # padding, masks and positions on the device too
    close(cpu(prompts), dev(prompts))
    _, c_cache = cpu.run_with_cache(prompts)
    _, d_cache = dev.run_with_cache(prompts)  # every point: the eager attention path on the device
    assert set(c_cache.keys()) == set(d_cache.keys()) == set(cpu.hook_names)
    for name in c_cache.keys():
        assert d_cache[name].device.type == torch.device(DEVICE).type, name
        close(c_cache[name], d_cache[name])
    _, offloaded = dev.run_with_cache(prompts, names=["blocks.0.hook_resid_post"], device="cpu")
    assert offloaded["blocks.0.hook_resid_post"].device.type == "cpu"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gradients_through_hooks_match_the_cpu(family):
    cpu, dev = pair(f"tiny-{family}")
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]

    def metric(logits):
        return logits[:, -1].logsumexp(-1).sum()

    a, b = (m.run_with_grads(CLEAN, metric, names) for m in (cpu, dev))
    close(a.metric, b.metric)
    for n in names:
        close(a.cache[n], b.cache[n])
        close(a.grads[n], b.grads[n], atol=1e-4, rtol=1e-3)


def test_generation_with_a_hook_applies_to_every_new_token_on_the_device():
    _, dev = pair("tiny-llama")
    v = torch.randn(dev.cfg.d_model, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 4
    hooks = {"blocks.0.hook_resid_post": lambda x, hook: x + v}
    out = dev.generate(CLEAN, hooks=hooks, max_new_tokens=8, return_tokens=True).reshape(1, -1)
    plain = dev.generate(CLEAN, max_new_tokens=8, return_tokens=True).reshape(1, -1)
    assert not torch.equal(out, plain)  # the hook changed what was generated
    with dev.hooks(hooks):  # without the KV cache: each generated token is the argmax after the hook
        logits = dev(out)
    n = dev.to_tokens(CLEAN).shape[1]
    assert torch.equal(logits[0, n - 1 : -1].argmax(-1), out[0, n:])


@pytest.mark.parametrize("point, per", [("resid_pre", "pos"), ("z", "head"), ("pattern", "head")])
def test_patch_sweep_and_attribution_match_the_cpu(point, per):
    from mechscope.interventions.attribution import attribution_patch
    from mechscope.interventions.patching import patch_sweep

    cpu, dev = pair("tiny-llama")
    for fn in (patch_sweep, attribution_patch):
        a = fn(cpu, CLEAN, CORRUPT, logit_diff(cpu), point, per=per)
        b = fn(dev, CLEAN, CORRUPT, logit_diff(dev), point, per=per)
        close(a.values, b.values, atol=1e-3, rtol=1e-3)


def test_causal_trace_matches_the_cpu():
    from mechscope.interventions.causal_trace import causal_trace

    cpu, dev = pair("tiny-llama")
    a, b = (causal_trace(m, "The Eiffel Tower is in", "Eiffel Tower", samples=3) for m in (cpu, dev))
    assert a.answer == b.answer
    for kind in ("state", "mlp", "attn"):  # the noise is drawn on the CPU: the same draws on both
        close(a.scores[kind], b.scores[kind], atol=1e-4, rtol=1e-3)


def test_sparse_topk_kernels_equal_the_dense_maths_on_the_device():
    from mechscope.saes.arch import make_sae
    from mechscope.saes.arch.sparse import CUDA_MIN_D_SAE
    from mechscope.saes.sae import SAEConfig

    d_sae = CUDA_MIN_D_SAE  # the narrowest SAE that trains on the sparse kernels on CUDA
    sae = make_sae(SAEConfig(d_in=64, d_sae=d_sae, kind="topk", k=8, k_aux=16, dtype="float64")).to(DEVICE)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 64, dtype=torch.float64, generator=g).to(DEVICE)
    dead = (torch.rand(d_sae, generator=g) < 0.3).to(DEVICE)
    runs = []
    for training in (True, False):  # True: torch.sparse / embedding_bag kernels; False: dense
        sae.train(training)
        sae.zero_grad()
        out = sae(x, dead_mask=dead)
        sae.total_loss(out.losses).backward()
        runs.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (sparse, g_sparse), (dense, g_dense) = runs
    assert sparse.acts.is_sparse and sparse.recon.device.type == torch.device(DEVICE).type
    close(dense.recon, sparse.recon, atol=1e-10, rtol=1e-10)
    for name in g_dense:
        close(g_dense[name], g_sparse[name], atol=1e-10, rtol=1e-8)


def test_harvest_train_evaluate_and_splice_on_the_device(corpus, tmp_path):
    from mechscope.saes.evals import evaluate_sae, store_contexts
    from mechscope.saes.harvest import HarvestConfig, harvest
    from mechscope.saes.sae import SAEConfig
    from mechscope.saes.sources import StoreSource
    from mechscope.saes.train import TrainConfig, train_sae

    cpu, dev = pair("tiny-llama")
    hook = "blocks.1.hook_resid_post"
    cfg = HarvestConfig(hooks=(hook,), n_tokens=2048, contexts=ContextConfig(context_length=32, seed=1))
    stores = [harvest(m, corpus, tmp_path / f"acts-{i}", cfg) for i, m in enumerate((cpu, dev))]
    for i in range(stores[0].n_shards):
        close(stores[0].shard(hook, i), stores[1].shard(hook, i))

    d = dev.cfg.d_model
    sae = train_sae(
        StoreSource(stores[1], hook),
        SAEConfig(d_in=d, d_sae=4 * d, kind="topk", k=8, hook_name=hook),
        TrainConfig(n_tokens=2048 * 8, batch_size=256, lr=3e-3, log_every=8, init_tokens=512),
        tmp_path / "run",
        device=DEVICE,
    )
    assert next(sae.parameters()).device.type == torch.device(DEVICE).type
    evals = []  # the same SAE evaluated on the device and, copied, on the CPU
    for m, s, device in ((dev, sae, DEVICE), (cpu, copy.deepcopy(sae).to("cpu"), "cpu")):
        batches = islice(StoreSource(stores[1], hook, device=device).batches(256, seed=1), 4)
        evals.append(evaluate_sae(s, batches, model=m, contexts=store_contexts(stores[1], 4)).to_dict())
    rec = evals[0]["reconstruction"]
    assert rec["l0"] <= 8 and rec["fvu"] < 0.5, rec
    for part in ("reconstruction", "downstream"):
        for key, value in evals[1][part].items():
            assert evals[0][part][key] == pytest.approx(value, rel=1e-3, abs=1e-4), (part, key)

    with dev.saes(sae, use_error_term=True) as spliced:  # the error term makes the splice exact
        logits, cache = spliced.run_with_cache(CLEAN, names=[f"{hook}.hook_sae_acts"])
    close(dev(CLEAN), logits, atol=1e-4, rtol=1e-4)
    assert (cache[f"{hook}.hook_sae_acts"] > 0).sum(-1).max() <= 8


def test_feature_database_matches_the_cpu(corpus, tmp_path):
    from mechscope.features import FeatureConfig, Neurons, build_features

    cpu, dev = pair("tiny-llama")
    cfg = FeatureConfig(
        n_tokens=1024, contexts=ContextConfig(context_length=32, seed=1), batch_size=4, top_k=5
    )
    dbs = [build_features(m, Neurons(0), corpus, cfg, tmp_path / f"db{i}") for i, m in enumerate((cpu, dev))]
    query = "SELECT id, density, mean, max FROM features ORDER BY id"
    a, b = (db.sql(query).to_pydict() for db in dbs)
    assert a["id"] == b["id"]
    for col in ("density", "mean", "max"):
        close(torch.tensor(a[col]), torch.tensor(b[col]), atol=1e-4, rtol=1e-3)


def test_steering_sweep_matches_the_cpu():
    from mechscope.steering import actadd
    from mechscope.steering.evaluate import SweepConfig, sweep

    cpu, dev = pair("tiny-llama")
    results = []
    for m in (cpu, dev):
        vectors = [actadd(m, "Love", "Hate", layer) for layer in (0, 1)]
        cfg = SweepConfig(coeffs=(1.0, 4.0), neutral=("The weather is mild today.",))
        results.append(sweep(m, vectors, ["I hate you because"], ["l", "h"], cfg=cfg))
    a, b = results
    assert a.forwards == b.forwards
    for name in ("effect", "kl", "delta_nll", "random_effect", "random_kl"):
        close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", WITH_MLP)
def test_rome_edit_works_and_undo_restores_the_bits_on_the_device(family, corpus, tmp_path):
    from mechscope.probes.rome import rome
    from tests.unit.probes.test_rome import CFG, PROMPT, SUBJECT, TARGET  # the tiny-model settings

    _, dev = pair(f"tiny-{family}")
    edit = rome(dev, PROMPT, SUBJECT, TARGET, CFG, corpus=corpus, cache_dir=tmp_path)
    target, text = dev.to_single_token(TARGET), edit.request.prompt
    before = {n: p.detach().clone() for n, p in dev.hf_model.named_parameters()}
    with edit:
        assert int(dev(text)[0, -1].argmax()) == target
    for n, p in dev.hf_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_probes_and_ccs_match_the_cpu():
    from mechscope.probes import CCSConfig, ProbeConfig, ccs_layers, datasets, probe_layers

    cpu, dev = pair("tiny-llama")
    data, pairs = datasets.sentiment(), datasets.sentiment_pairs()
    kw = dict(val_indices=data.val_indices, cfg=ProbeConfig(skip_constant=True))  # the last token: "."
    a, b = (probe_layers(m, data.texts, data.labels, **kw) for m in (cpu, dev))
    assert a.probes
    for name, p in a.probes.items():  # activations move to the CPU for fitting: the same fits
        close(p.weight, b.probes[name].weight, atol=1e-3, rtol=1e-2)
        assert p.val_score == pytest.approx(b.probes[name].val_score, abs=0.05)
    cfg = CCSConfig(n_restarts=2, epochs=50)
    c, d = (ccs_layers(m, pairs.pos, pairs.neg, pairs.labels, cfg=cfg) for m in (cpu, dev))
    for name, probe in c.items():
        assert probe.loss == pytest.approx(d[name].loss, rel=1e-2, abs=1e-4)
