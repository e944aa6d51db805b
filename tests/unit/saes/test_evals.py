"""SAE evaluation against independent computations: plain torch for FVU / L0 / density, plain
``transformers`` with a forward hook for the spliced CE loss, zero ablation and KL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mechscope as ms
from mechscope.saes.arch import make_sae
from mechscope.saes.evals import downstream_metrics, evaluate_sae, reconstruction_metrics
from mechscope.saes.sae import SAEConfig, init_b_dec, init_normalisation
from mechscope.viz.sae import density_histogram

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


def _sae(d: int, kind: str = "topk") -> torch.nn.Module:
    kw = {"k": 5} if kind == "topk" else {}
    sae = make_sae(SAEConfig(d_in=d, d_sae=4 * d, kind=kind, hook_name=HOOK, **kw))
    return sae


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_reconstruction_metrics_equal_plain_torch(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 24, generator=g) * 3 + 1
    sae = _sae(24, kind)
    init_normalisation(sae, x)
    init_b_dec(sae, x, "mean")
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=g))
    m = reconstruction_metrics(sae, x.split(128))  # 5 batches, the last partial
    with torch.no_grad():
        acts = sae.encode(x).double()
        recon = sae.decode(sae.encode(x)).double()
    xd = x.double()
    fvu = float(((recon - xd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
    assert m.n_tokens == 600
    assert m.fvu == pytest.approx(fvu, rel=1e-9)
    assert m.explained_variance == pytest.approx(1 - fvu, rel=1e-9)
    assert m.mse == pytest.approx(float(((recon - xd) ** 2).sum(-1).mean()), rel=1e-9)
    assert m.l0 == pytest.approx(float((acts > 0).sum(-1).double().mean()), rel=1e-12)
    density = (acts > 0).double().mean(0)
    torch.testing.assert_close(m.density.double(), density, rtol=1e-6, atol=1e-7)
    assert m.dead_fraction == pytest.approx(float((density == 0).double().mean()))
    assert m.dense_fraction == pytest.approx(float((density > 0.1).double().mean()))
    svg = density_histogram(m.density)
    assert svg.startswith("<svg") and "dead" in svg


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_evaluating_mid_training_leaves_the_sae_in_training_mode(llama, kind):
    sae = _sae(llama.cfg.d_model, kind)
    sae.train()
    x = torch.randn(64, llama.cfg.d_model)
    sae(x)  # a training step: BatchTopK learns its threshold
    reconstruction_metrics(sae, [x])
    assert sae.training
    downstream_metrics(llama, sae, [torch.randint(0, llama.cfg.d_vocab, (2, 8))])
    assert sae.training


def _hf_losses(model: ms.HookedModel, sae, tokens: torch.Tensor, keep: torch.Tensor):
    """Clean / spliced / zeroed CE and KL with plain transformers: a forward hook on decoder layer 1
    that edits every position except ``keep`` ``[batch pos]``."""
    layer = model.hf_model.model.layers[1]
    mode = {"fn": None}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if mode["fn"] is None:
            return None
        new = torch.where(keep[..., None], h, mode["fn"](h))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layer.register_forward_hook(hook)
    out = {}
    try:
        with torch.no_grad():
            for name, fn in [
                ("clean", None),
                ("sae", lambda h: sae.decode(sae.encode(h))),
                ("zero", torch.zeros_like),
            ]:
                mode["fn"] = fn
                out[name] = model.hf_model(input_ids=tokens).logits.double()
    finally:
        handle.remove()
    ce = {k: float(F.cross_entropy(v[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())) for k, v in out.items()}
    lp, lq = out["clean"][:, :-1].log_softmax(-1), out["sae"][:, :-1].log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    return ce, kl


@pytest.mark.parametrize("exclude_special", [True, False])
def test_downstream_metrics_equal_plain_transformers(llama, exclude_special):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, llama.cfg.d_vocab, (6, 12), generator=g)
    tokens[:, 0] = llama.tokenizer.bos_token_id  # BOS first, as in harvested contexts
    special = torch.isin(tokens, torch.tensor(llama.tokenizer.all_special_ids))
    _, cache = llama.run_with_cache(tokens, [HOOK])
    sae = _sae(llama.cfg.d_model)
    init_normalisation(sae, cache[HOOK].flatten(0, 1))
    m = downstream_metrics(llama, sae, tokens.split(4), exclude_special=exclude_special)
    ce, kl = _hf_losses(llama, sae, tokens, special if exclude_special else torch.zeros_like(special))
    assert m.n_tokens == 6 * 11
    assert m.ce_loss_clean == pytest.approx(ce["clean"], rel=1e-5)
    assert m.ce_loss_sae == pytest.approx(ce["sae"], rel=1e-5)
    assert m.ce_loss_zero == pytest.approx(ce["zero"], rel=1e-5)
    assert m.ce_loss_recovered == pytest.approx(
        (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4
    )
    assert m.kl == pytest.approx(kl, rel=1e-4)
    if not exclude_special:
        return
    ev = evaluate_sae(sae, [cache[HOOK].flatten(0, 1)], model=llama, contexts=tokens.split(3))
    d = ev.to_dict()
    assert d["downstream"]["ce_loss_sae"] == pytest.approx(ce["sae"], rel=1e-5)
    assert "density" not in d["reconstruction"]


def test_empty_inputs_are_refused(llama):
    sae = _sae(llama.cfg.d_model)
    with pytest.raises(ValueError, match="no rows"):
        reconstruction_metrics(sae, [])
    with pytest.raises(ValueError, match="no contexts"):
        downstream_metrics(llama, sae, [])
