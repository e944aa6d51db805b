"""Hooks: context manager semantics, bad input, and the common edits."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import mechscope as ms
from mechscope.models import edits
from tests.helpers import no_hooks_left, random_tokens


def test_hooks_nest_and_are_removed_even_on_error(tiny):
    tokens, seen = random_tokens(tiny), []
    with tiny.hooks({"blocks.0.hook_resid_post": lambda x, h: seen.append("outer")}):
        with tiny.hooks([("blocks.0.hook_resid_post", lambda x, h: seen.append("inner"))]):
            tiny(tokens)
        tiny(tokens)
    assert seen == ["outer", "inner", "outer"]

    def boom(x, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        with tiny.hooks({"blocks.0.attn.hook_pattern": boom, "blocks.1.hook_attn_out": lambda x, h: None}):
            tiny(tokens)
    assert no_hooks_left(tiny)
    assert tiny.hf_model.config._attn_implementation != "mechscope"


def test_a_dropped_model_is_freed_after_hooking():
    """Nothing global may keep a model alive: every loaded model used to leak, hooked or not."""
    model = ms.load_model("tiny-llama")
    ref = weakref.ref(model.hf_model)
    _, cache = model.run_with_cache(random_tokens(model))  # every point, attention internals included
    model.add_hook("blocks.0.hook_resid_mid", lambda x, h: None)
    model.reset_hooks()
    del model, cache
    gc.collect()
    assert ref() is None


def test_unknown_hook_name_lists_close_names_and_attaches_nothing(tiny):
    with pytest.raises(ms.models.UnknownHookError, match="blocks.0.hook_resid_post"):
        with tiny.hooks(
            {"blocks.0.hook_attn_out": lambda x, h: None, "blocks.0.hook_resid_pots": lambda x, h: None}
        ):
            pass
    assert no_hooks_left(tiny)


def test_wrong_shape_or_dtype_names_the_hook_and_both_shapes(tiny):
    tokens = random_tokens(tiny, batch=2, pos=5)
    with pytest.raises(
        ms.models.HookReturnError, match=r"blocks\.0\.hook_attn_out.*\(2, 5, 3\).*\(2, 5, 64\)"
    ):
        with tiny.hooks({"blocks.0.hook_attn_out": lambda x, h: x[..., :3]}):
            tiny(tokens)
    with pytest.raises(ms.models.HookReturnError, match="float16"):
        tiny.run_with_hooks(tokens, {"blocks.0.attn.hook_pattern": lambda x, h: x.half()})
    assert no_hooks_left(tiny)
    assert tiny.hf_model.config._attn_implementation != "mechscope"


def test_predicate_names_and_raw_module_paths(tiny):
    tokens, seen = random_tokens(tiny), []
    with tiny.hooks({lambda n: n.endswith("hook_resid_pre"): lambda x, h: seen.append(h.name)}):
        tiny(tokens)
    assert seen == [f"blocks.{i}.hook_resid_pre" for i in range(tiny.cfg.n_layers)]
    path = f"{tiny.adapter.layers}.0.{tiny.adapter.attn}"
    _, cache = tiny.run_with_cache(tokens, [path, "blocks.0.hook_attn_out"])
    if not tiny.cfg.post_norms:
        torch.testing.assert_close(cache[path], cache["blocks.0.hook_attn_out"])


def test_add_hook_and_reset(tiny):
    tokens = random_tokens(tiny)
    clean = tiny(tokens)
    tiny.add_hook("blocks.0.hook_resid_post", edits.zero(pos=0))
    assert not torch.equal(tiny(tokens), clean)
    tiny.reset_hooks()
    assert torch.equal(tiny(tokens), clean)
    assert no_hooks_left(tiny)


def test_a_removed_hook_is_let_go(tiny):
    """add_hook's remover must drop the function: a loop that adds and removes patches (each holding
    its tensors) used to keep every one alive until reset_hooks."""

    class Patch:
        def __call__(self, x, hook):
            return None

    patch = Patch()
    ref = weakref.ref(patch)
    remove = tiny.add_hook("blocks.0.hook_resid_post", patch)
    tiny(random_tokens(tiny))
    remove()
    del patch, remove
    gc.collect()
    assert ref() is None
    tiny.reset_hooks()  # still safe with nothing left to remove


def _seen_after(model, tokens, name, edit):
    seen = {}
    with model.hooks({name: edit}), model.hooks({name: lambda x, h: seen.setdefault("x", x)}):
        model(tokens)
    return seen["x"]


def test_edits_select_positions_heads_and_neurons(tiny):
    if not tiny.cfg.has_mlp:
        pytest.skip("attention-only: no neurons")
    tokens = random_tokens(tiny, batch=1, pos=6)
    _, cache = tiny.run_with_cache(tokens, ["blocks.0.mlp.hook_post", "blocks.0.attn.hook_z"])
    post, z = cache["blocks.0.mlp.hook_post"], cache["blocks.0.attn.hook_z"]
    new_post = _seen_after(tiny, tokens, "blocks.0.mlp.hook_post", edits.zero(pos=[1, 3], index=[5, 7]))
    assert torch.all(new_post[:, [1, 3]][:, :, [5, 7]] == 0)
    changed = (new_post != post).nonzero()[:, 1:].tolist()
    assert changed and all(p in (1, 3) and i in (5, 7) for p, i in changed)
    new_z = _seen_after(tiny, tokens, "blocks.0.attn.hook_z", edits.scale(0.0, pos=2, head=1))
    assert (
        torch.all(new_z[0, 2, 1] == 0)
        and torch.equal(new_z[0, 2, 0], z[0, 2, 0])
        and torch.equal(new_z[0, 1], z[0, 1])
    )
    with pytest.raises(ValueError, match="no head axis"):
        _seen_after(tiny, tokens, "blocks.0.hook_resid_post", edits.zero(head=1))


def test_replace_with_another_runs_activation_patches_only_the_selection(tiny):
    a, b = random_tokens(tiny, seed=1), random_tokens(tiny, seed=2)
    name = "blocks.0.hook_resid_post"
    _, cache_a = tiny.run_with_cache(a, [name])
    _, cache_b = tiny.run_with_cache(b, [name])
    seen = {}
    with (
        tiny.hooks({name: edits.replace(cache_b[name], pos=4)}),
        tiny.hooks({name: lambda x, h: seen.setdefault("x", x)}),
    ):
        tiny(a)
    torch.testing.assert_close(seen["x"][:, 4], cache_b[name][:, 4])
    torch.testing.assert_close(seen["x"][:, 3], cache_a[name][:, 3])
