"""Splicing SAEs into tiny models, checked against plain hooks that do the same thing by hand.

With the error term the logits are the un-spliced model's bit for bit; without it they equal a
manual hook that writes ``decode(encode(x))``; latent edits through ``model.hooks`` equal the manual
edit of the reconstruction; gradients through the latents are ``W_dec`` times the downstream ones.
"""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.interventions.ablation import mean_activations
from mechscope.models import edits
from mechscope.models.errors import UnknownHookError
from mechscope.saes.arch import make_sae
from mechscope.saes.sae import IncompatibleSAEError, SAEConfig, init_b_dec, init_normalisation
from mechscope.saes.splice import sae_point_names, splice

RESID = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


def _tokens(model, n=2, length=9) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(3))


def _sae(model, hook: str, kind: str = "relu", d_sae: int = 96, out_hook: str | None = None):
    """An SAE (or transcoder) normalised and centred on the model's own activations, so latents fire."""
    names = [hook] + ([out_hook] if out_hook else [])
    _, cache = model.run_with_cache(_tokens(model, 4, 12), names)
    x = cache[hook].flatten(2).reshape(-1, cache[hook].flatten(2).shape[-1])
    y = cache[out_hook].reshape(-1, cache[out_hook].shape[-1]) if out_hook else x
    cfg = SAEConfig(
        d_in=x.shape[-1],
        d_sae=d_sae,
        kind=kind,
        k=8 if "topk" in kind else None,
        hook_name=hook,
        out_hook_name=out_hook,
        d_out=y.shape[-1],
    )
    sae = make_sae(cfg)
    init_normalisation(sae, x, y if out_hook else None)
    init_b_dec(sae, y)
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    return sae.eval().requires_grad_(False)


@torch.no_grad()
def test_error_term_gives_the_unspliced_logits_exactly(tiny):
    toks = _tokens(tiny)
    clean = tiny(toks)
    for hook in (RESID, "blocks.1.attn.hook_z"):
        sae = _sae(tiny, hook, kind="topk")
        acts_name = sae_point_names(sae)["acts"]
        with splice(tiny, sae, use_error_term=True):
            assert torch.equal(tiny(toks), clean)
            logits, cache = tiny.run_with_cache(toks, [acts_name, sae_point_names(sae)["error"]])
            assert torch.equal(logits, clean)  # the SAE ran (its points are cached) and changed nothing
            with tiny.hooks({acts_name: lambda a, hook: a.clone()}):
                assert torch.equal(tiny(toks), clean)
        assert cache[acts_name].shape == (*toks.shape, 96)
        assert ((cache[acts_name] != 0).sum(-1) == 8).all()


