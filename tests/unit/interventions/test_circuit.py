"""EAP scores equal finite differences; circuit runs are exact at both ends and agree with node ablations."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.interventions import ablation, metrics
from mechscope.interventions.circuit import (
    Circuit,
    EdgeScores,
    Graph,
    circuit_metrics,
    edge_attribution,
    faithfulness,
    prune,
)
from mechscope.models import edits

CLEAN, CORRUPT = (
    ["the cat sat", "a dog ran!!"],
    ["the car sat", "a fog ran!!"],
)  # one length: metrics read pos -1
ABLATIONS = ["corrupted", "mean", "resample"]


@pytest.fixture(scope="module")
def model64() -> ms.HookedModel:
    return ms.load_model("tiny-llama", dtype=torch.float64)  # grouped-query, rotary, gated MLP


def _metric(model):
    return metrics.logit_diff(model.to_single_token("t"), model.to_single_token("r"))


def _full(graph: Graph) -> Circuit:
    return Circuit(graph, graph.valid.clone(), torch.zeros(graph.valid.shape))


def _without(graph: Graph, node: str) -> Circuit:
    c = _full(graph)
    c.mask[graph.upstream.index(node)] = False
    return c


def _write(model, cache, node: str) -> torch.Tensor:
    """A node's write into the residual stream, from the cache's own decomposition."""
    if node == "input":
        return cache["blocks.0.hook_resid_pre"]
    if node.startswith("m"):
        return cache[f"blocks.{node[1:]}.hook_mlp_out"]
    layer, head = map(int, node[1:].split(".h"))
    return cache.stack_head_results(layer + 1)[layer * model.cfg.n_heads + head]


def _reader_run(model, edge, delta: torch.Tensor, scale: float, metric) -> float:
    """The metric when only ``edge``'s reader sees ``scale * delta`` added to its input (plain hooks):
    compute the reader's q/k/v (or normalised MLP / final input) from the shifted residual, and put
    that one head's (or the MLP's / the logits') value into an otherwise clean run."""
    n = model.cfg.n_layers
    if edge.downstream == "logits":
        src, target, head = f"blocks.{n - 1}.hook_resid_post", "ln_final.hook_normalized", None
    elif edge.downstream.startswith("m"):
        layer = int(edge.downstream[1:])
        src = f"blocks.{layer}.hook_resid_{'pre' if model.cfg.parallel else 'mid'}"
        target, head = f"blocks.{layer}.ln2.hook_normalized", None
    else:
        layer, head = map(int, edge.downstream[1:].split(".h"))
        src, target = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_{edge.input}"
    with model.hooks({src: lambda x, hook: x + scale * delta}):
        _, shifted = model.run_with_cache(CLEAN, [target])
    with model.hooks({target: edits.replace(shifted[target], head=head)}):
        return float(metric(model(CLEAN)).mean())


