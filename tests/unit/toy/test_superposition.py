"""Toy models of superposition reproduce the paper's qualitative findings at its settings
(5 features, 2 hidden dimensions, importance 0.9**i; Elhage et al. 2022, Figure 2 and Section 4)."""

from __future__ import annotations

import pytest
import torch

from mechscope.toy import superposition as sp


@pytest.fixture(scope="module")
def sweep() -> sp.ToyModel:
    return sp.train(sp.ToyConfig(sparsities=(0.0, 0.7, 0.97), steps=5000), log_every=0)


def test_dense_features_keep_the_most_important_orthogonally(sweep):
    norms = sp.feature_norms(sweep)[0]
    assert norms[:2].min() > 0.9 and norms[2:].max() < 0.2  # only the 2 most important survive
    g = sp.gram(sweep)[0]
    assert abs(g[0, 1]) < 0.05  # and they are orthogonal
    assert sp.superposition(sweep)[0, :2].max() < 0.05


def test_sparse_features_go_into_superposition(sweep):
    assert sp.n_represented(sweep)[1:] == [4, 5] or sp.n_represented(sweep)[2] == 5
    # Very sparse: all five features share two dimensions as a pentagon, 2/5 of a dimension each.
    torch.testing.assert_close(sp.feature_dimensionality(sweep)[2], torch.full((5,), 0.4), atol=0.03, rtol=0)
    # Medium sparsity: represented features pair up antipodally, half a dimension each.
    dims = sp.feature_dimensionality(sweep)[1]
    kept = sp.feature_norms(sweep)[1] > 0.5
    assert kept.sum() > 2
    if kept.sum() == 4:
        torch.testing.assert_close(dims[kept], torch.full((4,), 0.5), atol=0.05, rtol=0)


def test_phase_change_for_two_features_in_one_dimension():
    phases = sp.phase_diagram([1.0, 0.03], [0.2, 5.0], steps=6000)
    assert sp.PHASES[phases[0, 0]] == "not represented"  # dense, less important: dropped
    assert sp.PHASES[phases[1, 0]] == "dedicated dimension"  # dense, more important: takes the dimension
    assert sp.PHASES[phases[0, 1]] == sp.PHASES[phases[1, 1]] == "superposition"  # sparse: shared


def test_hand_written_gradients_equal_autograd():
    cfg = sp.ToyConfig(n_features=6, n_hidden=3, sparsities=(0.0, 0.5, 0.9), batch_size=64)
    model = sp.ToyModel(cfg)
    with torch.no_grad():
        model.b.normal_()  # some outputs below zero, so the ReLU mask matters
    x = model.sample(cfg.batch_size, torch.Generator().manual_seed(3))  # [instance batch feature]
    loss = model.loss(x, model(x))
    loss.backward()
    expected = (model.W.grad.clone(), model.b.grad.clone())
    xf = x.transpose(1, 2).contiguous()
    got_loss = sp._set_grads(model, xf, torch.empty_like(xf), torch.empty_like(xf), log=True)
    assert got_loss == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(model.W.grad, expected[0])
    torch.testing.assert_close(model.b.grad, expected[1])


def test_one_draw_sampling_has_the_papers_distribution():
    cfg = sp.ToyConfig(n_features=4, sparsities=(0.0, 0.7, 0.95), batch_size=50000)
    x = sp.ToyModel(cfg).sample(cfg.batch_size, torch.Generator().manual_seed(0))
    present = x > 0
    torch.testing.assert_close(
        present.float().mean((1, 2)), torch.tensor([1.0, 0.3, 0.05]), atol=0.01, rtol=0
    )
    for i in range(3):  # present values are uniform on [0, 1): mean 1/2, variance 1/12
        v = x[i][present[i]]
        assert v.max() < 1 and abs(v.mean().item() - 0.5) < 0.01 and abs(v.var().item() - 1 / 12) < 0.005


def test_save_load_round_trip(sweep, tmp_path):
    again = sp.load(sp.save(sweep, tmp_path / "toy"))
    assert again.cfg == sweep.cfg
    torch.testing.assert_close(again.W, sweep.W)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="sparsities"):
        sp.ToyConfig(sparsities=(1.0,))
    with pytest.raises(ValueError, match="importances"):
        sp.ToyConfig(sparsities=(0.0, 0.5), importances=((1.0,),))


def test_views_draw_the_computed_quantities(sweep):
    import re

    from mechscope.viz.superposition import render_phase_diagram_html, render_superposition_html

    page = sweep._repr_html_()
    assert page == render_superposition_html(sweep, full_page=False) and "http" not in page
    assert page.count('class="geometry"') == 3  # one 2-D geometry per instance
    # The geometry's line ends are the columns of W; the bars' titles are the norms.
    norms = sp.feature_norms(sweep)
    shown = [float(v) for v in re.findall(r"\|\|W\|\| = ([0-9.]+)", page)]
    torch.testing.assert_close(torch.tensor(shown), norms.flatten(), atol=1e-3, rtol=0)
    dims = [float(v) for v in re.findall(r": D = ([0-9.]+)", page)]
    torch.testing.assert_close(
        torch.tensor(dims), sp.feature_dimensionality(sweep).flatten(), atol=1e-3, rtol=0
    )
    phase = render_phase_diagram_html(torch.tensor([[0, 1], [2, 2]]), [1.0, 0.1], [0.5, 2.0])
    assert phase.count("<rect") == 4 and "not represented" in phase and "superposition" in phase
