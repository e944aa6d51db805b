"""HookedModel: a HuggingFace causal LM with every TransformerLens hook point.

The HF model runs as it is; mechscope only wraps the ``forward`` of the modules whose points are
hooked, and only while they are (see ``hook_points``). An un-hooked forward is therefore the plain
HF forward, bit for bit.
This class does the forward, hooks and caching; tokens, generation, weights and analyses live in
their own modules as functions of a model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechscope.models import attention, tokens
from mechscope.models.adapters.base import Adapter, get_module
from mechscope.models.cache import ActivationCache
from mechscope.models.errors import ContextTooLongError
from mechscope.models.facts import ModelFacts
from mechscope.models.hook_names import ALIASES, all_hook_names, layer_points, parse, unknown_hook
from mechscope.models.hook_points import (
    HookFn,
    HookPoint,
    InputPoint,
    OutputPoint,
    ResidMidPoint,
    SwitchPoint,
    replaced_forward,
)

ModelInput = str | list[str] | Int[Tensor, "batch pos"] | Int[Tensor, " pos"]
NameSpec = str | Callable[[str], bool]
HookSpec = Mapping[NameSpec, HookFn] | Sequence[tuple[NameSpec, HookFn]] | None


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        return root.get_submodule(path) is not None
    except AttributeError:
        return False


def _pass_through(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


class _StopForward(Exception):
    def __init__(self, resid: Tensor):
        self.resid = resid


class GradRun(NamedTuple):
    """The result of :meth:`HookedModel.run_with_grads`."""

    metric: Tensor
    """The scalar metric's value."""
    cache: ActivationCache
    """Activations (detached)."""
    grads: ActivationCache
    """d metric / d activation for every cached name (zeros where the metric does not depend on it)."""


