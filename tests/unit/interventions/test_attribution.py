"""Attribution patching is the derivative of real patching; a whole sweep costs three passes; compare."""

from __future__ import annotations

import math

import pytest
import torch

import mechscope as ms
from mechscope.interventions import metrics
from mechscope.interventions.attribution import (
    attribution_patch,
    attribution_patch_all,
    compare,
)
from mechscope.interventions.patching import PatchResult, patch_sweep

CLEAN, CORRUPT = (
    ["the cat sat", "a dog ran!!"],
    ["the car sat", "a fog ran!!"],
)  # one length: metrics read pos -1


@pytest.fixture(scope="module")
def model64() -> ms.HookedModel:
    # float64 so that finite differences converge. GPT-2 computes every op in float64; Llama's RMSNorm and
    # the eager attention's softmax (both as in HF) compute in float32, which sets a noise floor.
    model = ms.load_model("tiny-gpt2", dtype=torch.float64)
    assert model.dtype == torch.float64
    return model


@pytest.fixture(scope="module")
def gqa64() -> ms.HookedModel:
    return ms.load_model("tiny-llama", dtype=torch.float64)  # grouped-query: k/v per query head


def _metric(model):
    return metrics.logit_diff(model.to_single_token("t"), model.to_single_token("r"))


def _cells(result: PatchResult):
    return torch.cartesian_prod(*(torch.arange(n) for n in result.values.shape)).view(-1, result.values.ndim)


def _selection(point: str, per: str, cell: list[int]) -> tuple:
    """Index of a cell in a ``[batch ...]`` activation, written out independently of the sweep code."""
    if per == "pos":
        return (slice(None), cell[1])
    if point == "pattern":  # [batch head q_pos k_pos]
        return (slice(None), cell[1]) if per == "head" else (slice(None), cell[1], cell[2])
    return (slice(None), slice(None), cell[1]) if per == "head" else (slice(None), cell[2], cell[1])


def _hook(point: str, per: str, layer: int) -> str:
    return f"blocks.{layer}.hook_{point}" if per == "pos" else f"blocks.{layer}.attn.hook_{point}"


def _finite_difference(model, point, per, cell, base, src, metric, eps) -> float:
    """d/ds of the metric when the cell is patched to ``base + s * (source - base)``, by plain hooks."""
    hook, sel = _hook(point, per, cell[0]), _selection(point, per, cell)

    def run(s: float) -> float:
        def fn(x, h):
            y = x.clone()
            y[sel] = x[sel] + s * (src[hook][sel] - x[sel])
            return y

        with model.hooks({hook: fn}):
            return float(metric(model(base)).mean())

    return (run(eps) - run(-eps)) / (2 * eps)


# (point, per, direction, eps, atol): points inside attention pass a float32 softmax, so a larger step.
CASES = [
    ("resid_pre", "pos", "denoise", 1e-4, 1e-8),
    ("resid_mid", "pos", "noise", 1e-4, 1e-8),
    ("resid_post", "pos", "denoise", 1e-4, 1e-8),
    ("attn_out", "pos", "denoise", 1e-4, 1e-8),
    ("mlp_out", "pos", "noise", 1e-4, 1e-8),
    ("z", "head", "denoise", 1e-4, 1e-8),
    ("z", "head_pos", "noise", 1e-4, 1e-8),
    ("q", "head", "denoise", 1e-2, 2e-5),
    ("k", "head_pos", "denoise", 1e-2, 2e-5),
    ("v", "head", "noise", 1e-2, 2e-5),
    ("pattern", "head", "denoise", 1e-2, 2e-5),
    ("pattern", "head_pos", "noise", 1e-2, 2e-5),
]


def _check_derivative(model, point, per, direction, eps, atol):
    metric = _metric(model)
    result = attribution_patch(
        model, CLEAN, CORRUPT, metric, point, per=None if per == "pos" else per, direction=direction
    )
    base, source = (CORRUPT, CLEAN) if direction == "denoise" else (CLEAN, CORRUPT)
    base_value = result.corrupted if direction == "denoise" else result.clean
    assert base_value == pytest.approx(float(metric(model(base)).mean()), abs=1e-6)
    est = (result.values - base_value).flatten()
    cells = _cells(result)
    # The largest estimates and a few random cells (one forward pair per cell keeps this quick).
    pick = est.abs().topk(3).indices.tolist() + torch.randperm(len(est))[:3].tolist()
    _, src = model.run_with_cache(source, [_hook(point, per, layer) for layer in range(model.cfg.n_layers)])
    fd = [_finite_difference(model, point, per, cells[i].tolist(), base, src, metric, eps) for i in pick]
    torch.testing.assert_close(est[pick], torch.tensor(fd, dtype=est.dtype), atol=atol, rtol=1e-4)
    assert est.abs().max() > 5e-3  # the check is not vacuous: far above atol


@pytest.mark.parametrize("point,per,direction,eps,atol", CASES)
def test_attribution_is_the_derivative_of_real_patching(model64, point, per, direction, eps, atol):
    _check_derivative(model64, point, per, direction, eps, atol)


