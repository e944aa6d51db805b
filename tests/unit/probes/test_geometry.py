"""Geometry: PCA against scikit-learn, the circle fit against a plain least-squares solve and on planted
circles (found) and shuffled ones (not found), concept cosines, the whitening, and the optional UMAP."""

from __future__ import annotations

import math
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import cosine_similarity

import mechscope as ms
from mechscope.probes.activations import ProbeError
from mechscope.probes.calendar import analyse_calendar
from mechscope.probes.geometry import (
    concept_directions,
    cosine_matrix,
    fit_circle,
    hierarchy_cosines,
    pca,
    project,
    whitening,
)
from mechscope.viz.probes import render_layer_scores_svg, render_scatter_svg

DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def _circle_data(order, width=32, per_class=10, radius=3.0, noise=0.3, seed=0):
    """Examples around the points of a circle in a random plane (class k at angle 2 pi k / K), plus
    class-specific off-plane offsets so the class means are not perfectly circular."""
    g = torch.Generator().manual_seed(seed)
    plane, _ = torch.linalg.qr(torch.randn(width, 2, generator=g, dtype=torch.float64))
    k = len(order)
    off = torch.randn(k, width, generator=g, dtype=torch.float64) * 0.15
    rows, labels = [], []
    for c, name in enumerate(order):
        centre = radius * (
            math.cos(2 * math.pi * c / k) * plane[:, 0] + math.sin(2 * math.pi * c / k) * plane[:, 1]
        )
        rows.append(centre + off[c] + noise * torch.randn(per_class, width, generator=g, dtype=torch.float64))
        labels += [name] * per_class
    return torch.cat(rows).float(), labels, plane


def test_pca_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) @ torch.randn(8, 8, generator=g)
    ours = pca(x, 3)
    ref = PCA(3).fit(x.double().numpy())
    np.testing.assert_allclose(
        ours.explained_variance_ratio.numpy(), ref.explained_variance_ratio_, rtol=1e-5
    )
    for a, b in zip(ours.components.numpy(), ref.components_, strict=True):  # equal up to sign
        assert abs(abs(np.dot(a, b)) - 1) < 1e-5
    ref_coords = ref.transform(x.double().numpy())
    np.testing.assert_allclose(np.abs(ours.coords.numpy()), np.abs(ref_coords), atol=1e-4)


def test_circle_fit_r2_is_the_least_squares_r2():
    x, labels, _ = _circle_data(DAYS, noise=1.0)
    fit = fit_circle(x, labels, DAYS, n_permutations=20)
    idx = np.array([DAYS.index(v) for v in labels])
    means = np.stack([x.double().numpy()[idx == c].mean(0) for c in range(7)])
    theta = 2 * np.pi * np.arange(7) / 7
    design = np.stack([np.ones(7), np.cos(theta), np.sin(theta)], 1)
    coef, *_ = np.linalg.lstsq(design, means, rcond=None)  # independent: plain least squares with intercept
    resid = means - design @ coef
    r2 = 1 - (resid**2).sum() / ((means - means.mean(0)) ** 2).sum()
    assert fit.circle_r2 == pytest.approx(r2, abs=1e-9)


def test_planted_circle_is_found_and_shuffled_one_is_not():
    x, labels, plane = _circle_data(DAYS)
    fit = fit_circle(x, labels, DAYS, n_permutations=300)
    assert fit.circle_r2 > 0.9 and fit.in_order and fit.aspect > 0.9
    assert fit.chance_r2 == pytest.approx(2 / 6, abs=0.05)  # random orderings: 2 / (K - 1)
    assert fit.p_value < 0.01
    # The fitted plane is the planted one: projecting the planted basis onto it keeps its norm.
    assert torch.linalg.matrix_norm(fit.plane.double() @ plane).item() == pytest.approx(
        math.sqrt(2), abs=0.05
    )
    # Same points, labels assigned in a scrambled order: no longer an ordered circle.
    scrambled = ["Mon", "Thu", "Sun", "Wed", "Sat", "Tue", "Fri"]
    relabel = dict(zip(DAYS, scrambled, strict=True))
    bad = fit_circle(x, [relabel[v] for v in labels], DAYS, n_permutations=300)
    assert bad.circle_r2 < 0.5 and not bad.in_order and bad.p_value > 0.05


