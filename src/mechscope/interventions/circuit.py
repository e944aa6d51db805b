"""Circuit discovery by edge attribution patching (EAP; Syed, Rager & Conmy 2023), and faithfulness.

**The graph.** Nodes are the input (the embeddings, i.e. ``blocks.0.hook_resid_pre``), every attention
head (``a{L}.h{H}``), every MLP (``m{L}``) and the logits. Each node writes into the residual stream
(a head writes ``z_h @ W_O[h]``; the output bias, the same in every run, belongs to no node), and each
node reads the sum of the writes before it. An edge ``u -> v`` is u's write as it enters v's input: a
head has three inputs (``q``, ``k``, ``v``), an MLP and the logits one each, so a head has three edges
from every upstream node. In parallel blocks (GPT-NeoX) an MLP reads no head of its own layer.
Grouped-query attention: mechscope shows k and v per *query* head (``hook_k``/``hook_v``), so every
query head gets its own k and v input, as in the equivalent multi-head model with repeated
``W_K``/``W_V``; the score of a shared key input of a KV group is the sum over its query heads.

**Per-input runs, exactly.** A reader's input is "the residual stream as that reader alone sees it,
before its norm". :func:`_split_inputs` makes this literal with the model's own modules: in every
layer the pre-attention norm and the attention run on ``3 * n_heads`` copies of the batch, copy
``(kind, h)`` holding the input of head h's ``kind``; ``hook_q/k/v`` then assemble each head's q, k, v
from its own copy, so every later computation (scores, pattern, z, output) is the model's own. The
MLPs and logits read their own input through their pre-norm. Each reader's input is the run's residual
stream plus a per-reader delta:

* EAP: the deltas are zero leaves of the autograd graph, so one backward gives every reader's exact
  input gradient (no rotary / q-norm algebra: autograd runs through the real modules). The score of
  ``u -> v`` is ``(a_u(corrupted) - a_u(clean)) . d metric / d input_v`` on the clean run, summed over
  prompts and positions, with the backward on ``metric(logits).mean()``: the first-order change of
  the mean metric when that edge alone carries its corrupted value (the paper's sign convention).
* Faithfulness: the delta of reader v is ``- sum over removed u of (a_u(run) - a_u(ablated))``, with
  ``a_u(run)`` u's write in this very run (u's own inputs may be ablated too). Kept edges carry what
  their upstream node computes in the circuit run, as in ACDC; with nothing removed the run is the
  clean run, with everything removed every reader sees ablated writes only (the corrupted run, for
  ``ablation="corrupted"``).

Cost: EAP is 2 forwards + 1 backward, faithfulness 2 forwards (the ablation source, then circuit,
full and empty variants on the batch axis); attention runs on ``3 * n_heads`` copies in both.
Not supported: post-norm models (Gemma 2/3), whose ``attn_out`` is a norm of the head sum and so
not a sum of per-head writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.interventions.ablation import mean_activations
from mechscope.interventions.metrics import Metric
from mechscope.interventions.patching import prepare_pair
from mechscope.models import HookedModel
from mechscope.models.adapters.base import get_module

KINDS = ("q", "k", "v")


class Edge(NamedTuple):
    upstream: str
    downstream: str
    input: str
    """``q``/``k``/``v`` for a head, ``""`` for an MLP or the logits."""
    score: float


@dataclass(frozen=True)
class Graph:
    """Nodes and edges of a model's computational graph (see the module docstring)."""

    n_layers: int
    n_heads: int
    has_mlp: bool
    parallel: bool

    @classmethod
    def of(cls, model: HookedModel) -> Graph:
        if model.cfg.post_norms:
            raise ValueError(
                f"{model.cfg.family} normalises sublayer outputs (post-norms), so a head's write is not "
                "z @ W_O and edges are undefined; use a pre-norm model (Llama, GPT-2, NeoX)"
            )
        c = model.cfg
        return cls(c.n_layers, c.n_heads, c.has_mlp, c.parallel)

    @property
    def _up_block(self) -> int:
        return self.n_heads + self.has_mlp

    @property
    def _down_block(self) -> int:
        return 3 * self.n_heads + self.has_mlp

    @cached_property
    def upstream(self) -> list[str]:
        """Writers in forward order: input, then per layer its heads and its MLP."""
        mlp = lambda i: [f"m{i}"] if self.has_mlp else []  # noqa: E731
        return ["input"] + [
            n for i in range(self.n_layers) for n in [f"a{i}.h{h}" for h in range(self.n_heads)] + mlp(i)
        ]

    @cached_property
    def downstream(self) -> list[tuple[str, str]]:
        """Readers ``(node, input)`` in forward order: per layer q, k, v of every head, its MLP; the logits."""
        out = []
        for i in range(self.n_layers):
            out += [(f"a{i}.h{h}", k) for k in KINDS for h in range(self.n_heads)]
            out += [(f"m{i}", "")] if self.has_mlp else []
        return out + [("logits", "")]

    def up(self, layer: int) -> slice:
        """Upstream indices of layer ``layer``'s heads (its MLP follows them)."""
        start = 1 + layer * self._up_block
        return slice(start, start + self.n_heads)

    def heads_in(self, layer: int) -> slice:
        """Downstream indices of layer ``layer``'s head inputs, ``kind * n_heads + head``."""
        start = layer * self._down_block
        return slice(start, start + 3 * self.n_heads)

    def mlp_in(self, layer: int) -> int:
        return layer * self._down_block + 3 * self.n_heads

    @cached_property
    def valid(self) -> Bool[Tensor, "n_up n_down"]:
        """Which (upstream, downstream) pairs are edges: the writer runs before the reader reads."""
        # Stages: head writes of layer i at 2i, MLP writes at 2i+1; readers read what was written before.
        write = [-1] + [
            2 * i + (j == self.n_heads) for i in range(self.n_layers) for j in range(self._up_block)
        ]
        read = []
        for i in range(self.n_layers):
            read += [2 * i] * (3 * self.n_heads) + ([2 * i + (not self.parallel)] if self.has_mlp else [])
        read.append(2 * self.n_layers)
        return torch.tensor(write)[:, None] < torch.tensor(read)[None, :]

    def check(self, model: HookedModel) -> None:
        if Graph.of(model) != self:
            raise ValueError(f"this graph is for another model shape ({self}); score this model first")


