"""CCS: the loss and the per-class normalisation against direct formulas, a planted consistent direction
found (synthetic, and in a tiny model's residual stream), nothing found in noise, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mechscope as ms
from mechscope.cli.main import app
from mechscope.probes.activations import ProbeError
from mechscope.probes.ccs import CCSConfig, ccs_layers, ccs_loss, normalise_pairs, train_ccs

FAST = CCSConfig(n_restarts=4, epochs=400, lr=1e-2)


def _planted(n=160, d=24, strength=2.0, seed=0):
    """Pairs whose "yes" and "no" activations differ by a large answer offset (the same for every pair)
    and by +/- strength * u depending on whether "yes" is true."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u = u / u.norm()
    truth = torch.randint(0, 2, (n,), generator=g)
    s = (2 * truth - 1).double()[:, None]
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    answer = 5 * torch.randn(d, generator=g, dtype=torch.float64)
    pos = base + answer + strength * s * u + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    neg = base - answer - strength * s * u + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return pos.float(), neg.float(), truth.tolist(), u


def test_loss_is_consistency_plus_confidence():
    p_pos, p_neg = torch.tensor([0.9, 0.2, 0.5]), torch.tensor([0.1, 0.7, 0.5])
    expected = np.mean([(0.9 - 0.9) ** 2 + 0.1**2, (0.2 - 0.3) ** 2 + 0.2**2, (0.5 - 0.5) ** 2 + 0.5**2])
    assert float(ccs_loss(p_pos, p_neg)) == pytest.approx(expected)


def test_pairs_are_normalised_per_class():
    pos, neg, _, _ = _planted()
    xp, xn = normalise_pairs(pos.double(), neg.double())
    for raw, z in ((pos, xp), (neg, xn)):
        r = raw.double().numpy()
        np.testing.assert_allclose(z.numpy(), (r - r.mean(0)) / r.std(0, ddof=1), atol=1e-10)


def test_ccs_finds_a_planted_consistent_direction_and_not_noise():
    pos, neg, truth, u = _planted()
    g = torch.Generator().manual_seed(1)
    noise_p, noise_n = torch.randn(160, 24, generator=g), torch.randn(160, 24, generator=g)
    probes = train_ccs({"planted": pos, "noise": noise_p}, {"planted": neg, "noise": noise_n}, truth, FAST)
    found = probes["planted"]
    assert found.accuracy > 0.95 and found.lr_accuracy > 0.95
    assert abs(torch.nn.functional.cosine_similarity(found.direction.double(), u, dim=0)) > 0.8
    assert found.loss == min(found.restart_losses) and len(found.restart_losses) == 4
    assert probes["noise"].accuracy < 0.75 and probes["noise"].loss > found.loss
    # Unlabelled: every pair trains, nothing is scored.
    unlabelled = train_ccs({"planted": pos}, {"planted": neg}, None, CCSConfig(n_restarts=1, epochs=20))[
        "planted"
    ]
    assert unlabelled.accuracy is None and unlabelled.lr_accuracy is None


def test_ccs_finds_a_direction_planted_in_a_tiny_models_residual_stream():
    model = ms.load_model("tiny-llama")
    g = torch.Generator().manual_seed(0)
    n = 80
    questions = [f"Q{i}: is {i % 7} > {i % 5}? A:" for i in range(n)]
    truth = torch.randint(0, 2, (n,), generator=g)
    u = torch.randn(model.cfg.d_model, generator=g)
    u = u / u.norm()
    # Rows [0, n) are the "yes" texts, [n, 2n) the "no" texts (one batch): true-yes and false-no get +u.
    sign = torch.cat([2 * truth - 1, 1 - 2 * truth]).float()

    def plant(x, hook):
        return x + 6.0 * sign[:, None, None] * u

    with model.hooks({"blocks.1.hook_attn_out": plant}):
        probes = ccs_layers(
            model, [q + " yes" for q in questions], [q + " no" for q in questions], truth.tolist(),
            names=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], cfg=FAST, batch_size=2 * n,
        )  # fmt: skip
    before, after = probes["blocks.0.hook_resid_post"], probes["blocks.1.hook_resid_post"]
    assert after.accuracy > 0.95
    assert before.accuracy < 0.8  # before the plant: truth is random to the model


def test_bad_input_raises_probe_errors():
    pos, neg, truth, _ = _planted(n=20)
    with pytest.raises(ProbeError, match="19 labels for 20 contrast pairs"):
        train_ccs({"h": pos}, {"h": neg}, truth[:-1], FAST)
    with pytest.raises(ProbeError, match="same hook points"):
        train_ccs({"h": pos}, {"g": neg}, truth, FAST)
    with pytest.raises(ProbeError, match="must be the same"):
        train_ccs({"h": pos}, {"h": neg[:-1]}, truth, FAST)
    with pytest.raises(ProbeError, match="0/1"):
        train_ccs({"h": pos}, {"h": neg}, [2] * 20, FAST)
    with pytest.raises(ProbeError, match="in pairs"):
        ccs_layers(ms.load_model("tiny-llama"), ["a yes", "b yes"], ["a no"])
    with pytest.raises(ValueError, match="n_restarts"):
        CCSConfig(n_restarts=0)


def test_cli_probe_ccs_json(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"pos": f"Is {i} even? Yes", "neg": f"Is {i} even? No", "label": int(i % 2 == 0)} for i in range(24)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["probe", "ccs", "tiny-llama", "--data", str(data), "--epochs", "50", "--restarts", "2"]
    result = CliRunner().invoke(app, [*args, "--json", "--html", str(tmp_path / "c.html")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_pairs"] == 24
    assert [r["hook"] for r in report["hooks"]] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for r in report["hooks"]:
        assert 0.5 <= r["ccs_acc"] <= 1 and 0 <= r["lr_acc"] <= 1


def test_a_split_that_leaves_no_training_pairs_is_refused_not_a_nan_probe():
    pos, neg, truth, _ = _planted(n=4)
    with pytest.raises(ProbeError, match="val_fraction"):
        train_ccs({"h": pos}, {"h": neg}, truth, CCSConfig(n_restarts=2, epochs=5, val_fraction=0.9))