def test_grouped_query_keys_per_query_head(gqa64):
    _check_derivative(gqa64, "k", "head_pos", "denoise", 1e-2, 1e-4)


def test_a_full_report_costs_two_forwards_and_one_backward(model64, monkeypatch):
    forwards, backwards = [], []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or grad(*a, **k))
    with model64.hooks({"hook_embed": lambda x, hook: forwards.append(1)}):
        results = attribution_patch_all(model64, CLEAN, CORRUPT, _metric(model64), per="head_pos")
    assert (len(forwards), len(backwards)) == (2, 1)
    assert set(results) == {
        "resid_pre",
        "resid_mid",
        "resid_post",
        "attn_out",
        "mlp_out",
        "z",
        "q",
        "k",
        "v",
        "pattern",
    }
    for point in ("resid_mid", "pattern"):  # the shared passes give what a single sweep gives
        one = attribution_patch(
            model64, CLEAN, CORRUPT, _metric(model64), point, per=None if point == "resid_mid" else "head_pos"
        )
        # Within float32 rounding: q/k/pattern hooks put every layer on the eager attention path.
        torch.testing.assert_close(results[point].values, one.values, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "point,per", [("resid_pre", None), ("mlp_out", None), ("z", "head"), ("pattern", "head_pos")]
)
def test_same_grid_as_patch_sweep(point, per):
    model = ms.load_model("tiny-llama")
    metric = _metric(model)
    a = attribution_patch(model, CLEAN, CORRUPT, metric, point, per=per)
    r = patch_sweep(model, CLEAN, CORRUPT, metric, point, per=per)
    assert (a.axes, a.point, a.direction, a.str_tokens) == (r.axes, r.point, r.direction, r.str_tokens)
    assert a.values.shape == r.values.shape
    assert (a.clean, a.corrupted) == pytest.approx((r.clean, r.corrupted), abs=1e-5)
    c = compare(a, r)
    assert -1 <= c.correlation <= 1 and c.max_abs_error == pytest.approx(
        float((a.normalised - r.normalised).abs().max())
    )


def _result(values, point="z", axes=("layer", "head")) -> PatchResult:
    return PatchResult(
        torch.tensor(values, dtype=torch.float32), axes, point, "denoise", 2.0, 0.0, ["a", "b"]
    )


def test_compare_on_known_cases():
    real = _result([[0.0, 0.5], [1.0, 2.0]])
    assert compare(_result([[1.0, 2.0], [3.0, 5.0]]), real).correlation == pytest.approx(1.0)  # 2x + 1
    assert compare(_result([[2.0, 1.5], [1.0, 0.0]]), real).correlation == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    c = compare(_result(y.tolist()), _result(x.tolist()))
    expected = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
    assert c.correlation == pytest.approx(float(expected), abs=1e-6)
    assert c.max_abs_error == pytest.approx(
        float((x - y).abs().max() / 2.0), abs=1e-6
    )  # normalised by clean - corrupted
    assert math.isnan(compare(_result([[1.0, 1.0], [1.0, 1.0]]), real).correlation)

    page = c.to_html(full_page=False)
    assert page.count("<circle") == 12 and page.count("<title>") == 13  # 12 cells + the y = x line
    assert "<title>L2 H3: real" in page and "http" not in page and "<script" not in page
    assert c._repr_html_() == page and c.to_html().startswith("<!doctype html>")
    toks = compare(
        _result([[0.0, 1.0]], "resid_pre", ("layer", "pos")),
        _result([[1.0, 0.0]], "resid_pre", ("layer", "pos")),
    )
    assert "L0 pos 1 &#x27;b&#x27;" in toks.to_html()


def test_bad_inputs_are_clear(model64):
    metric = _metric(model64)
    with pytest.raises(ValueError, match="same token shape"):
        attribution_patch(model64, "short", "much longer text", metric)
    with pytest.raises(ValueError, match="point must be one of"):
        attribution_patch(model64, CLEAN, CORRUPT, metric, "mlp_pre")
    with pytest.raises(ValueError, match="per='pos'"):
        attribution_patch(model64, CLEAN, CORRUPT, metric, "resid_pre", per="head")
    with pytest.raises(ValueError, match="'head' or 'head_pos'"):
        attribution_patch(model64, CLEAN, CORRUPT, metric, "z", per="pos")
    # Under the tests' runtime type checks the Literal annotation answers first; without them, our check.
    with pytest.raises((ValueError, TypeError), match="direction"):
        attribution_patch(model64, CLEAN, CORRUPT, metric, direction="sideways")
    with pytest.raises(ValueError, match="no 'blocks.0.hook_resid_mid'"):
        attribution_patch(ms.load_model("tiny-gpt_neox"), CLEAN, CORRUPT, metric, "resid_mid")
    with pytest.raises(ValueError, match="differ in point"):
        compare(_result([[0.0]]), _result([[0.0]], "v"))
    with pytest.raises(ValueError, match="grid shapes differ"):
        compare(_result([[0.0]]), _result([[0.0, 1.0]]))
