"""Linear probes: scikit-learn as the independent reference, a direction planted in a tiny model's
residual stream must be found (and only after it is planted), the control task sits at chance, and
bad input gets a ProbeError."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

import mechscope as ms
from mechscope.cli.main import app
from mechscope.probes.activations import ProbeError, flatten_token_labels, gather_activations
from mechscope.probes.labels import encode_labels, split_indices
from mechscope.probes.linear import ProbeConfig, fit_logistic, probe_layers, train_probes
from mechscope.steering import SteeringVector

L2 = 0.05


def _data(n=160, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 5.0, d, dtype=torch.float64)
    u = torch.randn(d, generator=g, dtype=torch.float64)
    return x, u, torch.randn(n, generator=g, dtype=torch.float64)


def _sklearn_fit(x, y, tr, model):
    sc = StandardScaler().fit(x[tr].numpy())
    return sc, model.fit(sc.transform(x[tr].numpy()), np.asarray(y)[tr.numpy()])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_probe_matches_sklearn(n_classes):
    x, u, noise = _data()
    score = x @ u + 2 * noise
    y = (
        (score > 0).long()
        if n_classes == 2
        else torch.bucketize(score, score.quantile(torch.tensor([0.33, 0.66]).double()))
    )
    cfg = ProbeConfig(l2=L2)
    probe = train_probes({"h": x}, y.tolist(), cfg).probes["h"]
    tr, va = split_indices(encode_labels(y.tolist(), len(y)), cfg.val_fraction, cfg.seed)
    C = 1 / (L2 * len(tr))  # sklearn: 1/2 |w|^2 + C * sum(loss)  ==  mean(loss) + l2/2 |w|^2, scaled
    sc, clf = _sklearn_fit(x, y, tr, LogisticRegression(C=C, tol=1e-12, max_iter=10_000))
    w_ref = clf.coef_.T / sc.scale_[:, None]  # back to raw units, as LinearProbe.weight is
    np.testing.assert_allclose(probe.weight.numpy(), w_ref, atol=2e-3 * np.abs(w_ref).max())
    assert probe.val_score == pytest.approx(clf.score(sc.transform(x[va].numpy()), y[va].numpy()))
    np.testing.assert_array_equal(probe.predict(x).numpy(), clf.predict(sc.transform(x.numpy())))


def test_ridge_probe_matches_sklearn_in_both_primal_and_dual_form():
    for n in (160, 16):  # n > width: primal solve; n < width: the dual (n x n) solve
        x, u, noise = _data(n=n)
        y = x @ u + noise
        cfg = ProbeConfig(l2=L2)
        result = train_probes({"h": x}, y, cfg)
        assert result.task == "regression" and result.metric == "r2"
        tr, va = split_indices(encode_labels(y, n), cfg.val_fraction, cfg.seed)
        sc, reg = _sklearn_fit(x, y, tr, Ridge(alpha=L2 * len(tr)))
        p = result.probes["h"]
        np.testing.assert_allclose(p.weight[:, 0].numpy(), reg.coef_ / sc.scale_, rtol=1e-7, atol=1e-9)
        assert p.val_score == pytest.approx(reg.score(sc.transform(x[va].numpy()), y[va].numpy()), abs=1e-9)


def test_fixed_validation_indices_are_the_validation_set():
    x, u, noise = _data(n=40)
    y = ((x @ u + noise) > 0).long().tolist()
    val = [0, 5, 7, 30, 31, 39]
    r = train_probes({"h": x}, y, ProbeConfig(control=False), val_indices=val)
    assert (r.n_train, r.n_val) == (34, 6)
    p = r.probes["h"]
    expected = float(np.mean([int(p.predict(x[i : i + 1])[0]) == y[i] for i in val]))
    assert p.val_score == pytest.approx(expected)
    with pytest.raises(ProbeError, match="val_indices"):
        train_probes({"h": x}, y, val_indices=[40])
    with pytest.raises(ProbeError, match="val_indices"):
        train_probes({"h": x}, y, val_indices=range(40))


def test_probes_fitted_together_equal_probes_fitted_alone():
    x, u, noise = _data()
    y = ((x @ u + noise) > 0).long().tolist()
    x2 = x[:, torch.randperm(x.shape[1])] * 3 + 1
    narrow = x[:, :10]  # another width (e.g. an MLP point beside the residual stream): its own group
    both = train_probes({"a": x, "b": x2, "narrow": narrow}, y, ProbeConfig(control=False))
    for name, acts in (("b", x2), ("narrow", narrow)):
        alone = train_probes({name: acts}, y, ProbeConfig(control=False))
        torch.testing.assert_close(both.probes[name].weight, alone.probes[name].weight, atol=1e-5, rtol=1e-4)
    assert both.probes["narrow"].weight.shape == (10, 1)


def test_fit_logistic_separates_each_probes_own_labels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 100, 5, generator=g, dtype=torch.float64)
    y = torch.stack([(x[0, :, 0] > 0).long(), (x[1, :, 3] > 0).long()])  # a different feature per probe
    W, _ = fit_logistic(x, y, 2, l2=1e-3)
    assert W[0, :, 0].abs().argmax() == 0 and W[1, :, 0].abs().argmax() == 3


def _planted_acts(model, texts, labels, u, scale=8.0):
    """Add +/- scale * u to block 1's attention output (every position), by label."""
    sign = torch.tensor([1.0 if lab else -1.0 for lab in labels])

    def plant(x, hook):
        return x + scale * sign[:, None, None] * u

    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    with model.hooks({"blocks.1.hook_attn_out": plant}):
        return gather_activations(model, texts, names, batch_size=len(texts))