def _records(graph: Graph, scores: Tensor, mask: Tensor) -> list[Edge]:
    up, down = mask.nonzero(as_tuple=True)
    values = scores[up, down]
    order = values.abs().argsort(descending=True, stable=True)
    return [
        Edge(graph.upstream[u], *graph.downstream[d], v)
        for u, d, v in zip(up[order].tolist(), down[order].tolist(), values[order].tolist(), strict=True)
    ]


@dataclass(frozen=True)
class EdgeScores:
    """EAP scores of every edge: the estimated change of the mean metric when that edge is corrupted."""

    graph: Graph
    scores: Float[Tensor, "n_up n_down"]
    """``scores[u, d]`` for upstream ``graph.upstream[u]`` and reader ``graph.downstream[d]``; 0 off-graph."""
    clean: float
    corrupted: float

    def edges(self) -> list[Edge]:
        """Every edge, largest ``|score|`` first (pandas is not a dependency: plain records)."""
        return _records(self.graph, self.scores, self.graph.valid)

    def __len__(self) -> int:
        return int(self.graph.valid.sum())


@dataclass(frozen=True)
class Circuit:
    """A subgraph: the edges that stay live; every other edge carries its upstream node's ablated value."""

    graph: Graph
    mask: Bool[Tensor, "n_up n_down"]
    scores: Float[Tensor, "n_up n_down"]

    @property
    def edges(self) -> list[Edge]:
        return _records(self.graph, self.scores, self.mask)

    @property
    def nodes(self) -> list[str]:
        """Nodes on a kept edge, in forward order."""
        g = self.graph
        used = {g.upstream[u] for u in self.mask.any(1).nonzero().flatten().tolist()}
        used |= {g.downstream[d][0] for d in self.mask.any(0).nonzero().flatten().tolist()}
        return [n for n in g.upstream + ["logits"] if n in used]

    def to_html(self, full_page: bool = True, max_edges: int = 300) -> str:
        """Inline SVG: layers as rows (input at the bottom, logits on top), the ``max_edges`` strongest
        edges drawn with width ~ |score|, red positive, blue negative; hover for names and scores."""
        from mechscope.viz.circuit import render_circuit_svg

        edges = self.edges
        svg = render_circuit_svg(self, edges[:max_edges])
        shown = f" (the strongest {max_edges} drawn)" if len(edges) > max_edges else ""
        title = f"circuit: {len(edges)} edges{shown}, {len(self.nodes)} nodes"
        body = f"<h3>{title}</h3>{svg}"
        if not full_page:
            return body
        return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head><body style='font:13px system-ui,sans-serif'>{body}</body></html>"

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)


