"""Path patching equals two plain hooked forwards per sender, and the logits path equals the weights by hand."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mechscope as ms
from mechscope.interventions import metrics
from mechscope.interventions.path_patching import path_patch, path_patch_sweep
from mechscope.models import edits
from mechscope.models.adapters import adapters
from mechscope.models.adapters.base import get_module
from mechscope.models.tiny import byte_tokenizer

CLEAN, CORRUPT = ["the cat sat on", "a dog ran off!"], ["the car sat in", "a fog ran off?"]


@pytest.fixture(scope="module")
def deep() -> ms.HookedModel:
    """A 4-layer GQA Llama, so senders span several layers below a receiver."""
    tokenizer = byte_tokenizer()
    config = adapters()["llama"].tiny_config(vocab_size=len(tokenizer), num_hidden_layers=4)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        hf = AutoModelForCausalLM.from_config(config).requires_grad_(False)
    return ms.HookedModel(hf.eval(), tokenizer, adapters()["llama"], name="tiny-llama-4")


def _metric(model):
    return metrics.logit_diff(model.to_single_token("t"), model.to_single_token("r"))


def _reference(model, metric, senders, receivers, inputs, freeze_mlps=False, positions=None):
    """Forward 1: senders from CORRUPT, all other heads frozen to CLEAN, record the receivers' inputs.
    Forward 2: CLEAN with only those inputs patched. ``senders``: (layer, head) and ("mlp", layer)."""
    L = model.cfg.n_layers
    z = [f"blocks.{i}.attn.hook_z" for i in range(L)]
    mlp = [f"blocks.{i}.hook_mlp_out" for i in range(L)] if model.cfg.has_mlp else []
    _, base = model.run_with_cache(CLEAN, z + mlp)
    _, src = model.run_with_cache(CORRUPT, z + mlp)
    hooks = {}
    for i in range(L):
        heads = [s[1] for s in senders if s[0] == i]
        frozen = base[z[i]].clone()
        frozen[:, :, heads] = src[z[i]][:, :, heads]
        hooks[z[i]] = edits.replace(frozen)
        if mlp and ("mlp", i) in senders:
            hooks[mlp[i]] = edits.replace(src[mlp[i]])
        elif mlp and freeze_mlps:
            hooks[mlp[i]] = edits.replace(base[mlp[i]])
    if receivers == "logits" or isinstance(receivers, int):
        block = L if receivers == "logits" else receivers
        where = {f"blocks.{block - 1}.hook_resid_post": {}}
    else:
        layers = sorted({r[0] for r in receivers})
        where = {
            f"blocks.{layer}.attn.hook_{i}": {"head": [h for lay, h in receivers if lay == layer]}
            for layer in layers
            for i in inputs
        }
    record = {}
    with (
        model.hooks(hooks),
        model.hooks({n: lambda x, hook: record.__setitem__(hook.name, x) for n in where}),
    ):
        model(CLEAN)
    patches = {n: edits.replace(record[n], pos=positions, **kw) for n, kw in where.items()}
    with model.hooks(patches):
        return metric(model(CLEAN)).mean()


@pytest.mark.parametrize(
    "receivers,inputs,freeze_mlps",
    [
        ("logits", None, False),
        ("logits", None, True),
        (2, "resid", False),
        ([(3, 2)], "q", False),
        ([(2, 0), (3, 3)], ("k", "v"), True),
    ],
)
def test_head_sweep_equals_the_two_forward_loop(deep, receivers, inputs, freeze_mlps):
    metric = _metric(deep)
    # A small budget splits the sweep into chunks that start at different layers.
    result = path_patch_sweep(
        deep,
        CLEAN,
        CORRUPT,
        metric,
        receivers,
        inputs,
        freeze_mlps=freeze_mlps,
        memory_budget=3_000_000,
    )
    first = {"logits": 4, 2: 2}.get(receivers) if not isinstance(receivers, list) else receivers[0][0]
    assert result.axes == ("layer", "head") and result.values.shape == (4, 4)
    assert result.values[first:].isnan().all() and not result.values[:first].isnan().any()
    ref = torch.stack(
        [
            _reference(deep, metric, [(layer, h)], receivers, inputs or "", freeze_mlps)
            for layer in range(first)
            for h in range(4)
        ]
    )
    torch.testing.assert_close(result.values[:first].flatten(), ref, atol=1e-5, rtol=1e-5)
    assert result.clean == pytest.approx(float(metric(deep(CLEAN)).mean()), abs=1e-5)
    page = result.to_html()
    assert page.count("<tr>") == first + 1 and "http" not in page


def test_layer_sweep_and_positions_equal_the_loop(deep):
    metric = _metric(deep)
    result = path_patch_sweep(
        deep, CLEAN, CORRUPT, metric, [(3, 1)], "v", senders="layers", positions=[0, -1]
    )
    assert result.axes == ("layer", "component") and result.values.shape == (4, 2)
    ref = torch.stack(
        [
            _reference(deep, metric, s, [(3, 1)], "v", positions=[0, -1])
            for layer in range(3)
            for s in ([(layer, h) for h in range(4)], [("mlp", layer)])
        ]
    )
    torch.testing.assert_close(result.values[:3].flatten(), ref, atol=1e-5, rtol=1e-5)
    # The final residual at some positions only: step 3 runs instead of reusing step 2's logits
    # (a metric over every position tells the two apart).
    loss = metrics.next_token_loss(deep.to_tokens(CLEAN))
    single = path_patch(deep, CLEAN, CORRUPT, loss, [(1, 2), ("mlp", 0)], positions=[1, -2])
    ref = _reference(deep, loss, [(1, 2), ("mlp", 0)], "logits", None, positions=[1, -2])
    assert single.value == pytest.approx(float(ref), abs=1e-5)


def test_sweep_equals_the_loop_on_every_family(tiny):
    metric = _metric(tiny)
    L, H = tiny.cfg.n_layers, tiny.cfg.n_heads
    result = path_patch_sweep(tiny, CLEAN, CORRUPT, metric, [(L - 1, 1)], "k", memory_budget=2_000_000)
    ref = torch.stack(
        [
            _reference(tiny, metric, [(layer, h)], [(L - 1, 1)], "k")
            for layer in range(L - 1)
            for h in range(H)
        ]
    )
    torch.testing.assert_close(result.values[: L - 1].flatten(), ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_logits_path_equals_the_weights_by_hand(tiny):
    # With every other head and MLP frozen, the final residual is the base one plus the sender's
    # change through W_O (then the sublayer's post-norm, where the family has one).
    metric = _metric(tiny)
    layer, head = tiny.cfg.n_layers - 2, tiny.cfg.n_heads - 1
    got = path_patch(tiny, CLEAN, CORRUPT, metric, [(layer, head)], freeze_mlps=True)
    L, z = tiny.cfg.n_layers, f"blocks.{layer}.attn.hook_z"
    out = f"blocks.{layer}.hook_attn_out"
    _, base = tiny.run_with_cache(CLEAN, [z, out, f"blocks.{L - 1}.hook_resid_post"])
    _, src = tiny.run_with_cache(CORRUPT, [z])
    w = tiny.weights.blocks[layer]
    delta = (src[z] - base[z])[:, :, head] @ w.W_O[head]
    if tiny.cfg.post_norms:
        post_norm = get_module(tiny.layer(layer), tiny.adapter.attn_out)
        pre = torch.einsum("bphd,hdm->bpm", base[z], w.W_O) + w.b_O
        delta = post_norm(pre + delta) - base[out]
    resid = base[f"blocks.{L - 1}.hook_resid_post"] + delta
    logits = tiny.module(tiny.adapter.unembed)(tiny.module(tiny.adapter.final_norm)(resid))
    if tiny.cfg.final_logit_softcap:
        cap = tiny.cfg.final_logit_softcap
        logits = torch.tanh(logits / cap) * cap
    expected = metric(logits)
    torch.testing.assert_close(got.per_prompt, expected, atol=1e-4, rtol=1e-4)
    assert got.base == pytest.approx(float(metric(tiny(CLEAN)).mean()), abs=1e-5)
    assert got.source == pytest.approx(float(metric(tiny(CORRUPT)).mean()), abs=1e-5)


def test_denoise_swaps_base_and_source(deep):
    metric = _metric(deep)
    result = path_patch_sweep(deep, CLEAN, CORRUPT, metric, 3, direction="denoise")
    single = path_patch(deep, CORRUPT, CLEAN, metric, (1, 3), 3)
    assert float(result.values[1, 3]) == pytest.approx(single.value, abs=1e-5)
    assert (result.clean, result.corrupted) == pytest.approx((single.source, single.base), abs=1e-6)
    assert result.str_tokens == deep.to_str_tokens(deep.to_tokens(CORRUPT)[0])


def test_no_senders_give_the_base_metric(deep):
    metric = _metric(deep)
    for receivers, inputs in (("logits", None), ([(2, 1)], "v"), (2, "resid")):
        got = path_patch(deep, CLEAN, CORRUPT, metric, [], receivers, receiver_input=inputs)
        assert got.value == pytest.approx(got.base, abs=1e-5) and got.normalised == pytest.approx(
            1.0, abs=1e-5
        )


@torch.no_grad()
def test_paths_through_frozen_heads_do_not_leak(deep):
    # Head (0, 0) made to attend only to its own position: its z differs between the inputs at
    # position 1 alone, so it reaches the last position's logits only through later heads.
    sender = (0, 0)

    def self_only(pattern, hook):
        out = pattern.clone()
        out[:, sender[1]] = torch.eye(pattern.shape[-1], dtype=pattern.dtype)
        return out

    base, source = torch.tensor([[5, 40, 60, 70, 80, 90]]), torch.tensor([[5, 41, 60, 70, 80, 90]])
    metric = _metric(deep)
    z = "blocks.0.attn.hook_z"
    with deep.hooks({"blocks.0.attn.hook_pattern": self_only}):
        _, b = deep.run_with_cache(base, [z])
        _, s = deep.run_with_cache(source, [z])
        changed = (b[z] - s[z])[0, :, sender[1]].abs().amax(-1) > 0
        assert changed.tolist() == [False, True, False, False, False, False]
        plain = metric(deep(base))
        with deep.hooks({z: edits.replace(s[z], head=sender[1])}):
            through_later_heads = metric(deep(base))
        assert (through_later_heads - plain).abs().item() > 1e-3  # the indirect path is real
        for freeze in (False, True):
            got = path_patch(deep, base, source, metric, [sender], freeze_mlps=freeze)
            assert got.value == pytest.approx(float(plain), abs=1e-5)


def test_bad_inputs_are_clear(deep):
    metric = _metric(deep)
    with pytest.raises(ValueError, match="same token shape"):
        path_patch(deep, "short", "much longer text", metric, [(0, 0)])
    with pytest.raises(ValueError, match="not upstream"):
        path_patch(deep, CLEAN, CORRUPT, metric, [(2, 0)], [(2, 1)], receiver_input="q")
    with pytest.raises(ValueError, match="not upstream"):
        path_patch(deep, CLEAN, CORRUPT, metric, [("mlp", 2)], 2)
    with pytest.raises(ValueError, match="receiver_input must be one of"):
        path_patch(deep, CLEAN, CORRUPT, metric, [(0, 0)], [(2, 1)], receiver_input="z")
    with pytest.raises(ValueError, match="need receiver_input"):
        path_patch(deep, CLEAN, CORRUPT, metric, [(0, 0)], [(2, 1)])
    with pytest.raises(ValueError, match="receiver_input='resid'"):
        path_patch(deep, CLEAN, CORRUPT, metric, [(0, 0)], "logits", receiver_input="q")
    with pytest.raises(ValueError, match="bad sender"):
        path_patch(deep, CLEAN, CORRUPT, metric, [(0, 9)])
    with pytest.raises(ValueError, match="out of range"):
        path_patch(deep, CLEAN, CORRUPT, metric, [(0, 0)], positions=99)
    with pytest.raises(ValueError, match="no sender is upstream"):
        path_patch_sweep(deep, CLEAN, CORRUPT, metric, [(0, 1)], "v")
    with pytest.raises(ValueError, match="below one variant"):
        path_patch_sweep(deep, CLEAN, CORRUPT, metric, memory_budget=10)