def test_probe_finds_a_direction_planted_in_the_residual_stream():
    model = ms.load_model("tiny-llama")
    g = torch.Generator().manual_seed(0)
    texts = [f"sample {i} says {'x' * (i % 5)}" for i in range(120)]
    labels = torch.randint(0, 2, (120,), generator=g).bool().tolist()
    u = torch.randn(model.cfg.d_model, generator=g)
    u = u / u.norm()
    result = train_probes(_planted_acts(model, texts, labels, u), labels, ProbeConfig())
    before, mid, after = (result.probes[h] for h in result.probes)
    # Before the plant the labels are random noise to the model; after it they are linearly readable.
    assert before.val_score < 0.75
    assert mid.val_score == 1.0 and after.val_score == 1.0
    for p in (before, mid, after):
        assert p.control_score < 0.75  # permuted labels: chance, measured
    assert mid.selectivity > 0.25
    cos = torch.nn.functional.cosine_similarity(mid.direction(True), u, dim=0)
    assert cos > 0.9, f"probe pattern vs planted direction: cos {cos:.3f}"
    # The weight (a filter that also cancels correlated noise) points less exactly along u, but far
    # above a random direction's ~1/sqrt(64).
    assert torch.nn.functional.cosine_similarity(mid.direction(True, kind="weight"), u, dim=0) > 0.4
    v = mid.to_steering_vector(4.0, cls=True)
    assert isinstance(v, SteeringVector) and v.hook_name == "blocks.1.hook_resid_mid"
    torch.testing.assert_close(v.direction, mid.direction(True))
    assert v.coeff == 4.0
    torch.testing.assert_close(mid.direction(False), -mid.direction(True))