def prune(scores: EdgeScores, n_edges: int | None = None, *, threshold: float | None = None) -> Circuit:
    """Keep the ``n_edges`` edges of largest ``|score|`` (or those with ``|score| >= threshold``), then drop
    edges into nodes that no longer reach the logits (so a circuit may end up with fewer edges)."""
    if (n_edges is None) == (threshold is None):
        raise ValueError("give exactly one of n_edges or threshold")
    g = scores.graph
    mag = scores.scores.abs().masked_fill(~g.valid, -1.0)
    if n_edges is not None:
        if not 0 <= n_edges <= len(scores):
            raise ValueError(f"n_edges must be in [0, {len(scores)}], got {n_edges}")
        mask = torch.zeros_like(g.valid)
        mask.view(-1)[mag.flatten().topk(n_edges).indices] = True
    else:
        mask = (mag >= threshold) & g.valid
    node_of = [g.upstream.index(n) if n != "logits" else -1 for n, _ in g.downstream]
    alive = torch.zeros(len(g.upstream) + 1, dtype=torch.bool)
    alive[-1] = True  # the logits
    reads = torch.tensor(node_of)
    for u in reversed(range(len(g.upstream))):  # forward order is topological: readers come later
        alive[u] = bool((mask[u] & alive[reads]).any())
    mask &= alive[reads][None, :]
    return Circuit(g, mask, scores.scores)


# ---------------------------------------------------------------- per-reader runs


def _expand(x, rows: int, copies: int):
    """Per-row tensors (mask, positions, rotary tables) of ``rows`` rows, repeated for every copy."""
    if isinstance(x, Tensor) and x.ndim >= 2 and x.shape[0] == rows and rows > 1:
        return x.repeat(copies, *([1] * (x.ndim - 1)))
    if isinstance(x, (tuple, list)):
        return type(x)(_expand(t, rows, copies) for t in x)
    return x


class _Deltas:
    """What a per-reader run adds to each reader's input, and what it records of each node's write."""

    def record(self, up: slice, writes: Tensor) -> None:
        raise NotImplementedError

    def delta(self, down: slice, x: Tensor) -> Tensor:
        raise NotImplementedError


@contextmanager
def _split_inputs(model: HookedModel, graph: Graph, deltas: _Deltas) -> Iterator[None]:
    """Give each reader its own input (see the module docstring); writes are reported as they happen."""
    a, H = model.adapter, graph.n_heads
    W_O = [b.W_O for b in model.weights.blocks]
    rows: dict[int, int] = {}
    handles = []

    def ln1_pre(i):
        def fn(module, args):
            x = args[0]
            rows[i] = x.shape[0]
            return ((x[None] + deltas.delta(graph.heads_in(i), x)).flatten(0, 1), *args[1:])

        return fn

    def attn_pre(i):
        def fn(module, args, kwargs):
            n = rows[i]
            new_kwargs = {k: v if k == "hidden_states" else _expand(v, n, 3 * H) for k, v in kwargs.items()}
            return (args[:1] + tuple(_expand(v, n, 3 * H) for v in args[1:]), new_kwargs)

        return fn

    def attn_post(i):
        def fn(module, args, kwargs, out):
            cut = lambda t: t[: rows[i]] if isinstance(t, Tensor) and t.shape[0] == 3 * H * rows[i] else t  # noqa: E731
            return tuple(cut(t) for t in out) if isinstance(out, tuple) else cut(out)

        return fn

    def assemble(kind):
        def fn(x, hook):  # [copies*rows pos head d_head]: head h's kind comes from copy kind*H + h
            copies = x.unflatten(0, (3 * H, -1))
            h = torch.arange(H, device=x.device)
            own = copies[kind * H + h, :, :, h]  # [head rows pos d_head]
            return own.permute(1, 2, 0, 3).unsqueeze(0).expand(3 * H, -1, -1, -1, -1).reshape(x.shape)

        return fn

    def record_heads(i):
        def fn(z, hook):
            deltas.record(graph.up(i), torch.einsum("rphe,hed->hrpd", z[: rows[i]], W_O[i]))

        return fn

    def record_mlp(i):
        def fn(x, hook):
            deltas.record(slice(graph.up(i).stop, graph.up(i).stop + 1), x[None])

        return fn

    def reader_pre(index):
        return lambda module, args: (args[0] + deltas.delta(slice(index, index + 1), args[0])[0], *args[1:])

    spec = [("blocks.0.hook_resid_pre", lambda x, hook: deltas.record(slice(0, 1), x[None]))]
    for i in range(graph.n_layers):
        layer = model.layer(i)
        attn = get_module(layer, a.attn)
        handles += [
            get_module(layer, a.ln1).register_forward_pre_hook(ln1_pre(i)),
            attn.register_forward_pre_hook(attn_pre(i), with_kwargs=True),
            attn.register_forward_hook(attn_post(i), with_kwargs=True),
        ]
        spec += [(f"blocks.{i}.attn.hook_{k}", assemble(j)) for j, k in enumerate(KINDS)]
        spec.append((f"blocks.{i}.attn.hook_z", record_heads(i)))
        if graph.has_mlp:
            handles.append(get_module(layer, a.ln2).register_forward_pre_hook(reader_pre(graph.mlp_in(i))))
            spec.append((f"blocks.{i}.hook_mlp_out", record_mlp(i)))
    final = model.module(a.final_norm)
    handles.append(final.register_forward_pre_hook(reader_pre(len(graph.downstream) - 1)))
    try:
        with model.hooks(spec):
            yield
    finally:
        for h in handles:
            h.remove()


