"""Hook points: named places in an HF model where a function can read or replace an activation.

Design: each :class:`HookPoint` keeps its user functions in a list and taps the real HF module
*only while that list is non-empty*, so a model with nothing hooked runs the plain HF forward with
zero overhead. Functions run in the order they were added; each sees the activation in
TransformerLens layout (e.g. ``[batch pos n_heads d_head]`` for ``hook_z``) and may return a
replacement of the same shape and dtype, which then flows into everything downstream.

A *tap* (:class:`_Tap`) is one wrapper around a module's ``forward`` (an instance attribute that
shadows the class's, removed when the last point lets go) running every point's pre- and
post-callback on that module, with PyTorch's forward-hook semantics and order. It replaces PyTorch
module hooks because those cost more than the work they do at small sizes: registering one builds a
``RemovableHandle``, and a module with hooks takes ``Module._call_impl``'s slow path on every call
(measured: 3.6 us to register, 1.2 us per call, against 0.3 us and 0.1 us for the wrapper). PyTorch
hooks that others register still run around the wrapper: pre-hooks before it, forward hooks after it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from mechscope.models.errors import HookReturnError

HookFn = Callable[[Tensor, "HookPoint"], Tensor | None]
_ids = itertools.count()


class HookPoint:
    """A named activation; ``fn(activation, hook)`` functions are added with :meth:`add`."""

    def __init__(self, name: str, layer: int | None = None):
        self.name = name
        self.layer = layer
        self._fns: list[tuple[int, HookFn]] = []

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, {len(self._fns)} fn)"

    @property
    def active(self) -> bool:
        return bool(self._fns)

    def add(self, fn: HookFn) -> Callable[[], None]:
        """Add ``fn``; returns a function that removes exactly this registration."""
        if not self._fns:
            self._attach()
        entry = (next(_ids), fn)  # unique even when the same fn is added twice
        self._fns.append(entry)

        def remove() -> None:
            try:
                self._fns.remove(entry)  # in place: run() iterates over a copy
            except ValueError:
                return  # removed already
            if not self._fns:
                self._detach()

        return remove

    def run(self, x: Tensor) -> Tensor:
        """Pass ``x`` through every function; returns ``x`` itself when none replaced it."""
        fns = self._fns
        if len(fns) == 1:  # the usual case, without copying the list (every call runs with cold CPU caches)
            out = fns[0][1](x, self)
            if out is None:
                return x
            _check_replacement(self.name, x, out)
            return out
        for _, fn in list(fns):
            out = fn(x, self)
            if out is not None:
                _check_replacement(self.name, x, out)
                x = out
        return x

    def _attach(self) -> None:
        """Install the PyTorch hook(s); subclasses define where."""

    def _detach(self) -> None:
        """Remove what :meth:`_attach` installed."""


def _check_replacement(name: str, old: Tensor, new: Any) -> None:
    if not isinstance(new, Tensor):
        raise HookReturnError(f"hook on {name!r} returned {type(new).__name__}; return a Tensor or None")
    if new.shape != old.shape or new.dtype != old.dtype:
        raise HookReturnError(
            f"hook on {name!r} returned shape {tuple(new.shape)} {new.dtype}, but the activation is "
            f"{tuple(old.shape)} {old.dtype}; return a tensor of the activation's shape and dtype"
        )


def _identity(t: Tensor) -> Tensor:
    return t


def _no_change(module: nn.Module, args: tuple, kwargs: dict) -> None:
    return None


PreFn = Callable[[nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
PostFn = Callable[[nn.Module, tuple, Any], Any]


class _Tap:
    """The callbacks of every hook point on one module, run by one wrapper of its ``forward``.

    ``pre`` callbacks get ``(module, args, kwargs)`` and may return new ``(args, kwargs)``; ``post``
    callbacks get ``(module, args, output)`` and may return a new output: PyTorch's
    ``register_forward_pre_hook(with_kwargs=True)`` / ``register_forward_hook`` contracts, in
    registration order (``prepend`` puts a callback first). Callbacks may be added or removed while
    the module runs (the lists are read when its forward starts).
    """

    # Kept in the module's own __dict__: a module <-> tap cycle the garbage collector frees with the
    # model. (A class-level WeakKeyDictionary never did: its value, the tap, holds the module.)
    _ATTR = "_mechscope_tap"

    def __init__(self, module: nn.Module):
        self.module = module
        self.pre: list[PreFn] = []
        self.post: list[PostFn] = []
        self._inner: Callable | None = None
        self._had_instance_forward = False
        self._wrapper = self._forward  # one bound method for every install

    @classmethod
    def of(cls, module: nn.Module) -> _Tap:
        tap = module.__dict__.get(cls._ATTR)
        if tap is None:
            tap = module.__dict__[cls._ATTR] = cls(module)
        return tap

    def add(self, kind: str, fn: Callable, prepend: bool = False) -> Callable[[], None]:
        """Add a ``"pre"`` or ``"post"`` callback; returns the function that removes it."""
        fns = self.pre if kind == "pre" else self.post
        if self._inner is None:
            self._install()
        fns.insert(0, fn) if prepend else fns.append(fn)

        def remove() -> None:
            try:
                fns.remove(fn)
            except ValueError:
                return
            if not self.pre and not self.post:
                self._uninstall()

        return remove

    @contextmanager
    def replaced(self, forward: Callable) -> Iterator[None]:
        """Run ``forward`` instead of the module's own while the context lasts; callbacks run around it.

        Through the tap, so that hooks added or removed meanwhile, and an instance ``forward`` that was
        there before (accelerate's), find the module as they left it afterwards.
        """
        remove = self.add("pre", _no_change)  # keeps the wrapper installed for the whole context
        inner, self._inner = self._inner, forward
        try:
            yield
        finally:
            self._inner = inner
            remove()

    def _install(self) -> None:
        m = self.module
        # accelerate (device_map) may already shadow forward with an instance attribute.
        # Written straight into __dict__: nn.Module.__setattr__ checks parameters, buffers and submodules,
        # which costs more than everything else here, and ``forward`` is none of those.
        self._had_instance_forward = "forward" in m.__dict__
        self._inner = m.forward
        m.__dict__["forward"] = self._wrapper

    def _uninstall(self) -> None:
        m = self.module
        if self._had_instance_forward:
            m.__dict__["forward"] = self._inner
        else:
            m.__dict__.pop("forward", None)
        self._inner = None

    def _forward(self, *args, **kwargs):
        m = self.module
        for fn in tuple(self.pre):
            r = fn(m, args, kwargs)
            if r is not None:
                args, kwargs = r
        out = self._inner(*args, **kwargs)
        for fn in tuple(self.post):
            r = fn(m, args, out)
            if r is not None:
                out = r
        return out


def replaced_forward(module: nn.Module, forward: Callable):
    """Context: ``module`` runs ``forward`` instead of its own; its hooks keep working (:meth:`_Tap.replaced`)."""
    return _Tap.of(module).replaced(forward)


class _ModulePoint(HookPoint):
    """A point on ``module``'s input or output, through its tap; ``view``/``unview`` map HF <-> TL layout."""

    def __init__(self, name, layer, module: nn.Module, view=_identity, unview=_identity):
        super().__init__(name, layer)
        self.module, self.view, self.unview = module, view, unview
        self.tap = _Tap.of(module)  # looked up once: attaching touches as few objects as possible
        self._remove: Callable[[], None] | None = None

    def _detach(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None


class OutputPoint(_ModulePoint):
    """The output of a module (the first element when it returns a tuple)."""

    def _attach(self) -> None:
        self._remove = self.tap.add("post", self._hook)

    def _hook(self, module, args, output):
        t = output[0] if isinstance(output, tuple) else output
        x = t if self.view is _identity else self.view(t)
        y = self.run(x)
        if y is x:
            return None
        t = y if self.unview is _identity else self.unview(y)
        return (t, *output[1:]) if isinstance(output, tuple) else t


class InputPoint(_ModulePoint):
    """The first input of a module (positional, or the ``hidden_states`` keyword)."""

    def _attach(self) -> None:
        self._remove = self.tap.add("pre", self._hook)

    def _hook(self, module, args, kwargs):
        t = args[0] if args else kwargs["hidden_states"]
        x = t if self.view is _identity else self.view(t)
        y = self.run(x)
        if y is x:
            return None
        t = y if self.unview is _identity else self.unview(y)
        if args:
            return (t, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": t}


class SwitchPoint(HookPoint):
    """A point computed by mechscope's own eager attention; ``switch(+1/-1)`` turns that path on/off."""

    def __init__(self, name, layer, switch: Callable[[int], None]):
        super().__init__(name, layer)
        self._switch = switch

    def _attach(self) -> None:
        self._switch(+1)

    def _detach(self) -> None:
        self._switch(-1)


class ResidMidPoint(HookPoint):
    """``resid_mid``, a local variable in HF code, made exact through real modules.

    Reading it is the input of ``ln2``. Replacing it with ``X`` must change both what the MLP reads
    and the residual it is added to. The MLP reads ``ln2(X)`` through a pre-hook on ``ln2``; the
    residual is fixed by rewriting the layer's output as ``X + mlp_out``, with ``mlp_out`` captured
    after every other hook on it has run. Float addition commutes, so this equals the HF sum
    bit for bit (a transplanted ``resid_mid`` gives the donor run's logits exactly).
    """

    def __init__(self, name, layer, layer_module: nn.Module, ln2: nn.Module, mlp_out: nn.Module):
        super().__init__(name, layer)
        self.layer_tap, self.ln2_tap, self.mlp_out_tap = _Tap.of(layer_module), _Tap.of(ln2), _Tap.of(mlp_out)
        self._removers: list[Callable[[], None]] = []
        self._capture: Callable[[], None] | None = None
        self._pending: Tensor | None = None
        self._mlp_out: Tensor | None = None

    def _attach(self) -> None:
        self._removers = [
            self.ln2_tap.add("pre", self._pre_ln2),
            # prepend: the fix must land before anyone (e.g. a resid_post hook) reads the output.
            self.layer_tap.add("post", self._post_layer, prepend=True),
        ]

    def _detach(self) -> None:
        for remove in self._removers:
            remove()
        self._removers = []
        self._drop_capture()

    def _drop_capture(self) -> None:
        if self._capture is not None:
            self._capture()
            self._capture = None
        self._pending = self._mlp_out = None

    def _pre_ln2(self, module, args, kwargs):
        self._drop_capture()  # anything left by an interrupted forward
        x = args[0] if args else kwargs["hidden_states"]
        y = self.run(x)
        if y is x:
            return None
        self._pending = y
        # Registered now, i.e. after every user hook on mlp_out: it sees the final mlp_out.
        self._capture = self.mlp_out_tap.add("post", self._capture_mlp_out)
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    def _capture_mlp_out(self, module, args, output):
        self._mlp_out = output[0] if isinstance(output, tuple) else output

    def _post_layer(self, module, args, output):
        if self._pending is None:
            return None
        fixed = self._pending + self._mlp_out
        self._drop_capture()
        return (fixed, *output[1:]) if isinstance(output, tuple) else fixed