class HookedModel:
    """A causal LM with named hook points, caching and interventions.

    Attributes:
        hf_model: the underlying ``transformers`` model (unchanged apart from hooks while they are active).
        tokenizer: its ``transformers`` tokenizer.
        adapter: where this family keeps each part.
        cfg: the shape facts (:class:`ModelFacts`).
        prepend_bos: the default BOS policy for string inputs.
    """

    def __init__(
        self, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, adapter: Adapter, name: str = ""
    ):
        attention.register()
        self.hf_model = hf_model.eval()
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.name = name or getattr(hf_model.config, "name_or_path", "")
        pos = adapter.pos_embed
        self._pos_embed = pos if pos and _has_submodule(hf_model, pos) else None
        self.cfg = ModelFacts.from_hf(hf_model.config, adapter, learned_pos=self._pos_embed is not None)
        self.prepend_bos = tokens.default_prepend_bos(tokenizer, adapter.prepend_bos)
        if self.cfg.attn_softcap and hf_model.config._attn_implementation == "sdpa":
            # SDPA cannot soft-cap scores: older transformers (5.17) sent Gemma 2 there and dropped the
            # cap silently; later ones refuse. HF's eager kernel applies it.
            hf_model.config._attn_implementation = "eager"
        self._eager = attention.EagerSwitch(hf_model.config)
        self._points: dict[str, HookPoint] = self._build_points()
        self._raw_points: dict[str, HookPoint] = {}
        self._permanent: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        c = self.cfg
        return f"HookedModel({self.name!r}, {c.family}, {c.n_layers} layers, d_model={c.d_model}, {c.n_heads} heads)"

    # ------------------------------------------------------------------ structure
    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def module(self, path: str) -> nn.Module:
        """An HF submodule by dotted path from the causal-LM root."""
        return get_module(self.hf_model, path)

    def layer(self, index: int) -> nn.Module:
        """The HF decoder layer ``index``."""
        return self.module(self.adapter.layers)[index]

    @property
    def hook_names(self) -> list[str]:
        """Every canonical hook point, in the order the forward pass reaches them."""
        return list(self._points)

    def hook_point(self, name: str) -> HookPoint:
        """The :class:`HookPoint` of a canonical name, an alias, or a raw HF module path."""
        point = self._points.get(name)
        if point is not None:
            return point
        name = ALIASES.get(name, name)
        if name in self._points:
            return self._points[name]
        if name not in self._raw_points:
            try:
                mod = self.hf_model.get_submodule(name) if name else None
            except AttributeError:
                mod = None
            if mod is None or mod is self.hf_model:
                raise unknown_hook(name, self.hook_names)
            self._raw_points[name] = OutputPoint(name, None, mod)
        return self._raw_points[name]

    def add_hook_point(self, point: HookPoint, *, after: str | None = None) -> Callable[[], None]:
        """Register an extra named point (e.g. an SAE's latents) until the returned function removes it.

        The point joins the forward order right after ``after`` (and after extras already placed
        there; at the end when ``after`` is None or a raw HF path), so ``hook_point``, ``hook_names``,
        name predicates, ``hooks`` and ``run_with_cache`` treat it like a canonical point. Whoever
        registers it runs it (``point.run(x)``) from a hook function on a real point.
        """
        if point.name in self._points:
            raise ValueError(f"hook point {point.name!r} already exists")
        names = list(self._points)
        i = len(names)
        if after is not None:
            self.hook_point(after)  # an unknown name raises with the closest valid ones
            if after in self._points:
                i = names.index(after) + 1
                while i < len(names) and names[i].startswith(after + "."):
                    i += 1
        items = list(self._points.items())
        self._points = dict(items[:i] + [(point.name, point)] + items[i:])

        def remove() -> None:
            if self._points.get(point.name) is point:
                del self._points[point.name]

        return remove

    def _build_points(self) -> dict[str, HookPoint]:
        a, c = self.adapter, self.cfg
        points: dict[str, HookPoint] = {"hook_embed": OutputPoint("hook_embed", None, self.module(a.embed))}
        if self._pos_embed:
            points["hook_pos_embed"] = OutputPoint("hook_pos_embed", None, self.module(self._pos_embed))

        for i in range(c.n_layers):
            layer = self.layer(i)
            make = self._layer_point_makers(i, layer)
            for p in layer_points(parallel=c.parallel, gated=c.gated_mlp, has_mlp=c.has_mlp):
                points[f"blocks.{i}.{p}"] = make[p](f"blocks.{i}.{p}")
            attention.bind(
                get_module(layer, a.attn),
                attention.AttentionPoints(
                    *(points[f"blocks.{i}.attn.hook_{k}"] for k in ("q", "k", "v", "attn_scores", "pattern"))
                ),
            )
        points["ln_final.hook_normalized"] = OutputPoint(
            "ln_final.hook_normalized", None, self.module(a.final_norm)
        )
        points["unembed.hook_out"] = OutputPoint("unembed.hook_out", None, self.module(a.unembed))
        expected = all_hook_names(
            c.n_layers,
            parallel=c.parallel,
            gated=c.gated_mlp,
            learned_pos=self._pos_embed is not None,
            has_mlp=c.has_mlp,
        )
        assert list(points) == expected, "hook_names grammar and HookedModel disagree"
        return points

    def _layer_point_makers(self, i: int, layer: nn.Module) -> dict[str, Callable[[str], HookPoint]]:
        """For block ``i``: point name -> constructor of its HookPoint on the right HF module."""
        a, c = self.adapter, self.cfg

        def sub(path: str) -> nn.Module:
            return get_module(layer, path)

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (c.n_heads, c.d_head))

        def flat(t: Tensor) -> Tensor:
            return t.flatten(-2)

        switch = self._eager
        return {
            "hook_resid_pre": lambda n: InputPoint(n, i, layer),
            "ln1.hook_normalized": lambda n: OutputPoint(n, i, sub(a.ln1)),
            "attn.hook_q": lambda n: SwitchPoint(n, i, switch),
            "attn.hook_k": lambda n: SwitchPoint(n, i, switch),
            "attn.hook_v": lambda n: SwitchPoint(n, i, switch),
            "attn.hook_attn_scores": lambda n: SwitchPoint(n, i, switch),
            "attn.hook_pattern": lambda n: SwitchPoint(n, i, switch),
            "attn.hook_z": lambda n: InputPoint(n, i, sub(a.o_proj), heads, flat),
            "hook_attn_out": lambda n: OutputPoint(n, i, sub(a.attn_out)),
            "hook_resid_mid": lambda n: ResidMidPoint(n, i, layer, sub(a.ln2), sub(a.mlp_out)),
            "ln2.hook_normalized": lambda n: OutputPoint(n, i, sub(a.ln2)),
            "mlp.hook_pre": lambda n: OutputPoint(n, i, sub(a.mlp_in)),
            "mlp.hook_pre_linear": lambda n: OutputPoint(n, i, sub(a.mlp_in_linear)),
            "mlp.hook_post": lambda n: InputPoint(n, i, sub(a.mlp_out_proj)),
            "hook_mlp_out": lambda n: OutputPoint(n, i, sub(a.mlp_out)),
            "hook_resid_post": lambda n: OutputPoint(n, i, layer),
        }

    # ------------------------------------------------------------------ hooks
    def _resolve(self, spec: HookSpec) -> list[tuple[HookPoint, HookFn]]:
        if spec is None:
            return []
        items = spec.items() if isinstance(spec, Mapping) else spec
        resolved = []
        for key, fn in items:
            if not callable(fn):
                raise TypeError(
                    f"the hook for {key!r} is {type(fn).__name__}, not a function fn(activation, hook)"
                )
            if callable(key):
                resolved += [(self._points[n], fn) for n in self._points if key(n)]
            else:
                resolved.append((self.hook_point(key), fn))
        return resolved

    @contextmanager
    def hooks(self, hooks: HookSpec = None) -> Iterator[HookedModel]:
        """Attach ``{name: fn}`` (or ``[(name, fn), ...]``) for the ``with`` block; always detached after.

        A name may also be a predicate over hook names. ``fn(activation, hook)`` may return a
        replacement of the same shape and dtype. Contexts nest; inner functions run after outer ones.
        """
        resolved = self._resolve(hooks)  # every name is checked before anything attaches
        removers: list[Callable[[], None]] = []
        try:
            for point, fn in resolved:
                removers.append(point.add(fn))
            yield self
        finally:
            for remove in reversed(removers):
                remove()

    @contextmanager
    def saes(self, *saes: Any, use_error_term: bool = False) -> Iterator[HookedModel]:
        """Run with each SAE's reconstruction at its hook point, its latents as ``{hook}.hook_sae_acts``
        (see :func:`mechscope.saes.splice.splice`)."""
        from mechscope.saes.splice import splice  # models must not import saes at load time

        with splice(self, *saes, use_error_term=use_error_term) as model:
            yield model

    def add_hook(self, name: NameSpec, fn: HookFn) -> Callable[[], None]:
        """Attach a hook until the returned function (or :meth:`reset_hooks`) removes it."""
        removers = [point.add(f) for point, f in self._resolve([(name, fn)])]

        def remove() -> None:
            for r in removers:
                r()
            if remove in self._permanent:  # forget it, so that nothing keeps fn alive
                self._permanent.remove(remove)

        self._permanent.append(remove)
        return remove

    def reset_hooks(self) -> None:
        """Remove every hook added with :meth:`add_hook`."""
        while self._permanent:
            self._permanent.pop()()

    # ------------------------------------------------------------------ tokens
    def to_tokens(
        self, text: str | list[str], *, prepend_bos: bool | None = None, padding_side: str = "right"
    ) -> Int[Tensor, "batch pos"]:
        """Token ids on the model's device (padded on ``padding_side``; see :meth:`tokenize` for the mask)."""
        return self.tokenize(text, prepend_bos=prepend_bos, padding_side=padding_side).ids

    def tokenize(
        self, text: str | list[str], *, prepend_bos: bool | None = None, padding_side: str = "right"
    ) -> tokens.Tokens:
        """Token ids and the padding mask (None when nothing is padded)."""
        bos = self.prepend_bos if prepend_bos is None else prepend_bos
        return tokens.to_tokens(
            self.tokenizer, text, prepend_bos=bos, padding_side=padding_side, device=self.device
        )

    def to_str_tokens(
        self, text_or_ids: str | Tensor | list[int], *, prepend_bos: bool | None = None
    ) -> list[str]:
        """Each token of one sequence as a string."""
        ids = (
            self.to_tokens(text_or_ids, prepend_bos=prepend_bos)[0]
            if isinstance(text_or_ids, str)
            else text_or_ids
        )
        if isinstance(ids, Tensor) and ids.ndim == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"to_str_tokens takes one sequence, got a batch of {ids.shape[0]}")
            ids = ids[0]
        return tokens.to_str_tokens(self.tokenizer, ids)

    def to_single_token(self, text: str) -> int:
        """The id of a string that must be exactly one token."""
        return tokens.to_single_token(self.tokenizer, text)

    def to_string(self, ids: Tensor | list[int]) -> str | list[str]:
        """Decode one sequence to a string, or a batch to a list of strings."""
        if isinstance(ids, Tensor) and ids.ndim == 2:
            return [self.tokenizer.decode(r) for r in ids.tolist()]
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, Tensor) else ids)

    def prepare(
        self, input: ModelInput, attention_mask: Tensor | None, prepend_bos: bool | None, padding_side: str
    ) -> tokens.Tokens:
        """Any model input as token ids on the model's device plus its padding mask, length-checked."""
        if isinstance(input, (str, list)):
            toks = self.tokenize(input, prepend_bos=prepend_bos, padding_side=padding_side)
        elif isinstance(input, Tensor):
            ids = input if input.ndim == 2 else input.unsqueeze(0)
            if ids.dtype not in (torch.long, torch.int32, torch.int64):
                raise TypeError(f"token tensor must hold integer ids, got {ids.dtype}")
            mask = (
                None
                if attention_mask is None or bool(attention_mask.all())
                else attention_mask.to(self.device)
            )
            toks = tokens.Tokens(ids.long().to(self.device), mask)
        else:
            raise TypeError(
                f"input must be a string, a list of strings or a token tensor, got {type(input).__name__}"
            )
        if toks.ids.shape[1] > self.cfg.n_ctx:
            raise ContextTooLongError(
                f"{toks.ids.shape[1]} tokens exceed the model's context of {self.cfg.n_ctx}; truncate the input"
            )
        return toks

    # ------------------------------------------------------------------ forward
    def _forward(self, toks: tokens.Tokens, **kwargs: Any) -> Tensor:
        if toks.mask is not None:
            # Positions from the mask keep left-padded rows right; equal to arange for right padding.
            kwargs.update(attention_mask=toks.mask, position_ids=(toks.mask.cumsum(-1) - 1).clamp(min=0))
        return self.hf_model(input_ids=toks.ids, use_cache=False, **kwargs).logits

    def __call__(
        self,
        input: ModelInput,
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        prepend_bos: bool | None = None,
        padding_side: str = "right",
        logits_to_keep: int = 0,
    ) -> Float[Tensor, "batch kept_pos d_vocab"]:
        """Logits for a string, a list of strings (padded) or token ids, with whatever hooks are attached.

        ``logits_to_keep=n`` unembeds only the last ``n`` positions (0: all, ``kept_pos = pos``), which saves the
        largest matmul of a small model when a metric reads the last position only.
        """
        toks = self.prepare(input, attention_mask, prepend_bos, padding_side)
        if not logits_to_keep:
            return self._forward(toks)
        # HF slices the last positions as a strided view, on which torch's linear runs ~5x slower
        # than on the same rows made contiguous (measured: 14 rows of SmolLM2's unembedding).
        unembed = self.module(self.adapter.unembed)
        handle = unembed.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
        try:
            return self._forward(toks, logits_to_keep=logits_to_keep)
        finally:
            handle.remove()

    forward = __call__

    def run_with_hooks(
        self, input: ModelInput, fwd_hooks: HookSpec = None, **kwargs: Any
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits with ``fwd_hooks`` attached for this one call."""
        with self.hooks(fwd_hooks):
            return self(input, **kwargs)

    def _select(
        self, names: Sequence[str] | Callable[[str], bool] | str | None, stop_at_layer: int | None
    ) -> list[str]:
        if names is None:
            selected = self.hook_names
        elif callable(names):
            selected = [n for n in self.hook_names if names(n)]
        else:
            selected = [names] if isinstance(names, str) else list(names)
            for n in selected:
                self.hook_point(n)
        if stop_at_layer is not None:
            selected = [n for n in selected if self._reached(n, stop_at_layer)]
        return selected

    def _reached(self, name: str, stop_at_layer: int) -> bool:
        """Whether a forward that stops before block ``stop_at_layer`` computes ``name``."""
        if name not in self._points:
            return True  # raw HF paths: let them record whatever runs
        layer, _ = parse(name)
        return name in ("hook_embed", "hook_pos_embed") if layer is None else layer < stop_at_layer

    def _stop_index(self, layer: int | None) -> int | None:
        n = self.cfg.n_layers
        if layer is None:
            return None
        if not -n <= layer <= n:
            raise ValueError(f"stop_at_layer must be in [-{n}, {n}], got {layer}")
        return layer + n if layer < 0 else layer

    @contextmanager
    def _stop_at(self, layer: int | None) -> Iterator[None]:
        if layer is None:
            yield
            return
        n = self.cfg.n_layers
        target = self.layer(layer) if layer < n else self.module(self.adapter.final_norm)

        def stop(module, args, kwargs):
            raise _StopForward(args[0] if args else kwargs["hidden_states"])

        handle = target.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def start_at(self, layer: int, resid: Float[Tensor, "batch pos d_model"]) -> Iterator[HookedModel]:
        """Forwards inside this context begin at block ``layer``, reading ``resid`` as its ``resid_pre``.

        Blocks below ``layer`` are skipped (they pass their input through), so their hook points must
        not be hooked (a hook added inside the context sees the passed-through input); the input ids
        still set positions and masks and must match ``resid``'s batch and length. A patch at layer L
        leaves everything below L unchanged, so sweeps start there.
        """
        if not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"layer must be in [0, {self.cfg.n_layers}), got {layer}")
        skipped = [self.layer(i) for i in range(layer)]
        inside = {id(m) for block in skipped for m in block.modules()}
        below = [n for n, p in self._points.items() if p.active and p.layer is not None and p.layer < layer]
        below += [n for n, p in self._raw_points.items() if p.active and id(p.module) in inside]
        if below:
            raise ValueError(f"{below[0]!r} is hooked but start_at({layer}) skips it; remove that hook")

        def feed(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if x.shape != resid.shape:
                raise ValueError(
                    f"start_at resid has shape {tuple(resid.shape)} but the input gives {tuple(x.shape)}"
                )
            r = resid.to(device=x.device, dtype=x.dtype)
            return ((r, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": r})

        with ExitStack() as stack:
            for block in skipped:
                stack.enter_context(replaced_forward(block, _pass_through))
            handle = self.layer(layer).register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
            stack.callback(handle.remove)
            yield self

    def run_with_cache(
        self,
        input: ModelInput,
        names: Sequence[str] | Callable[[str], bool] | str | None = None,
        *,
        stop_at_layer: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, ActivationCache]:
        """Run and cache activations.

        Args:
            input: string(s) or token ids.
            names: hook names, a predicate over names, or None for every hook point.
            stop_at_layer: run blocks ``0 .. stop_at_layer - 1`` only (later layers are not computed)
                and return that layer's ``resid_pre`` instead of logits.
            device, dtype: where and how to store cached tensors (offload to CPU, halve memory).

        Returns:
            ``(logits, cache)``; logits are the residual stream ``[batch pos d_model]`` when stopping early.
        """
        stop_at_layer = self._stop_index(stop_at_layer)
        selected = self._select(names, stop_at_layer)
        store: dict[str, Tensor] = {}
        memo: dict[int, tuple[weakref.ref, Tensor]] = {}
        convert = device is not None or dtype is not None

        def keep(x: Tensor, hook: HookPoint) -> None:
            if not (convert or x.requires_grad):
                store[hook.name] = x  # aliased points (resid_post L, resid_pre L+1) pass the same object
                return
            # detach / to make a new tensor per call: aliased points must share one, never a copy each.
            # A weak reference: a strong one would keep every original alive until the forward ends,
            # doubling the peak when caching in another dtype or on another device.
            hit = memo.get(id(x))
            if hit is None or hit[0]() is not x:
                y = x.detach() if x.requires_grad else x
                if convert:
                    y = y.to(device=device or y.device, dtype=dtype or y.dtype)
                hit = memo[id(x)] = (weakref.ref(x), y)
            store[hook.name] = hit[1]

        with self.hooks([(n, keep) for n in selected]), self._stop_at(stop_at_layer):
            try:
                out = self(input, **kwargs)
            except _StopForward as stop:
                out = stop.resid
        return out, ActivationCache(store, self)

    def run_with_grads(
        self,
        input: ModelInput,
        metric: Callable[[Tensor], Tensor],
        names: Sequence[str] | Callable[[str], bool] | str | None = None,
        **kwargs: Any,
    ) -> GradRun:
        """Cache activations and the gradient of the scalar ``metric(logits)`` with respect to each.

        Model parameters get no gradients (``torch.autograd.grad``, not ``backward``).
        """
        selected = self._select(names, None)
        store: dict[str, Tensor] = {}

        def keep(x: Tensor, hook: HookPoint) -> Tensor:
            # A fresh view that the rest of the forward uses, so its gradient is defined even for
            # points whose TL layout is a view of the HF tensor.
            y = x.view_as(x)
            store[hook.name] = y
            return y

        def require_grad(x: Tensor, hook: HookPoint) -> Tensor | None:
            return None if x.requires_grad else x.detach().requires_grad_(True)

        spec = [("hook_embed", require_grad)] + [(n, keep) for n in selected]
        with torch.enable_grad(), self.hooks(spec):
            value = metric(self(input, **kwargs))
            if value.numel() != 1:
                raise ValueError(f"metric must return a scalar, got shape {tuple(value.shape)}")
            tensors = list(store.values())
            grads = torch.autograd.grad(value.reshape(()), tensors, allow_unused=True)
        grad_store = {
            n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(store.items(), grads, strict=True)
        }
        acts = {n: t.detach() for n, t in store.items()}
        return GradRun(value.detach(), ActivationCache(acts, self), ActivationCache(grad_store, self))

    def generate(
        self, input: str | list[str] | Tensor, *, hooks: HookSpec = None, **kwargs: Any
    ) -> str | list[str] | Tensor:
        """Generate with ``hooks`` active on every step (KV cache on); see :func:`mechscope.models.generate.generate`."""
        from mechscope.models.generate import generate

        return generate(self, input, hooks=hooks, **kwargs)

    @property
    def weights(self):
        """Weights in TransformerLens form (views onto the HF parameters); see :mod:`mechscope.models.weights`."""
        from mechscope.models.weights import Weights

        return Weights(self)