def _writes(model: HookedModel, graph: Graph, cache) -> Float[Tensor, "n_up batch pos d_model"]:
    """Every node's write from a cache of ``resid_pre`` 0, ``hook_z`` and ``hook_mlp_out``."""
    W = model.weights.blocks
    out = [cache["blocks.0.hook_resid_pre"][None]]
    for i in range(graph.n_layers):
        out.append(torch.einsum("...he,hed->h...d", cache[f"blocks.{i}.attn.hook_z"], W[i].W_O))
        if graph.has_mlp:
            out.append(cache[f"blocks.{i}.hook_mlp_out"][None])
    return torch.cat(out)


def _write_names(graph: Graph) -> list[str]:
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.attn.hook_z" for i in range(graph.n_layers)]
    return names + ([f"blocks.{i}.hook_mlp_out" for i in range(graph.n_layers)] if graph.has_mlp else [])


class _Leaves(_Deltas):
    """EAP: zero deltas that autograd differentiates; writes of the run are kept."""

    def __init__(self):
        self.leaves: dict[int, Tensor] = {}
        self.writes: dict[int, Tensor] = {}

    def record(self, up, writes):
        self.writes[up.start] = writes.detach()

    def delta(self, down, x):
        leaf = torch.zeros(
            down.stop - down.start, *x.shape, dtype=x.dtype, device=x.device, requires_grad=True
        )
        self.leaves[down.start] = leaf
        return leaf


def edge_attribution(
    model: HookedModel,
    clean: str | list[str] | Tensor,
    corrupted: str | list[str] | Tensor,
    metric: Metric,
) -> EdgeScores:
    """EAP scores of every edge in 2 forwards and 1 backward (see the module docstring for the convention).

    Raises:
        ValueError: inputs that do not align token by token (:func:`prepare_pair`), or a post-norm model.
    """
    graph = Graph.of(model)
    clean_t, corrupt_t = prepare_pair(model, clean, corrupted, metric)
    keep = getattr(metric, "reads_last", 0)
    with torch.no_grad():
        corrupt_logits, cache = model.run_with_cache(
            corrupt_t.ids, _write_names(graph), attention_mask=corrupt_t.mask, logits_to_keep=keep
        )
    leaves = _Leaves()
    with torch.enable_grad(), _split_inputs(model, graph, leaves):
        value = metric(model(clean_t.ids, attention_mask=clean_t.mask, logits_to_keep=keep)).mean()
        grads = torch.autograd.grad(value, [leaves.leaves[k] for k in sorted(leaves.leaves)])
    acc = torch.float64 if model.dtype == torch.float64 else torch.float32
    grad = torch.cat(grads).to(acc).flatten(1)  # [n_down batch*pos*d_model]
    clean_writes = torch.cat([leaves.writes[k] for k in sorted(leaves.writes)])
    diff = (_writes(model, graph, cache).to(acc) - clean_writes.to(acc)).flatten(1)
    scores = (diff @ grad.T).cpu() * graph.valid
    return EdgeScores(graph, scores, float(value.detach()), float(metric(corrupt_logits).float().mean()))


class _Ablate(_Deltas):
    """Faithfulness: each reader's removed upstream writes are swapped for their ablated values."""

    def __init__(self, removed: Tensor, ablated: Tensor, n_variants: int):
        self.removed, self.ablated, self.V = removed, ablated, n_variants  # removed: [V n_up n_down]
        self.diffs: Tensor | None = None
        self.n = 0

    def record(self, up, writes):  # writes: [n variants*batch pos d_model]
        w = writes.unflatten(1, (self.V, -1))
        if self.diffs is None:
            self.diffs = w.new_zeros(self.ablated.shape[0], *w.shape[1:])
        self.diffs[up] = w - self.ablated[up].unsqueeze(1).to(w.dtype)
        self.n = up.stop

    def delta(self, down, x):
        weight = self.removed[:, : self.n, down].to(x.dtype)  # [V u n]
        d = -torch.einsum("vun,uvbpd->nvbpd", weight, self.diffs[: self.n])
        return d.flatten(1, 2)