def test_graph_has_the_edges_counted_by_hand():
    llama = Graph.of(ms.load_model("tiny-llama"))  # 2 layers, 4 heads, sequential
    assert llama.upstream[:6] == ["input", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0"]
    assert llama.downstream[:2] == [("a0.h0", "q"), ("a0.h1", "q")] and llama.downstream[-2:] == [
        ("m1", ""),
        ("logits", ""),
    ]
    # Layer-l heads read 1 + 5l writers through 12 inputs; MLP l reads 5 + 5l; the logits read all 11.
    assert int(llama.valid.sum()) == (12 * 1 + 5) + (12 * 6 + 10) + 11 == 110
    neox = Graph.of(ms.load_model("tiny-gpt_neox"))  # parallel: an MLP does not read its own layer's heads
    assert int(neox.valid.sum()) == (12 * 1 + 1) + (12 * 6 + 6) + 11
    up, down = neox.upstream.index("a1.h0"), neox.downstream.index(("m1", ""))
    assert not neox.valid[up, down] and llama.valid[up, down]
    attn_only = Graph.of(ms.load_model("tiny-attn_only"))
    assert "m0" not in attn_only.upstream and int(attn_only.valid.sum()) == 12 * 1 + 12 * 5 + 9


def test_edge_scores_equal_finite_differences(model64):
    metric = _metric(model64)
    scores = edge_attribution(model64, CLEAN, CORRUPT, metric)
    assert scores.clean == pytest.approx(float(metric(model64(CLEAN)).mean()), abs=1e-6)
    assert scores.corrupted == pytest.approx(float(metric(model64(CORRUPT)).mean()), abs=1e-6)
    edges = scores.edges()
    assert len(edges) == len(scores) == 110 and abs(edges[0].score) >= abs(edges[1].score) >= abs(
        edges[-1].score
    )
    # The strongest edge into each kind of input: q, k, v of a head, an MLP, the logits.
    picked = [
        next(e for e in edges if e.input == kind and e.downstream.startswith(start))
        for kind, start in (("q", "a"), ("k", "a"), ("v", "a"), ("", "m"), ("", "logits"))
    ]
    _, clean = model64.run_with_cache(CLEAN)
    _, corrupt = model64.run_with_cache(CORRUPT)
    eps = 1e-3
    for e in picked:
        delta = _write(model64, corrupt, e.upstream) - _write(model64, clean, e.upstream)
        fd = (_reader_run(model64, e, delta, eps, metric) - _reader_run(model64, e, delta, -eps, metric)) / (
            2 * eps
        )
        assert abs(e.score) > 1e-3 and e.score == pytest.approx(fd, rel=1e-3, abs=1e-5), e


def test_every_family_scores_writes_and_runs_circuits_exactly(tiny):
    metric = _metric(tiny)
    if tiny.cfg.post_norms:
        with pytest.raises(ValueError, match="post-norms"):
            edge_attribution(tiny, CLEAN, CORRUPT, metric)
        return
    scores = edge_attribution(tiny, CLEAN, CORRUPT, metric)
    g = scores.graph
    # Edges into the logits: (write difference) . (gradient at the final residual), independently.
    n = tiny.cfg.n_layers
    name = f"blocks.{n - 1}.hook_resid_post"
    grad = tiny.run_with_grads(CLEAN, lambda logits: metric(logits).mean(), [name]).grads[name]
    _, clean = tiny.run_with_cache(CLEAN)
    _, corrupt = tiny.run_with_cache(CORRUPT)
    for node in g.upstream:
        expected = float(((_write(tiny, corrupt, node) - _write(tiny, clean, node)) * grad).sum())
        assert scores.scores[g.upstream.index(node), -1].item() == pytest.approx(expected, abs=1e-5)
    # Nothing removed is the clean run; everything swapped for the corrupted writes is the corrupted run.
    empty = Circuit(g, torch.zeros_like(g.valid), scores.scores)
    both = circuit_metrics(tiny, [_full(g), empty], CLEAN, CORRUPT, metric, "corrupted")
    plain = torch.tensor([float(metric(tiny(CLEAN)).mean()), float(metric(tiny(CORRUPT)).mean())])
    torch.testing.assert_close(both, plain, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ABLATIONS)
def test_faithfulness_is_one_for_everything_and_zero_for_nothing(model64, how):
    g = Graph.of(model64)
    full, empty = _full(g), Circuit(g, torch.zeros_like(g.valid), torch.zeros(g.valid.shape))
    metric = _metric(model64)
    assert faithfulness(model64, full, CLEAN, CORRUPT, metric, how) == 1.0
    assert faithfulness(model64, empty, CLEAN, CORRUPT, metric, how) == 0.0
    some = prune(edge_attribution(model64, CLEAN, CORRUPT, metric), 30)
    assert 0.0 != faithfulness(model64, some, CLEAN, CORRUPT, metric, how) != 1.0


def _node_hook(model, node: str, how: str, corrupt=CORRUPT):
    """Plain node ablation with :mod:`~mechscope.interventions.ablation`: (hook name, hook fn)."""
    if node == "input":
        name, head = "blocks.0.hook_resid_pre", None
    elif node.startswith("m"):
        name, head = f"blocks.{node[1:]}.hook_mlp_out", None
    else:
        layer, head = map(int, node[1:].split(".h"))
        name = f"blocks.{layer}.attn.hook_z"
    if how == "mean":
        means = ablation.mean_activations(model, [corrupt] if isinstance(corrupt, str) else corrupt, [name])
        return name, ablation.mean_ablation(means[name], head=head)
    _, ref = model.run_with_cache(corrupt, [name])
    if how == "resample":
        return name, ablation.resample_ablation(ref[name], head=head, seed=0)
    return name, edits.replace(ref[name], head=head)


@pytest.mark.parametrize("how", ABLATIONS)
def test_node_ablation_equals_removing_all_its_output_edges(model64, how):
    g, metric = Graph.of(model64), _metric(model64)
    nodes = ["input", "a0.h1", "m0", "a1.h2"]
    got = circuit_metrics(model64, [_without(g, n) for n in nodes], CLEAN, CORRUPT, metric, how)
    for node, value in zip(nodes, got.tolist(), strict=True):
        name, fn = _node_hook(model64, node, how)
        with model64.hooks({name: fn}):
            expected = float(metric(model64(CLEAN)).mean())
        assert value == pytest.approx(expected, abs=1e-6), node


@pytest.mark.parametrize("how", ABLATIONS)
def test_single_prompt_strings(model64, how):
    g, metric = Graph.of(model64), _metric(model64)
    got = circuit_metrics(model64, [_without(g, "a1.h0")], CLEAN[0], CORRUPT[0], metric, how)
    name, fn = _node_hook(model64, "a1.h0", how, CORRUPT[0])
    with model64.hooks({name: fn}):
        assert float(got[0]) == pytest.approx(float(metric(model64(CLEAN[0])).mean()), abs=1e-6)


def test_edge_attribution_costs_two_forwards_and_one_backward(model64, monkeypatch):
    forwards, backwards = [], []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: backwards.append(1) or grad(*a, **k))
    with model64.hooks({"hook_embed": lambda x, hook: forwards.append(1)}):
        edge_attribution(model64, CLEAN, CORRUPT, _metric(model64))
    assert (len(forwards), len(backwards)) == (2, 1)


