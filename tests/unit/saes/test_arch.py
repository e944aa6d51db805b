"""SAE kinds against hand computations in plain torch: encoder/decoder maths, losses, TopK's exact k,
BatchTopK's batch-level k and threshold, AuxK only through dead latents, the JumpReLU straight-through
gradients, decoder constraints, initialisation and the geometric median."""

from __future__ import annotations

import itertools

import pytest
import torch

from mechscope.saes.arch import KINDS, make_sae
from mechscope.saes.arch.jumprelu import JumpReLUFunction, StepFunction
from mechscope.saes.sae import SAEConfig, geometric_median, init_b_dec, init_normalisation

D_IN, D_SAE, K = 12, 40, 5


def _config(kind: str, **over) -> SAEConfig:
    return SAEConfig(d_in=D_IN, d_sae=D_SAE, kind=kind, k=K if "topk" in kind else None, **over)


def _sae(kind: str, **over):
    """A float64 SAE with every parameter random (non-zero biases, thresholds, a non-trivial input scale),
    so hand computations in float64 agree to rounding."""
    sae = make_sae(_config(kind, **{"dtype": "float64", **over}))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g, dtype=torch.float64) * 0.5)
        if kind == "batchtopk":
            sae.threshold.fill_(0.4)
        sae.input_scale.fill_(1.7)
        sae.output_scale.fill_(1.7)
    return sae