def test_concept_cosines_and_hierarchy_on_planted_geometry():
    g = torch.Generator().manual_seed(0)
    parent = torch.zeros(16)
    parent[0] = 3.0
    kids = {"a": torch.zeros(16), "b": torch.zeros(16)}
    kids["a"][1], kids["b"][2] = 2.0, 2.0  # orthogonal to the parent
    x = torch.cat([parent + kids[k] + 0.01 * torch.randn(20, 16, generator=g) for k in kids])
    labels = ["a"] * 20 + ["b"] * 20
    dirs = concept_directions(x, labels)
    cos = cosine_matrix(dirs)
    np.testing.assert_allclose(
        cos.numpy(), cosine_similarity(torch.stack(list(dirs.values())).numpy()), atol=1e-6
    )
    assert cos[0, 1] == pytest.approx(-1.0, abs=1e-3)  # two classes around their mean: opposite
    h = hierarchy_cosines(parent, {k: parent + v for k, v in kids.items()})
    assert all(abs(c) < 1e-6 for c in h.values())
    h_bad = hierarchy_cosines(parent, {"c": 2 * parent})
    assert h_bad["c"] == pytest.approx(1.0)


def test_whitening_whitens_unembeddings_and_inverse_undoes_it():
    g = torch.Generator().manual_seed(0)
    W_U = torch.randn(8, 200, generator=g) * torch.linspace(0.5, 4, 8)[:, None]
    A = whitening(W_U).double()
    cov = torch.cov(W_U.double())
    torch.testing.assert_close(A @ cov @ A.T, torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        whitening(W_U, inverse=True).double() @ A, torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=1e-4
    )


def test_umap_is_optional_with_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    with pytest.raises(ProbeError, match="pip install umap-learn"):
        project(torch.randn(20, 4), "umap")
    with pytest.raises(ProbeError, match="unknown projection"):
        project(torch.randn(20, 4), "tsne")


def test_fit_circle_bad_input():
    x, labels, _ = _circle_data(DAYS, per_class=2)
    with pytest.raises(ProbeError, match="labels for"):
        fit_circle(x, labels[:-1], DAYS)
    with pytest.raises(ProbeError, match="missing"):
        fit_circle(x, labels, DAYS + ["Funday"])
    with pytest.raises(ProbeError, match="no variance"):
        pca(torch.ones(5, 3))


def test_calendar_example_runs_on_a_tiny_model_and_plots():
    model = ms.load_model("tiny-llama")
    r = analyse_calendar(model, "days", n_permutations=20)
    rows = r.to_records()
    assert {row["hook"] for row in rows} <= {
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    }
    for row in rows:
        assert 0 <= row["circle_r2"] <= 1 and 0 <= row["angle_acc"] <= 1
    fit = r.circles[r.best()]
    svg = render_scatter_svg(
        fit.coords.tolist(), r.labels, classes=r.classes, centres=fit.means_2d.tolist(), cyclic=True
    )
    ET.fromstring(svg)  # well-formed
    ET.fromstring(
        render_layer_scores_svg([dict(hook=h, val=0.5, train=1.0, control=None) for h in ("a", "b")])
    )


def test_cli_probe_calendar_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    html = tmp_path / "cal.html"
    args = [
        "probe",
        "calendar",
        "tiny-llama",
        "--kind",
        "months",
        "--permutations",
        "20",
        "--json",
        "--html",
        str(html),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "months" and report["best"] in {r["hook"] for r in report["hooks"]}
    assert "<svg" in html.read_text()