def test_removing_one_edge_changes_only_that_reader(model64):
    metric = _metric(model64)
    g = Graph.of(model64)
    _, clean = model64.run_with_cache(CLEAN)
    _, corrupt = model64.run_with_cache(CORRUPT)
    for edge in [("a0.h3", "a1.h1", "k"), ("input", "a0.h2", "v"), ("a0.h0", "m0", ""), ("m0", "logits", "")]:
        c = _full(g)
        c.mask[g.upstream.index(edge[0]), g.downstream.index(edge[1:])] = False
        got = float(circuit_metrics(model64, [c], CLEAN, CORRUPT, metric, "corrupted")[0])
        delta = _write(model64, corrupt, edge[0]) - _write(model64, clean, edge[0])
        e = type("E", (), {"downstream": edge[1], "input": edge[2]})
        assert got == pytest.approx(_reader_run(model64, e, delta, 1.0, metric), abs=1e-6), edge


def test_prune_keeps_the_top_edges_that_reach_the_logits():
    g = Graph.of(ms.load_model("tiny-llama"))
    s = torch.zeros(g.valid.shape)

    def put(u, d, value):
        s[g.upstream.index(u), g.downstream.index(d)] = value

    put("input", ("a0.h0", "q"), 5.0)  # a0.h0 writes nowhere kept: dropped
    put("a0.h1", ("logits", ""), -4.0)
    put("input", ("a0.h1", "v"), 3.0)
    put("m0", ("m1", ""), -2.0)  # m1 writes nowhere kept: dropped
    put("a1.h2", ("logits", ""), 1.0)
    scores = EdgeScores(g, s, 1.0, 0.0)
    c = prune(scores, 5)
    assert [(e.upstream, e.downstream, e.input) for e in c.edges] == [
        ("a0.h1", "logits", ""),
        ("input", "a0.h1", "v"),
        ("a1.h2", "logits", ""),
    ]
    assert c.nodes == ["input", "a0.h1", "a1.h2", "logits"]
    assert [e.score for e in prune(scores, threshold=2.5).edges] == [-4.0, 3.0]
    assert prune(scores, 0).edges == []
    page = c.to_html(full_page=False)
    assert page.count("<path") == 3 and "a0.h1 -&gt; logits: -4" in page and "http" not in page
    assert c._repr_html_() == page and "<svg" in c.to_html()
    assert c.to_html(max_edges=1).count("<path") == 1 and "the strongest 1 drawn" in c.to_html(max_edges=1)
    with pytest.raises(ValueError, match="exactly one"):
        prune(scores, 3, threshold=1.0)
    with pytest.raises(ValueError, match="n_edges must be in"):
        prune(scores, 1000)


def test_pruned_real_scores_reach_the_logits(model64):
    scores = edge_attribution(model64, CLEAN, CORRUPT, _metric(model64))
    c = prune(scores, 20)
    kth = sorted((abs(e.score) for e in scores.edges()), reverse=True)[19]
    assert 0 < len(c.edges) <= 20 and all(abs(e.score) >= kth for e in c.edges)
    reach = {"logits"}
    for e in sorted(c.edges, key=lambda e: -scores.graph.upstream.index(e.upstream)):
        reach.add(e.upstream) if e.downstream in reach else None
    assert all(e.downstream in reach for e in c.edges)


def test_bad_inputs_are_clear(model64):
    metric = _metric(model64)
    g = Graph.of(model64)
    with pytest.raises(ValueError, match="same token shape"):
        edge_attribution(model64, "short", "much longer text", metric)
    with pytest.raises(ValueError, match="same token shape"):
        faithfulness(model64, _full(g), "short", "much longer text", metric)
    with pytest.raises(ValueError, match="another model"):
        faithfulness(ms.load_model("tiny-attn_only"), _full(g), CLEAN, CORRUPT, metric)
    with pytest.raises((ValueError, TypeError), match="ablation"):
        faithfulness(model64, _full(g), CLEAN, CORRUPT, metric, "zero")
    with pytest.raises(ValueError, match="clean length"):
        faithfulness(model64, _full(g), CLEAN, CORRUPT, metric, "resample", reference=["ab"])
    with pytest.raises(ValueError, match="post-norms"):
        Graph.of(ms.load_model("tiny-gemma2"))