def _hand(sae, x: torch.Tensor, training: bool = False):
    """Pre-activations, latents and reconstruction from the raw tensors (float64, no SAE method)."""
    W_enc, b_enc, W_dec, b_dec = (t.detach().double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    s = float(sae.input_scale)
    pre = (x.double() * s - b_dec) @ W_enc + b_enc
    kind = sae.cfg.kind
    if kind == "relu":
        acts = torch.where(pre > 0, pre, 0.0)
    elif kind == "topk" or (kind == "batchtopk" and training):
        flat = pre.reshape(-1, D_SAE) if kind == "topk" else pre.reshape(1, -1)
        n = K if kind == "topk" else K * pre[..., 0].numel()
        kth = flat.sort(dim=-1, descending=True).values[:, n - 1 : n]  # n-th largest per row
        acts = torch.where((flat >= kth) & (flat > 0), flat, 0.0).reshape(pre.shape)
    else:
        theta = sae.threshold.detach().double()
        acts = torch.where(pre > theta, torch.where(pre > 0, pre, 0.0), 0.0)
    recon = (acts @ W_dec + b_dec) / s
    return pre, acts, recon


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_encode_decode_equal_the_hand_computation(kind):
    sae = _sae(kind).eval()
    x = torch.randn(3, 4, D_IN)
    pre, acts, recon = _hand(sae, x)
    torch.testing.assert_close(sae.pre_acts(x).double(), pre)
    torch.testing.assert_close(sae.encode(x).double(), acts)
    torch.testing.assert_close(sae.decode(sae.encode(x)).double(), recon)
    out = sae(x)
    assert torch.equal(out.recon, sae.decode(sae.encode(x))) and torch.equal(out.acts, sae.encode(x))
    assert 0 < int((out.acts != 0).sum()) < out.acts.numel()  # the check is not vacuous


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_losses_equal_the_hand_computation(kind):
    sae = _sae(kind).train()
    x = torch.randn(6, D_IN)
    pre, acts, recon = _hand(sae, x, training=True)
    s = float(sae.input_scale)
    out = sae(x)
    torch.testing.assert_close(out.losses["mse"].double(), ((recon - x.double()) * s).pow(2).sum(-1).mean())
    expected_keys = {"relu": {"mse", "l1"}, "jumprelu": {"mse", "l0"}}.get(kind, {"mse", "aux"})
    assert set(out.losses) == expected_keys == set(sae.loss_weights())
    if kind == "relu":
        l1 = (acts * sae.W_dec.detach().double().norm(dim=-1)).sum(-1).mean()
        torch.testing.assert_close(out.losses["l1"].double(), l1)
    if kind == "jumprelu":
        fired = (torch.where(pre > 0, pre, 0.0) > sae.threshold.detach().double()).double()
        torch.testing.assert_close(out.losses["l0"].double(), fired.sum(-1).mean())
    if "topk" in kind:
        assert float(out.losses["aux"]) == 0.0  # no dead mask: no auxiliary loss
    # the total is the weighted sum; sparsity_scale multiplies the sparsity term only
    w = sae.loss_weights(sparsity_scale=0.25)
    total = sum(w[n] * out.losses[n] for n in out.losses)
    torch.testing.assert_close(sae.total_loss(out.losses, sparsity_scale=0.25), total)
    coef = {"relu": ("l1", 5.0 * 0.25), "jumprelu": ("l0", 1.0 * 0.25)}.get(kind, ("aux", 1 / 32))
    assert w[coef[0]] == pytest.approx(coef[1]) and w["mse"] == 1.0


def test_topk_keeps_exactly_k_per_row():
    sae = _sae("topk")
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive, so ReLU cannot drop any of the k
    acts = sae.encode(torch.randn(7, 9, D_IN))
    assert ((acts != 0).sum(-1) == K).all()
    # and a row with fewer than k positive pre-activations keeps only those
    with torch.no_grad():
        sae.b_enc.fill_(-50.0)
        sae.b_enc[:2] = 50.0
    assert ((sae.encode(torch.randn(5, D_IN)) != 0).sum(-1) == 2).all()


def test_batchtopk_keeps_k_per_row_on_average_and_learns_a_threshold():
    sae = _sae("batchtopk", threshold_momentum=0.5).train()
    with torch.no_grad():
        sae.b_enc.fill_(5.0)
        sae.threshold.fill_(float("nan"))
    x = torch.randn(8, 3, D_IN)
    out = sae(x)
    per_row = (out.acts != 0).sum(-1)
    assert int(per_row.sum()) == K * 8 * 3
    assert len(set(per_row.flatten().tolist())) > 1  # chosen over the batch, not row by row
    first = out.acts[out.acts > 0].min()
    assert float(sae.threshold) == float(first.detach())  # the first batch sets it
    second = sae(torch.randn(5, D_IN)).acts
    expected = 0.5 * first + 0.5 * second[second > 0].min()
    torch.testing.assert_close(sae.threshold, expected)
    sae.eval()  # inference: ReLU(pre) above the global threshold, per token
    pre = sae.pre_acts(x)
    assert torch.equal(sae.encode(x), torch.where(pre > sae.threshold, pre.relu(), 0.0))
    with pytest.raises(RuntimeError, match="threshold"):
        make_sae(_config("batchtopk")).eval().encode(x)


def test_auxk_reaches_only_dead_latents_and_equals_the_hand_computation():
    sae = _sae("topk").train()
    with torch.no_grad():
        sae.input_scale.fill_(1.0)
        sae.output_scale.fill_(1.0)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:10]] = True
    x = torch.randn(16, D_IN)
    out = sae(x, dead_mask=dead)
    out.losses["aux"].backward()
    live = ~dead
    assert sae.W_enc.grad[:, live].abs().max() == 0 and sae.b_enc.grad[live].abs().max() == 0
    assert sae.W_dec.grad[live].abs().max() == 0
    assert sae.W_enc.grad[:, dead].abs().max() > 0 and sae.W_dec.grad[dead].abs().max() > 0
    # by hand: the k_aux (= d_in // 2 = 6) largest dead pre-activations reconstruct the residual
    k_aux = D_IN // 2
    pre, acts, recon = _hand(sae, x)
    dead_pre = pre[:, dead]
    kth = dead_pre.sort(-1, descending=True).values[:, k_aux - 1 : k_aux]
    z = torch.zeros_like(pre)
    z[:, dead] = torch.where((dead_pre >= kth) & (dead_pre > 0), dead_pre, 0.0)
    e_hat = z @ sae.W_dec.detach().double()
    expected = (e_hat - (x.double() - recon)).pow(2).sum(-1).mean() * min(10 / k_aux, 1.0)
    torch.testing.assert_close(out.losses["aux"].double(), expected)
    # few dead latents: k_aux shrinks to them and the loss is scaled by n_dead / k_aux
    few = torch.zeros(D_SAE, dtype=torch.bool)
    few[:3] = True
    assert float(sae(x, dead_mask=few).losses["aux"].detach()) > 0
    assert float(sae(x, dead_mask=torch.zeros(D_SAE, dtype=torch.bool)).losses["aux"]) == 0.0
    with pytest.raises((ValueError, TypeError), match="dead_mask"):  # TypeError: the jaxtyping check in tests
        sae(x, dead_mask=torch.zeros(D_SAE))


def test_jumprelu_straight_through_gradients_follow_the_rectangle_kernel():
    eps = 0.1
    theta = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64, requires_grad=True)
    # values inside, outside and on either side of each threshold's window (theta +- eps/2)
    z = torch.tensor(
        [[0.16, 0.52, 2.0], [0.26, 0.44, 0.96], [0.0, 0.56, 1.049], [0.3, 0.1, 0.9]],
        dtype=torch.float64,
        requires_grad=True,
    )
    g = torch.randn(4, 3, dtype=torch.float64)
    kernel = ((z - theta).abs() < eps / 2).double().detach()
    (JumpReLUFunction.apply(z, theta, eps) * g).sum().backward()
    torch.testing.assert_close(z.grad, (z > theta).double().detach() * g)
    torch.testing.assert_close(theta.grad, (-(theta / eps) * kernel * g).sum(0).detach())
    assert (kernel.sum(0) > 0).all() and (kernel.sum(0) < 4).all()  # each column has both cases

    z.grad = theta.grad = None
    out = StepFunction.apply(z, theta, eps)
    assert torch.equal(out, (z > theta).double())
    (out * g).sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))  # the L0 term trains only the thresholds
    torch.testing.assert_close(theta.grad, (-(1 / eps) * kernel * g).sum(0))


