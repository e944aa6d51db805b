"""Every adapter against plain ``transformers``: the un-hooked forward bit for bit, every hook point
against the same edit made independently with plain PyTorch hooks on the HF modules, the eager
attention path against the fast kernel, and gradients against autograd on the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

import mechscope as ms
from mechscope.models import edits
from mechscope.models.adapters import adapters
from tests.helpers import no_hooks_left, random_tokens

# HF module names written out here, independently of the adapters, for the plain-torch references.
HF = {
    "llama": dict(
        layers="model.layers",
        o_proj="self_attn.o_proj",
        attn_out="self_attn",
        mlp_out="mlp",
        pre="mlp.gate_proj",
        post_in="mlp.down_proj",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        ln1="input_layernorm",
    ),
    "gemma2": dict(
        layers="model.layers",
        o_proj="self_attn.o_proj",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        pre="mlp.gate_proj",
        post_in="mlp.down_proj",
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
        ln1="input_layernorm",
    ),
    "gpt2": dict(
        layers="transformer.h",
        o_proj="attn.c_proj",
        attn_out="attn",
        mlp_out="mlp",
        pre="mlp.c_fc",
        post_in="mlp.c_proj",
        ln1="ln_1",
    ),
    "gpt_neox": dict(
        layers="gpt_neox.layers",
        o_proj="attention.dense",
        attn_out="attention",
        mlp_out="mlp",
        pre="mlp.dense_h_to_4h",
        post_in="mlp.dense_4h_to_h",
        ln1="input_layernorm",
    ),
}
HF["gemma3"] = HF["gemma2"]
HF["attn_only"] = dict(
    layers="transformer.h",
    o_proj="attn.o_proj",
    attn_out="attn",
    q="attn.q_proj",
    k="attn.k_proj",
    v="attn.v_proj",
    ln1="ln_1",
)

# Attention variants beyond each family's default tiny config: MHA / MQA / GQA, and look-alike families.
VARIANTS = [(name, {}) for name in sorted(adapters())] + [
    ("llama", dict(num_key_value_heads=4)),  # MHA
    ("llama", dict(num_key_value_heads=1)),  # MQA
    ("llama", dict(model_type_override="mistral")),
    ("llama", dict(model_type_override="qwen2")),
]


def build(family: str, overrides: dict) -> ms.HookedModel:
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from mechscope.models.hooked import HookedModel
    from mechscope.models.tiny import byte_tokenizer

    overrides = dict(overrides)
    kind = overrides.pop("model_type_override", None)
    adapter = adapters()[family]
    if kind == "mistral":
        config = MistralConfig(**adapter.tiny_config().to_dict() | dict(model_type="mistral"))
    elif kind == "qwen2":
        config = Qwen2Config(
            **{k: v for k, v in adapter.tiny_config().to_dict().items() if k != "model_type"}
        )
    else:
        config = adapter.tiny_config(**overrides)
    torch.manual_seed(0)
    return HookedModel(AutoModelForCausalLM.from_config(config).eval(), byte_tokenizer(), adapters()[family])


@pytest.fixture(
    scope="module", params=VARIANTS, ids=lambda v: v[0] + "".join(f"-{k}={x}" for k, x in v[1].items())
)
def model(request) -> ms.HookedModel:
    return build(*request.param)


def hf(model: ms.HookedModel, layer: int, key: str) -> torch.nn.Module:
    names = HF[model.cfg.family]
    return model.hf_model.get_submodule(names["layers"])[layer].get_submodule(names[key])


def plain_logits(model, tokens, hooks=()):
    """Logits of the HF model with plain torch hooks ``[(module, kind, fn)]``."""
    handles = [
        m.register_forward_hook(fn) if kind == "out" else m.register_forward_pre_hook(fn)
        for m, kind, fn in hooks
    ]
    try:
        with torch.no_grad():
            return model.hf_model(input_ids=tokens).logits
    finally:
        for h in handles:
            h.remove()


def test_unhooked_forward_is_bit_exact(model):
    tokens = random_tokens(model)
    assert torch.equal(model(tokens), plain_logits(model, tokens))


def test_reading_every_point_outside_attention_keeps_bit_exact_logits(model):
    tokens = random_tokens(model)
    names = [
        n
        for n in model.hook_names
        if not n.endswith(("hook_q", "hook_k", "hook_v", "attn_scores", "pattern"))
    ]
    logits, cache = model.run_with_cache(tokens, names)
    assert torch.equal(logits, plain_logits(model, tokens))
    assert set(cache) == set(names)


def test_eager_attention_path_agrees_with_fast_kernel(model):
    tokens = random_tokens(model)
    logits, cache = model.run_with_cache(tokens, lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(logits, plain_logits(model, tokens), atol=1e-5, rtol=1e-5)
    assert model.hf_model.config._attn_implementation != "mechscope"  # switched back
    assert no_hooks_left(model)


def test_patterns_equal_transformers_own_eager_attention(model):
    """mechscope's eager path (KV heads shared by stacking their query heads, softmax in place)
    against HF's eager implementation returning its attention weights, on a left-padded batch."""
    if model.cfg.family == "attn_only":
        pytest.skip("mechscope's own toy model: it does not return attention weights")
    tokens = random_tokens(model, batch=2)
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    _, cache = model.run_with_cache(tokens, lambda n: n.endswith("hook_pattern"), attention_mask=mask)
    # A copy: HF records attention weights with forward hooks that it leaves on the modules.
    reference = copy.deepcopy(model.hf_model)
    reference.config._attn_implementation = "eager"
    with torch.no_grad():
        out = reference(
            input_ids=tokens,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            output_attentions=True,
        )
    assert len(out.attentions) == model.cfg.n_layers
    for layer, expected in enumerate(out.attentions):
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_pattern"], expected, atol=1e-6, rtol=1e-5)