@torch.no_grad()
def test_without_error_term_the_activation_is_the_reconstruction(model):
    toks = _tokens(model)
    sae = _sae(model, RESID)
    clean = model(toks)
    with splice(model, sae):
        spliced = model(toks)
    with model.hooks({RESID: lambda x, hook: sae.decode(sae.encode(x))}):
        manual = model(toks)
    assert torch.equal(spliced, manual)
    assert (spliced - clean).abs().max() > 1e-3

    def by_hand(x, hook):  # the same from the raw weights
        s = sae.input_scale
        acts = ((x * s - sae.b_dec) @ sae.W_enc + sae.b_enc).clamp(min=0)
        return (acts @ sae.W_dec + sae.b_dec) / s

    with model.hooks({RESID: by_hand}):
        torch.testing.assert_close(model(toks), spliced, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_cached_latents_are_the_sae_code_of_the_clean_activation(model):
    toks = _tokens(model)
    sae = _sae(model, RESID)
    names = sae_point_names(sae)
    _, clean = model.run_with_cache(toks, [RESID])
    with splice(model, sae, use_error_term=True):
        _, cache = model.run_with_cache(toks, list(names.values()))
    acts = sae.encode(clean[RESID])
    assert torch.equal(cache[names["acts"]], acts)
    assert torch.equal(cache[names["recons"]], sae.decode(acts))
    assert torch.equal(cache[names["error"]], clean[RESID] - sae.decode(acts))
    # other tools read the new points too: mean ablation's means over the latents
    with splice(model, sae, use_error_term=True):
        means = mean_activations(model, toks, [names["acts"]])
    torch.testing.assert_close(means[names["acts"]], acts.reshape(-1, 96).mean(0))


@torch.no_grad()
def test_ablating_one_latent_equals_the_manual_edit(model):
    toks = _tokens(model)
    sae = _sae(model, RESID)
    acts_name = sae_point_names(sae)["acts"]
    _, clean_cache = model.run_with_cache(toks, [RESID])
    j = int((sae.encode(clean_cache[RESID]) > 0).sum((0, 1)).argmax())  # the latent active most often
    clean = model(toks)

    with splice(model, sae, use_error_term=True), model.hooks({acts_name: edits.zero(index=j)}):
        ablated = model(toks)

    def remove_latent(x, hook):  # x + decode(acts without j) - decode(acts) = x - a_j W_dec_j / s
        a_j = sae.encode(x)[..., j : j + 1]
        return x - a_j * sae.W_dec[j] / sae.output_scale

    with model.hooks({RESID: remove_latent}):
        manual = model(toks)
    torch.testing.assert_close(ablated, manual, atol=1e-5, rtol=1e-5)
    assert (ablated - clean).abs().max() > 1e-3

    def zero_in_code(x, hook):
        a = sae.encode(x)
        a[..., j] = 0
        return sae.decode(a)

    with splice(model, sae), model.hooks({acts_name: edits.zero(index=j)}):
        ablated_no_error = model(toks)
    with model.hooks({RESID: zero_in_code}):
        assert torch.equal(ablated_no_error, model(toks))


def test_gradients_through_the_latents(model):
    toks = _tokens(model)
    sae = _sae(model, RESID)
    acts_name = sae_point_names(sae)["acts"]

    def metric(logits):
        return logits[:, -1, :5].sum()

    clean = model.run_with_grads(toks, metric, [RESID, "hook_embed"])
    with splice(model, sae, use_error_term=True):
        spliced = model.run_with_grads(toks, metric, [acts_name, "hook_embed"])
    assert torch.equal(spliced.metric, clean.metric)
    # d metric / d latents = (d metric / d activation) @ d recon / d latents
    expected = clean.grads[RESID] @ sae.W_dec.T / sae.output_scale
    torch.testing.assert_close(spliced.grads[acts_name], expected, atol=1e-5, rtol=1e-4)
    assert spliced.grads[acts_name].abs().max() > 1e-4
    # the error term makes the splice the identity, so upstream gradients are unchanged
    torch.testing.assert_close(spliced.grads["hook_embed"], clean.grads["hook_embed"], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_transcoder_reads_one_point_and_writes_another(model):
    toks = _tokens(model)
    src, dst = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
    tc = _sae(model, src, kind="jumprelu", out_hook=dst)
    names = sae_point_names(tc)
    assert names == {
        "acts": f"{src}.hook_sae_acts",
        "recons": f"{dst}.hook_sae_recons",
        "error": f"{dst}.hook_sae_error",
    }
    clean = model(toks)
    with splice(model, tc):
        spliced = model(toks)
    seen = {}
    manual = {src: lambda x, hook: seen.update(x=x), dst: lambda y, hook: tc.decode(tc.encode(seen["x"]))}
    with model.hooks(manual):
        assert torch.equal(spliced, model(toks))
    assert (spliced - clean).abs().max() > 1e-3
    with splice(model, tc, use_error_term=True):
        _, cache = model.run_with_cache(toks, [names["acts"], names["error"]])
        assert torch.equal(model(toks), clean)
    assert cache[names["acts"]].shape == (*toks.shape, 96)


@torch.no_grad()
def test_per_head_points_are_flattened_and_several_saes_splice_at_once(model):
    toks = _tokens(model)
    z = "blocks.1.attn.hook_z"
    sae_z, sae_r = _sae(model, z, kind="topk"), _sae(model, RESID, kind="batchtopk")
    with torch.no_grad():
        sae_r.threshold.fill_(0.1)
    sae_r.train()  # spliced SAEs run in eval mode: BatchTopK codes each token with its threshold
    with splice(model, sae_z, sae_r):
        spliced = model(toks)
    assert sae_r.training
    sae_r.eval()

    def z_manual(x, hook):
        return sae_z.decode(sae_z.encode(x.flatten(2))).reshape(x.shape)

    with model.hooks({z: z_manual, RESID: lambda x, hook: sae_r.decode(sae_r.encode(x))}):
        assert torch.equal(spliced, model(toks))


@torch.no_grad()
def test_points_are_registered_in_forward_order_and_removed_after(model):
    before = model.hook_names
    sae = _sae(model, RESID)
    with splice(model, sae, use_error_term=True):
        names = model.hook_names
        i = names.index(RESID)
        assert names[i + 1 : i + 4] == [f"{RESID}.hook_sae_{p}" for p in ("acts", "recons", "error")]
        assert names[i + 4] == before[before.index(RESID) + 1]
        assert model.hook_point(f"{RESID}.hook_sae_acts").layer == 0
    with splice(model, sae):  # no error point without the error term
        assert f"{RESID}.hook_sae_error" not in model.hook_names
    assert model.hook_names == before
    assert not any(model.hook_point(n).active for n in model.hook_names)
    with pytest.raises(UnknownHookError, match="hook_sae_acts"):
        with model.hooks({f"{RESID}.hook_sae_acts": lambda x, hook: None}):
            pass


def test_bad_splices_are_refused_before_anything_attaches(model):
    before = model.hook_names
    sae = _sae(model, RESID)

    def cfg(**over):
        return SAEConfig(**{"d_in": 64, "d_sae": 16, "kind": "relu", "hook_name": RESID, **over})

    cases = [
        ((make_sae(cfg(d_in=32)),), IncompatibleSAEError, "is 64 wide but the SAE expects 32"),
        ((make_sae(cfg(hook_name="blocks.7.hook_resid_post")),), UnknownHookError, "unknown hook point"),
        ((make_sae(cfg(hook_name="blocks.0.attn.hook_pattern")),), IncompatibleSAEError, "not one vector"),
        ((make_sae(cfg(hook_name="")),), IncompatibleSAEError, "names no hook point"),
        ((sae, sae), ValueError, "one per point"),
        (
            (make_sae(cfg(hook_name="blocks.1.hook_resid_pre", out_hook_name="blocks.0.hook_attn_out")),),
            ValueError,
            "comes after",
        ),
        ((), ValueError, "at least one SAE"),
    ]
    for saes, error, message in cases:
        with pytest.raises(error, match=message):
            with splice(model, *saes):
                pass
        assert model.hook_names == before
        assert not any(model.hook_point(n).active for n in model.hook_names)


@torch.no_grad()
def test_generation_with_an_exact_splice_is_unchanged(model):
    sae = _sae(model, RESID)
    clean = model.generate("the cat", max_new_tokens=6)
    with splice(model, sae, use_error_term=True):
        assert model.generate("the cat", max_new_tokens=6) == clean
        seen = []
        with model.hooks({f"{RESID}.hook_sae_acts": lambda a, hook: seen.append(a.shape)}):
            model.generate("the cat", max_new_tokens=3)
    assert seen[0][-1] == 96 and seen[-1][1] == 1  # prompt, then one position per cached step