def test_jumprelu_l0_gradient_in_the_sae_reaches_only_the_threshold():
    sae = _sae("jumprelu", jumprelu_bandwidth=0.5)
    x = torch.randn(32, D_IN)
    out = sae(x)
    out.losses["l0"].backward()
    assert sae.W_enc.grad.abs().max() == 0 and sae.b_enc.grad.abs().max() == 0
    a = sae.pre_acts(x).detach().relu()
    theta = sae.threshold.detach()
    kernel = ((a - theta).abs() < 0.25).double()
    torch.testing.assert_close(sae.threshold.grad, -(1 / 0.5) * kernel.mean(0))
    assert sae.threshold.grad.abs().max() > 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_decoder_normalisation_and_gradient_projection(kind):
    sae = _sae(kind).train()
    assert (sae.decoder_norms() - 1).abs().max() > 0.1  # the random weights are far from unit norm
    sae.normalise_decoder_()
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(D_SAE, dtype=torch.float64))
    out = sae(torch.randn(20, D_IN))
    sae.total_loss(out.losses).backward()
    raw = sae.W_dec.grad.clone()
    sae.project_decoder_grad_()
    if not sae.unit_norm_decoder:  # ReLU with the decoder-norm-weighted L1: norms are free
        assert kind == "relu" and torch.equal(sae.W_dec.grad, raw)
        return
    radial = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1)
    assert radial.abs().max() < 1e-6 < (raw * sae.W_dec.detach()).sum(-1).abs().max()
    lr = 1e-3 / float(raw.norm(dim=-1).max())
    with torch.no_grad():  # a projected step moves the norms by O(lr^2) only, a raw one by O(lr)
        projected = (sae.W_dec - lr * sae.W_dec.grad).norm(dim=-1)
        unprojected = (sae.W_dec - lr * raw).norm(dim=-1)
    assert (projected - 1).abs().max() < 1e-5 < (unprojected - 1).abs().max()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
        if kind == "jumprelu":
            sae.threshold[:3] = -1.0
    sae.apply_constraints_()
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(D_SAE, dtype=torch.float64))
    if kind == "jumprelu":
        assert (sae.threshold >= 0).all()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_folding_decoder_norms_keeps_the_function(kind):
    sae = _sae(kind).eval()
    x = torch.randn(10, D_IN)
    if kind in ("topk", "batchtopk"):
        with pytest.raises(ValueError, match="top k"):
            sae.fold_decoder_norm_()
        return
    before = sae.decode(sae.encode(x))
    sae.fold_decoder_norm_()
    torch.testing.assert_close(sae.decoder_norms(), torch.ones(D_SAE, dtype=torch.float64))
    torch.testing.assert_close(sae.decode(sae.encode(x)), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_initialisation(kind):
    sae = make_sae(_config(kind))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    norm = 1.0 if sae.unit_norm_decoder else 0.1
    torch.testing.assert_close(sae.decoder_norms(), torch.full((D_SAE,), norm))
    assert torch.equal(sae.b_enc, torch.zeros(D_SAE)) and torch.equal(sae.b_dec, torch.zeros(D_IN))
    assert torch.equal(make_sae(_config(kind)).W_dec, sae.W_dec)  # seeded
    assert not torch.equal(make_sae(_config(kind, seed=1)).W_dec, sae.W_dec)
    if kind == "jumprelu":
        assert torch.equal(sae.threshold, torch.full((D_SAE,), 0.01))


def test_normalisation_and_b_dec_initialisation():
    sae = make_sae(_config("topk"))
    sample = torch.randn(500, D_IN) * 7 + 3
    init_normalisation(sae, sample)
    scaled = sample * sae.input_scale
    assert float(scaled.pow(2).sum(-1).mean()) == pytest.approx(D_IN, rel=1e-5)
    init_b_dec(sae, sample, method="mean")
    torch.testing.assert_close(sae.b_dec, scaled.mean(0))
    init_b_dec(sae, sample)
    torch.testing.assert_close(sae.b_dec, geometric_median(scaled.double()).float())
    # a transcoder's output scale comes from its targets
    tc = make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, kind="relu", hook_name="a", out_hook_name="b", d_out=3))
    with pytest.raises(ValueError, match="target_sample"):
        init_normalisation(tc, sample)
    init_normalisation(tc, sample, torch.randn(500, 3) * 0.1)
    assert float(tc.output_scale) > 5 * float(tc.input_scale)
    none = make_sae(_config("relu", normalisation="none"))
    init_normalisation(none, sample)
    assert float(none.input_scale) == 1.0
    with pytest.raises(ValueError, match=r"\[n 12\]"):
        init_b_dec(sae, torch.randn(5, 3))