def test_soft_capped_attention_never_runs_on_sdpa():
    """SDPA cannot soft-cap scores (transformers 5.17 dropped Gemma 2's cap there silently, later
    versions raise): a model handed over on SDPA runs HF's eager kernel, which applies the cap."""
    from transformers import AutoModelForCausalLM

    from mechscope.models.hooked import HookedModel
    from mechscope.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(adapters()["gemma2"].tiny_config(attn_logit_softcapping=0.5))
    reference = copy.deepcopy(hf_model.eval())
    reference.config._attn_implementation = "eager"
    uncapped = copy.deepcopy(reference)
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    hf_model.config._attn_implementation = "sdpa"
    model = HookedModel(hf_model, byte_tokenizer(), adapters()["gemma2"])
    tokens = random_tokens(model)
    with torch.no_grad():
        expected, without_cap = (m(input_ids=tokens).logits for m in (reference, uncapped))
    assert not torch.allclose(expected, without_cap, atol=1e-3)  # the cap matters here
    torch.testing.assert_close(model(tokens), expected, atol=0, rtol=0)


def test_every_hook_point_has_tl_shape(model):
    tokens = random_tokens(model, batch=2, pos=7)
    _, cache = model.run_with_cache(tokens)
    c = model.cfg
    for name, t in cache.items():
        point = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        expected = {
            "attn.hook_q": (2, 7, c.n_heads, c.d_head),
            "attn.hook_k": (2, 7, c.n_heads, c.d_head),
            "attn.hook_v": (2, 7, c.n_heads, c.d_head),
            "attn.hook_z": (2, 7, c.n_heads, c.d_head),
            "attn.hook_pattern": (2, c.n_heads, 7, 7),
            "attn.hook_attn_scores": (2, c.n_heads, 7, 7),
            "mlp.hook_pre": (2, 7, c.d_mlp),
            "mlp.hook_pre_linear": (2, 7, c.d_mlp),
            "mlp.hook_post": (2, 7, c.d_mlp),
            "unembed.hook_out": (2, 7, c.d_vocab),
        }.get(point, (2, 7, c.d_model))
        if name == "hook_pos_embed":  # positions are shared by the batch, as HF computes them
            expected = (1, 7, c.d_model)
        assert tuple(t.shape) == expected, name


