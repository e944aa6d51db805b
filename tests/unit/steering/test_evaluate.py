"""The batched effect/cost sweep against a one-variant-at-a-time loop with plain PyTorch hooks."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.steering import SteeringError, actadd, random_like
from mechscope.steering.evaluate import SweepConfig, sweep
from mechscope.viz.steering import render_steering_html

PROMPTS = ["I hate you because", "The cat", "so"]
NEUTRAL = ("The train leaves at eight.", "Water boils at one hundred degrees.")
WORDS = [" love", "L", "x"]


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


def _logits(model, text: str, layer: int, add: torch.Tensor | None) -> torch.Tensor:
    """Plain HF logits of one unpadded text, ``add`` (a [pos d_model] block) added at its first positions
    of HF layer ``layer``'s input."""

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        n = min(add.shape[0], x.shape[1])
        y = x.clone()
        y[:, :n] += add[:n]
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    handle = None if add is None else model.layer(layer).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.hf_model(input_ids=model.to_tokens(text)).logits[0].float()
    finally:
        if handle:
            handle.remove()


def _reference(model, vectors, layers, coeffs):
    """effect, kl, delta_nll [vector coeff], one forward per (vector, coeff, text)."""
    ids = sorted({model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS})
    out = torch.zeros(3, len(vectors), len(coeffs))
    for i, (v, layer) in enumerate(zip(vectors, layers, strict=True)):
        for j, c in enumerate(coeffs):
            for p in PROMPTS:
                on = _logits(model, p, layer, c * v.direction)[-1].log_softmax(-1)[ids].logsumexp(-1)
                off = _logits(model, p, layer, None)[-1].log_softmax(-1)[ids].logsumexp(-1)
                out[0, i, j] += (on - off) / len(PROMPTS)
            for t in NEUTRAL:
                tok = model.to_tokens(t)[0]
                lp = _logits(model, t, layer, c * v.direction).log_softmax(-1)
                base = _logits(model, t, layer, None).log_softmax(-1)
                kl = (base.exp() * (base - lp)).sum(-1).mean()
                nll = -lp[:-1].gather(-1, tok[1:, None]).mean() + base[:-1].gather(-1, tok[1:, None]).mean()
                out[1, i, j] += kl / len(NEUTRAL)
                out[2, i, j] += nll / len(NEUTRAL)
    return out