def _distance_sum(points: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (points[:, None, :] - y.reshape(-1, points.shape[1])[None]).norm(dim=-1).sum(0)


def test_geometric_median_against_brute_force():
    points = torch.tensor([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0], [5.0, 5.0], [-2.0, 1.0], [9.0, -1.0]])
    gm = geometric_median(points.double())
    # brute force: the objective on a fine grid, then a finer grid around the best cell
    best = None
    for step, lo, hi in ((0.05, (-3.0, -2.0), (10.0, 6.0)), (0.001, None, None)):
        if lo is None:
            lo, hi = (
                (float(best[0]) - 0.06, float(best[1]) - 0.06),
                (float(best[0]) + 0.06, float(best[1]) + 0.06),
            )
        xs = torch.arange(lo[0], hi[0], step, dtype=torch.float64)
        ys = torch.arange(lo[1], hi[1], step, dtype=torch.float64)
        grid = torch.cartesian_prod(xs, ys)
        best = grid[_distance_sum(points.double(), grid).argmin()]
    assert (gm - best).norm() < 3e-3
    assert _distance_sum(points.double(), gm) <= _distance_sum(points.double(), best) + 1e-9
    assert (gm - points.double().mean(0)).norm() > 0.3  # the median is not the mean here


def test_geometric_median_special_cases():
    # a point holding more than half the points is the median, even when the iteration lands on it
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    points = torch.cat([a.expand(5, 3), torch.randn(4, 3, dtype=torch.float64) * 10])
    torch.testing.assert_close(geometric_median(points), a, atol=1e-6, rtol=0)
    # collinear points: the ordinary median
    line = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [10.0, 10.0], [50.0, 50.0]], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(line), torch.tensor([2.0, 2.0], dtype=torch.float64))
    # in higher dimensions no small perturbation improves the objective
    cloud = torch.randn(200, 8, dtype=torch.float64) ** 3
    gm = geometric_median(cloud)
    f = _distance_sum(cloud, gm)
    for d in itertools.islice(itertools.product((-1e-3, 1e-3), range(8)), 16):
        y = gm.clone()
        y[d[1]] += d[0]
        assert _distance_sum(cloud, y) >= f - 1e-9
    with pytest.raises(ValueError, match="non-empty"):
        geometric_median(torch.zeros(0, 3))


def test_transcoder_reconstructs_its_target():
    tc = make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, kind="relu", hook_name="a", out_hook_name="b", d_out=5))
    assert not tc.cfg.apply_b_dec_to_input and tc.W_dec.shape == (D_SAE, 5)
    x, y = torch.randn(4, D_IN), torch.randn(4, 5)
    with pytest.raises(ValueError, match="target="):
        tc(x)
    out = tc(x, y)
    assert out.recon.shape == (4, 5)
    torch.testing.assert_close(out.losses["mse"], (out.recon - y).pow(2).sum(-1).mean())


@pytest.mark.parametrize(
    "over, message",
    [
        ({"kind": "relu", "k": 3}, "k applies to kind topk / batchtopk only"),
        ({"kind": "topk", "l1_coefficient": 1.0}, "l1_coefficient applies to kind relu only"),
        ({"kind": "gated"}, "unknown SAE kind 'gated'; choose one of"),
        ({"kind": "topk", "k": 41}, r"k must be in \[1, d_sae=40\]"),
        ({"kind": "relu", "d_out": 3}, "only transcoders"),
        (
            {"kind": "relu", "hook_name": "a", "out_hook_name": "b", "apply_b_dec_to_input": True},
            "transcoder",
        ),
        ({"kind": "relu", "normalisation": "layer_norm"}, "normalisation must be one of"),
        ({"kind": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"kind": "relu", "dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_bad_configs_say_what_is_wrong(over, message):
    with pytest.raises(ValueError, match=message):
        SAEConfig(d_in=D_IN, d_sae=D_SAE, **over)


def test_config_round_trips_and_rejects_unknown_fields():
    cfg = _config("topk", hook_name="blocks.0.hook_resid_post")
    assert (
        cfg.k == K and cfg.k_aux == D_IN // 2 and cfg.aux_coefficient == 1 / 32 and cfg.l1_coefficient is None
    )
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SAE config field"):
        SAEConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="use make_sae"):
        KINDS["relu"](cfg)