@torch.no_grad()
def _ablated_writes(model, graph, clean_t, corrupt_t, corrupted, ablation, reference, seed) -> Tensor:
    names = _write_names(graph)
    if ablation == "corrupted":
        return _writes(
            model, graph, model.run_with_cache(corrupt_t.ids, names, attention_mask=corrupt_t.mask)[1]
        )
    ref = corrupted if reference is None else reference  # the raw input keeps its padding mask
    ref = [ref] if isinstance(ref, str) else ref
    if ablation == "mean":
        means = mean_activations(model, ref, names)
        return _writes(model, graph, {n: m[None, None].to(model.dtype) for n, m in means.items()})
    if ablation == "resample":
        ref_t = model.prepare(ref, None, None, "right")
        if ref_t.ids.shape[1] != clean_t.ids.shape[1]:
            raise ValueError(
                f"resample ablation needs references of the clean length {clean_t.ids.shape[1]}, "
                f"got {ref_t.ids.shape[1]}"
            )
        rows = torch.randint(
            ref_t.ids.shape[0], (clean_t.ids.shape[0],), generator=torch.Generator().manual_seed(seed)
        )
        cache = model.run_with_cache(ref_t.ids, names, attention_mask=ref_t.mask)[1]
        return _writes(model, graph, cache)[:, rows.to(ref_t.ids.device)]
    raise ValueError(f"ablation must be 'mean', 'resample' or 'corrupted', got {ablation!r}")


@torch.no_grad()
def circuit_metrics(
    model: HookedModel,
    circuits: Sequence[Circuit],
    clean: str | list[str] | Tensor,
    corrupted: str | list[str] | Tensor,
    metric: Metric,
    ablation: Literal["mean", "resample", "corrupted"] = "mean",
    *,
    reference: str | list[str] | Tensor | None = None,
    seed: int = 0,
) -> Float[Tensor, " n_circuits"]:
    """The mean metric of the clean run with only each circuit's edges live, all circuits in one forward.

    Args:
        reference: prompts whose node writes the mean / resample ablations use (default: ``corrupted``).
        seed: which reference prompt each clean prompt gets under ``resample``.
    """
    if not circuits:
        raise ValueError("give at least one circuit")
    graph = circuits[0].graph
    for c in circuits:
        c.graph.check(model)
    clean_t, corrupt_t = prepare_pair(model, clean, corrupted, metric)
    ablated = _ablated_writes(model, graph, clean_t, corrupt_t, corrupted, ablation, reference, seed)
    removed = torch.stack([graph.valid & ~c.mask for c in circuits]).to(model.device)
    V = len(circuits)
    ids = clean_t.ids.repeat(V, 1)
    mask = None if clean_t.mask is None else clean_t.mask.repeat(V, 1)
    keep = getattr(metric, "reads_last", 0)
    with _split_inputs(model, graph, _Ablate(removed, ablated, V)):
        values = metric(model(ids, attention_mask=mask, logits_to_keep=keep))
    acc = torch.float64 if model.dtype == torch.float64 else torch.float32
    return values.to(acc).view(V, -1).mean(1).cpu()


def faithfulness(
    model: HookedModel,
    circuit: Circuit,
    clean: str | list[str] | Tensor,
    corrupted: str | list[str] | Tensor,
    metric: Metric,
    ablation: Literal["mean", "resample", "corrupted"] = "mean",
    *,
    reference: str | list[str] | Tensor | None = None,
    seed: int = 0,
) -> float:
    """``(metric(circuit) - metric(nothing)) / (metric(everything) - metric(nothing))``: 1 = the circuit
    alone restores the clean behaviour, 0 = it does no better than ablating every edge.

    The runs share one forward, and a circuit equal to either end is that end's own run, so the full
    circuit gives 1.0 and the empty one 0.0 exactly.
    """
    g = circuit.graph
    ends = [
        Circuit(g, g.valid.clone(), circuit.scores),
        Circuit(g, torch.zeros_like(g.valid), circuit.scores),
    ]
    same = [i for i, end in enumerate(ends) if torch.equal(end.mask, circuit.mask & g.valid)]
    runs = ends if same else [*ends, circuit]
    m = circuit_metrics(model, runs, clean, corrupted, metric, ablation, reference=reference, seed=seed)
    full, empty, mine = m[0], m[1], m[same[0] if same else 2]
    if full == empty:
        raise ValueError("the clean and fully ablated metrics are equal: faithfulness is undefined here")
    return float((mine - empty) / (full - empty))