def test_gather_activations_reads_last_mean_all_and_positions_through_padding():
    model = ms.load_model("tiny-llama")
    texts = ["ab", "abcdef", "xyz"]
    name = "blocks.1.hook_resid_post"
    rows = {r: gather_activations(model, texts, [name], read=r)[name] for r in ("last", "mean", "all", 1, -2)}
    for i, t in enumerate(texts):  # independent: each text alone, no padding
        _, cache = model.run_with_cache(t, [name])
        alone = cache[name][0]
        torch.testing.assert_close(rows["last"][i], alone[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows["mean"][i], alone.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows[1][i], alone[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows[-2][i], alone[-2], atol=1e-5, rtol=1e-5)
    lengths = [len(model.to_str_tokens(t)) for t in texts]
    assert rows["all"].shape[0] == sum(lengths)
    labels = flatten_token_labels(model, texts, [list(range(n)) for n in lengths])
    assert len(labels) == sum(lengths)


def test_probe_layers_sweeps_every_layer_in_one_call():
    model = ms.load_model("tiny-llama")  # rotary: the embeddings are the token's alone
    texts = [f"{w} thing" for w in ("good", "bad") * 12]
    result = probe_layers(model, texts, ["good" in t for t in texts], cfg=ProbeConfig(skip_constant=True))
    assert set(result.probes) | set(result.skipped) == {
        "blocks.0.hook_resid_pre",
        *(f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)),
    }
    assert "blocks.0.hook_resid_pre" in result.skipped  # the last token " thing" is the same everywhere


def test_numpy_float_labels_are_regression_targets():
    # np.float32 is no Python float: a list of them once became three classes, one per value.
    assert encode_labels([np.float32(0.5), np.float32(1.5), np.float32(2.5)], 3).task == "regression"
    assert encode_labels([np.int64(0), np.int64(1), np.int64(1)], 3).task == "classification"


def test_bad_input_raises_probe_errors():
    x, _, _ = _data(n=20)
    with pytest.raises(ProbeError, match="19 labels for 20 examples"):
        train_probes({"h": x}, [0, 1] * 9 + [0], ProbeConfig())
    with pytest.raises(ProbeError, match="no variance"):
        train_probes({"h": x, "flat": torch.ones(20, 24)}, [0, 1] * 10)
    skipped = train_probes({"h": x, "flat": torch.ones(20, 24)}, [0, 1] * 10, ProbeConfig(skip_constant=True))
    assert skipped.skipped == ("flat",) and list(skipped.probes) == ["h"]
    with pytest.raises(ProbeError, match="at least two classes"):
        train_probes({"h": x}, ["a"] * 20)
    with pytest.raises(ProbeError, match="one example"):
        train_probes({"h": x}, ["a"] * 19 + ["b"])
    model = ms.load_model("tiny-llama")
    with pytest.raises(ProbeError, match="one label per text"):
        probe_layers(model, ["a", "b", "c"], [0, 1])
    with pytest.raises(ProbeError, match="read must be"):
        gather_activations(model, ["a"], read="first")
    with pytest.raises(ProbeError, match="outside a prompt"):
        gather_activations(model, ["ab"], ["blocks.0.hook_resid_post"], read=7)
    with pytest.raises(ProbeError, match="labels"):
        flatten_token_labels(model, ["ab"], [[0]])
    with pytest.raises(ProbeError, match="one direction per class"):
        train_probes({"h": x}, [0, 1, 2, 3] * 5).probes["h"].direction()  # multi-class: pass cls=
    assert issubclass(ProbeError, ms.MechscopeError)


def test_cli_probe_layers_json_and_direction_file(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"{w} item {i}", "label": w} for i in range(10) for w in ("red", "blue")]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "dir.safetensors"
    html = tmp_path / "p.html"
    args = ["probe", "layers", "tiny-llama", "--data", str(data), "--json", "--html", str(html)]
    result = CliRunner().invoke(app, [*args, "--save-direction", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == "accuracy" and report["n_train"] + report["n_val"] == 20
    hooks = {r["hook"] for r in report["probes"]}
    assert hooks == {"blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}
    page = html.read_text()
    assert page.count("<svg") == 2 and "PCA of the best hook point" in page  # the curve and the map
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert f.metadata()["hook_name"] == report["best"]
        assert f.get_tensor("direction").norm() == pytest.approx(1.0, abs=1e-5)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n')
    result = CliRunner().invoke(app, ["probe", "layers", "tiny-llama", "--data", str(bad)])
    assert result.exit_code == 2 and "lacks ['label']" in result.output