@pytest.mark.parametrize("point", ["hook_resid_pre", "hook_resid_mid"])
def test_transplanting_the_residual_gives_the_donor_logits_exactly(model, point):
    if f"blocks.1.{point}" not in model.hook_names:
        pytest.skip("no resid_mid: parallel attention+MLP, or attention-only")
    a, b = random_tokens(model, seed=1), random_tokens(model, seed=2)
    name = f"blocks.1.{point}"
    logits_b, cache_b = model.run_with_cache(b, [name])
    with model.hooks({name: lambda x, hook: cache_b[name]}):
        patched = model(a)
    assert torch.equal(patched, logits_b)
    assert not torch.equal(model(a), logits_b)


def test_z_head_edit_equals_editing_the_output_projection_input(model):
    tokens, h, d = random_tokens(model), 1, model.cfg.d_head

    def by_hand(module, args):
        x = args[0].clone()
        x[..., h * d : (h + 1) * d] *= 3.0
        return (x,)

    expected = plain_logits(model, tokens, [(hf(model, 0, "o_proj"), "pre", by_hand)])
    with model.hooks({"blocks.0.attn.hook_z": edits.scale(3.0, head=h)}):
        got = model(tokens)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "point,key,kind",
    [
        ("hook_attn_out", "attn_out", "out"),
        ("hook_mlp_out", "mlp_out", "out"),
        ("mlp.hook_pre", "pre", "out"),
        ("mlp.hook_post", "post_in", "pre"),
    ],
)
def test_sublayer_edits_equal_plain_torch_hooks(model, point, key, kind):
    if key not in HF[model.cfg.family]:
        pytest.skip("attention-only: no MLP")
    tokens = random_tokens(model)
    g = torch.Generator().manual_seed(3)
    size = model.cfg.d_mlp if point.startswith("mlp.") else model.cfg.d_model
    vec = torch.randn(size, generator=g)

    def by_hand_out(module, args, out):
        first = out[0] if isinstance(out, tuple) else out
        first = first.clone()
        first[:, 2] = first[:, 2] + vec
        return (first, *out[1:]) if isinstance(out, tuple) else first

    def by_hand_pre(module, args):
        x = args[0].clone()
        x[:, 2] = x[:, 2] + vec
        return (x, *args[1:])

    expected = plain_logits(
        model, tokens, [(hf(model, 1, key), kind, by_hand_out if kind == "out" else by_hand_pre)]
    )
    with model.hooks({f"blocks.1.{point}": edits.add(vec, pos=2)}):
        got = model(tokens)
    assert torch.equal(got, expected)


