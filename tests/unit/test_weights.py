"""Weights in TransformerLens form: views onto HF parameters that rebuild what the model computes."""

from __future__ import annotations

import torch

import mechscope as ms
from tests.helpers import random_tokens


def test_weight_views_share_storage_with_the_model(tiny):
    w, c = tiny.weights.blocks[0], tiny.cfg
    assert w.W_Q.shape == (c.n_heads, c.d_model, c.d_head) and w.W_O.shape == (c.n_heads, c.d_head, c.d_model)
    assert w.W_K.shape == (c.n_heads, c.d_model, c.d_head) and w.W_K_kv.shape == (
        c.n_kv_heads,
        c.d_model,
        c.d_head,
    )
    params = {p.untyped_storage().data_ptr() for p in tiny.hf_model.parameters()}
    views = [w.W_Q, w.W_K_kv, w.W_V_kv, w.W_O, tiny.weights.W_E, tiny.weights.W_U]
    if c.has_mlp:
        assert w.W_in.shape == (c.d_model, c.d_mlp) and w.W_out.shape == (c.d_mlp, c.d_model)
        views += [w.W_in, w.W_out]
    else:
        assert w.W_in is None and w.ln2_w is None
    for t in views:
        assert t.untyped_storage().data_ptr() in params
    assert tiny.weights.W_Q.shape == (c.n_layers, c.n_heads, c.d_model, c.d_head)


def test_weights_rebuild_the_model_computation(tiny):
    names = [
        "blocks.0.ln1.hook_normalized",
        "blocks.0.attn.hook_v",
        "blocks.0.attn.hook_z",
        "blocks.0.hook_attn_out",
    ]
    if tiny.cfg.has_mlp:
        names += [
            "blocks.0.ln2.hook_normalized",
            "blocks.0.mlp.hook_pre",
            "blocks.0.mlp.hook_post",
            "blocks.0.hook_mlp_out",
        ]
    _, cache = tiny.run_with_cache(random_tokens(tiny), names)
    w = tiny.weights.blocks[0]
    x = cache["blocks.0.ln1.hook_normalized"]
    v = torch.einsum("bpm,hmd->bphd", x, w.W_V) + w.b_V
    torch.testing.assert_close(v, cache["blocks.0.attn.hook_v"], atol=1e-5, rtol=1e-5)
    if tiny.cfg.has_mlp:
        pre = cache["blocks.0.ln2.hook_normalized"] @ (w.W_gate if w.W_gate is not None else w.W_in) + w.b_in
        torch.testing.assert_close(pre, cache["blocks.0.mlp.hook_pre"], atol=1e-5, rtol=1e-5)
    if tiny.cfg.has_mlp and not tiny.cfg.post_norms:
        out = cache["blocks.0.mlp.hook_post"] @ w.W_out + w.b_out
        torch.testing.assert_close(out, cache["blocks.0.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    if not tiny.cfg.post_norms:
        attn = torch.einsum("bphd,hdm->bpm", cache["blocks.0.attn.hook_z"], w.W_O) + w.b_O
        torch.testing.assert_close(attn, cache["blocks.0.hook_attn_out"], atol=1e-5, rtol=1e-5)


def test_folded_weights_read_the_unscaled_normalised_residual(tiny):
    _, cache = tiny.run_with_cache(
        random_tokens(tiny),
        [
            "blocks.0.hook_resid_pre",
            "blocks.0.attn.hook_v",
            "ln_final.hook_normalized",
            f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post",
            "unembed.hook_out",
        ],
    )
    folded = ms.fold_norms(tiny.weights)

    def normalise(x):
        if tiny.cfg.norm == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return (
            x
            / (
                x.pow(2).mean(-1, keepdim=True) + 1e-5
                if tiny.cfg.norm == "layernorm"
                else x.pow(2).mean(-1, keepdim=True) + 1e-6
            ).sqrt()
        )

    x = normalise(cache["blocks.0.hook_resid_pre"])
    v = torch.einsum("bpm,hmd->bphd", x, folded.blocks[0].W_V) + folded.blocks[0].b_V
    torch.testing.assert_close(v, cache["blocks.0.attn.hook_v"], atol=1e-4, rtol=1e-4)
    final = normalise(cache[f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"])
    torch.testing.assert_close(
        final @ folded.W_U + folded.b_U, cache["unembed.hook_out"], atol=1e-4, rtol=1e-4
    )
    embed = tiny.weights.W_E * tiny.cfg.embed_scale
    torch.testing.assert_close(folded.W_E, embed)