@pytest.fixture(scope="module")
def reference(llama):
    """The vectors, the config's coefficients and the loop's results, computed once for the module."""
    layers = [0, 1]
    vecs = [actadd(llama, "Love", "Hate", layer) for layer in layers]
    coeffs = (1.0, 4.0)
    real = _reference(llama, vecs, layers, coeffs)
    draws = [_reference(llama, [random_like(v, seed=5 + k * 2 + j) for j, v in enumerate(vecs)], layers, coeffs)
             for k in range(2)]  # fmt: skip
    return vecs, coeffs, real, (draws[0] + draws[1]) / 2


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batched_sweep_equals_a_one_at_a_time_loop(llama, reference, batch_size):
    vecs, coeffs, ref, rnd = reference
    cfg = SweepConfig(coeffs=coeffs, neutral=NEUTRAL, batch_size=batch_size, random_seed=5, random_draws=2)
    r = sweep(llama, vecs, PROMPTS, WORDS, cfg=cfg)
    tol = dict(atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(r.effect, ref[0], **tol)
    torch.testing.assert_close(r.kl, ref[1], **tol)
    torch.testing.assert_close(r.delta_nll, ref[2], **tol)
    torch.testing.assert_close(r.random_effect, rnd[0], **tol)
    torch.testing.assert_close(r.random_kl, rnd[1], **tol)
    torch.testing.assert_close(r.random_delta_nll, rnd[2], **tol)
    assert (r.kl > 0).all() and r.effect.abs().max() > 1e-3
    n_rows = 2 * 3 * 2  # vectors x (1 real + 2 random) x coeffs
    expect = 2 + -(-n_rows * len(PROMPTS) // batch_size) + -(-n_rows * len(NEUTRAL) // batch_size)
    assert r.forwards == expect


def test_custom_metric_rows_and_html(llama):
    v = actadd(llama, "Love", "Hate", 1)
    cfg = SweepConfig(coeffs=(2.0,), neutral=NEUTRAL, random_baseline=False)

    def gap(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, 5] - logits[:, 6]

    r = sweep(llama, [v], PROMPTS, metric=gap, cfg=cfg)
    want = sum(
        float(gap(_logits(llama, p, 1, 2.0 * v.direction)[-1:]) - gap(_logits(llama, p, 1, None)[-1:]))
        for p in PROMPTS
    ) / len(PROMPTS)
    assert r.random_effect is None and float(r.effect[0, 0]) == pytest.approx(want, abs=1e-4)
    assert r.rows() == [
        {"hook": "blocks.1.hook_resid_pre", "coeff": 2.0, "effect": float(r.effect[0, 0]),
         "kl": float(r.kl[0, 0]), "delta_nll": float(r.delta_nll[0, 0])}
    ]  # fmt: skip
    html = render_steering_html(sweep(llama, [v], PROMPTS, ["<x&y>"], cfg=SweepConfig(neutral=NEUTRAL)))
    assert html.count("<svg") == 3 and "&lt;x&amp;y&gt;" in html and "<script" not in html
    assert "http" not in html.replace("http://www.w3.org/2000/svg", "")


def test_sweep_errors(llama):
    v = actadd(llama, "Love", "Hate", 1)
    with pytest.raises(SteeringError, match="no vectors"):
        sweep(llama, [], PROMPTS, WORDS)
    with pytest.raises(SteeringError, match="concept words"):
        sweep(llama, [v], PROMPTS)
    with pytest.raises(ValueError, match="coeffs"):
        SweepConfig(coeffs=())


def test_probe_reading_is_the_projection_of_the_steered_activation(llama):
    v = actadd(llama, "Love", "Hate", 0)
    d = torch.randn(llama.cfg.d_model)
    cfg = SweepConfig(coeffs=(3.0,), neutral=NEUTRAL, random_baseline=False)
    r = sweep(llama, [v], PROMPTS, probe=("blocks.1.hook_resid_pre", d), cfg=cfg)

    def read(text: str, add) -> torch.Tensor:
        seen = []
        grab = llama.layer(1).register_forward_pre_hook(
            lambda m, a, k: seen.append((a[0] if a else k["hidden_states"])[0, -1]), with_kwargs=True
        )
        try:
            _logits(llama, text, 0, add)
        finally:
            grab.remove()
        return seen[0] @ (d / d.norm())

    want = sum(float(read(p, 3.0 * v.direction) - read(p, None)) for p in PROMPTS) / len(PROMPTS)
    assert float(r.effect[0, 0]) == pytest.approx(want, abs=1e-4) and abs(want) > 1e-3
    assert r.metric == "probe reading at blocks.1.hook_resid_pre"


def test_batched_generation_sweep_equals_one_generation_at_a_time(llama):
    from mechscope.models.generate import generate
    from mechscope.steering import steer
    from mechscope.steering.evaluate import sweep_generations

    vecs = [actadd(llama, "Love", "Hate", layer) for layer in (0, 1)]
    prompts = ["I hate you because", "so"]
    got = sweep_generations(llama, vecs, prompts, [0.0, 6.0], batch_size=5, max_new_tokens=6)
    want = []
    for v in vecs:
        for c in (0.0, 6.0):
            for p in prompts:
                with steer(llama, v.with_coeff(c)):
                    want.append(
                        {
                            "hook": v.hook_name,
                            "coeff": c,
                            "prompt": p,
                            "text": generate(llama, p, max_new_tokens=6),
                        }
                    )
    assert got == want
    assert len({r["text"] for r in got if r["prompt"] == "so"}) > 1  # steering changed some continuations