def _kv_proj_edit(model, which: str, kv_head: int, factor: float):
    """A plain hook scaling one kv head's k or v projection output, for each family's layout."""
    c, fam = model.cfg, model.cfg.family
    d = c.d_head

    def on_separate(module, args, out):
        out = out.clone()
        out[..., kv_head * d : (kv_head + 1) * d] *= factor
        return out

    if "v" in HF[fam]:  # separate q/k/v projections
        return hf(model, 0, which), on_separate
    if fam == "gpt2":
        offset = {"q": 0, "k": 1, "v": 2}[which] * c.d_model

        def on_fused(module, args, out):
            out = out.clone()
            out[..., offset + kv_head * d : offset + (kv_head + 1) * d] *= factor
            return out

        return model.hf_model.get_submodule("transformer.h")[0].attn.c_attn, on_fused
    offset = {"q": 0, "k": 1, "v": 2}[which]

    def on_neox(module, args, out):
        out = out.clone()
        start = kv_head * 3 * d + offset * d
        out[..., start : start + d] *= factor
        return out

    return model.hf_model.get_submodule("gpt_neox.layers")[0].attention.query_key_value, on_neox


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_qkv_edits_equal_editing_the_projection(model, which):
    if which in ("q", "k") and model.cfg.family == "gemma3":
        pytest.skip("Gemma 3 normalises q and k after the projection, so a projection edit is not a q/k edit")
    tokens, c = random_tokens(model), model.cfg
    n_rep = c.n_heads // c.n_kv_heads
    kv_head = 1 % c.n_kv_heads
    # Scaling is exact through rotary; scale every query head that shares this kv head.
    heads = [kv_head] if which == "q" else list(range(kv_head * n_rep, (kv_head + 1) * n_rep))
    module, fn = _kv_proj_edit(model, which, kv_head, 2.0)
    expected = plain_logits(model, tokens, [(module, "out", fn)])
    with model.hooks({f"blocks.0.attn.hook_{which}": edits.scale(2.0, head=heads)}):
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_pattern_replacement_equals_mixing_values_by_hand(model):
    """Replacing a head's pattern with P must make its z equal P @ v, computed from the HF modules."""
    if "v" not in HF[model.cfg.family]:
        pytest.skip("the by-hand value computation below is written for separate v projections")
    tokens, c, h = random_tokens(model, batch=1, pos=6), model.cfg, 2
    n_rep = c.n_heads // c.n_kv_heads
    P = torch.tril(torch.rand(6, 6, generator=torch.Generator().manual_seed(5)))
    P = P / P.sum(-1, keepdim=True)
    captured = {}
    v_proj = hf(model, 0, "v")
    handle = v_proj.register_forward_hook(lambda m, a, o: captured.__setitem__("v", o))
    try:
        plain_logits(model, tokens)
    finally:
        handle.remove()
    v = captured["v"].unflatten(-1, (c.n_kv_heads, c.d_head))[0, :, h // n_rep]  # [pos d_head]
    z_h = P @ v

    def by_hand(module, args):
        x = args[0].clone()
        x[0, :, h * c.d_head : (h + 1) * c.d_head] = z_h
        return (x,)

    expected = plain_logits(model, tokens, [(hf(model, 0, "o_proj"), "pre", by_hand)])
    with model.hooks({"blocks.0.attn.hook_pattern": edits.replace(P, head=h)}):
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_scores_and_pattern_are_consistent(model):
    _, cache = model.run_with_cache(random_tokens(model), lambda n: "attn_scores" in n or "pattern" in n)
    for layer in range(model.cfg.n_layers):
        scores, pattern = (
            cache[f"blocks.{layer}.attn.hook_attn_scores"],
            cache[f"blocks.{layer}.attn.hook_pattern"],
        )
        torch.testing.assert_close(scores.softmax(-1), pattern)
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
        assert torch.all(pattern.triu(1) == 0)  # causal


def test_a_scores_replacement_is_not_overwritten_by_the_softmax(model):
    tokens = random_tokens(model)
    name = "blocks.0.attn.hook_attn_scores"
    _, cache = model.run_with_cache(tokens, name)
    mine = cache[name].clone()
    mine[..., 0, 0] += 1.0
    before = mine.clone()
    with model.hooks({name: lambda x, hook: mine}):
        model(tokens)
    assert torch.equal(mine, before)


def test_gradients_match_autograd_on_the_plain_model(model):
    tokens, target = random_tokens(model, batch=1), 7
    metric = lambda logits: logits[0, -1, target] - logits[0, -1].mean()  # noqa: E731
    run = model.run_with_grads(
        tokens, metric, ["blocks.1.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.attn.hook_v"]
    )

    leaf = {}

    def make_leaf(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        leaf["x"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    layer1 = model.hf_model.get_submodule(HF[model.cfg.family]["layers"])[1]
    h = layer1.register_forward_pre_hook(make_leaf, with_kwargs=True)
    try:
        with torch.enable_grad():
            value = metric(model.hf_model(input_ids=tokens).logits)
            (expected,) = torch.autograd.grad(value, [leaf["x"]])
    finally:
        h.remove()
    torch.testing.assert_close(run.metric, value.detach())
    torch.testing.assert_close(run.grads["blocks.1.hook_resid_pre"], expected, atol=1e-6, rtol=1e-5)
    assert run.grads["blocks.0.attn.hook_z"].abs().sum() > 0
    assert run.grads["blocks.0.attn.hook_v"].shape == run.cache["blocks.0.attn.hook_v"].shape
    assert no_hooks_left(model)
