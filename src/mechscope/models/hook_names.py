"""The TransformerLens hook-name grammar, the one place that knows it.

Names are ``hook_embed``, ``hook_pos_embed`` (learned positions only), ``blocks.{L}.<point>`` for
the per-layer points below, ``ln_final.hook_normalized`` and ``unembed.hook_out`` (the logits
before any final soft-capping). Parsing is exact: there is no shorthand parser, only
:data:`ALIASES`, a short explicit table.
"""

from __future__ import annotations

import difflib
import re

from mechscope.models.errors import UnknownHookError

# Per-layer points in the order the forward pass reaches them.
LAYER_POINTS: tuple[str, ...] = (
    "hook_resid_pre",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
# Points that live inside the attention kernel: hooking one switches that model to the eager path.
ATTENTION_INTERNAL: frozenset[str] = frozenset(
    {"attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern"}
)
# Deliberately short: "logits" is not an alias, because unembed.hook_out precedes Gemma's final soft-cap.
ALIASES: dict[str, str] = {}

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


# Everything from resid_mid on except resid_post exists only where there is an MLP.
_MLP_POINTS = frozenset(LAYER_POINTS[LAYER_POINTS.index("hook_resid_mid") : -1])


def layer_points(*, parallel: bool, gated: bool, has_mlp: bool = True) -> tuple[str, ...]:
    """The per-layer points a family has: no ``resid_mid`` in parallel blocks, ``pre_linear`` only if
    gated, and no MLP points at all in attention-only models."""
    skip = {"hook_resid_mid"} if parallel else set()
    if not gated:
        skip.add("mlp.hook_pre_linear")
    if not has_mlp:
        skip |= _MLP_POINTS
    return tuple(p for p in LAYER_POINTS if p not in skip)


def all_hook_names(
    n_layers: int, *, parallel: bool, gated: bool, learned_pos: bool, has_mlp: bool = True
) -> list[str]:
    """Every canonical hook name of a model, in forward order."""
    names = ["hook_embed"] + (["hook_pos_embed"] if learned_pos else [])
    for layer in range(n_layers):
        names += [
            f"blocks.{layer}.{p}" for p in layer_points(parallel=parallel, gated=gated, has_mlp=has_mlp)
        ]
    return names + ["ln_final.hook_normalized", "unembed.hook_out"]


def parse(name: str) -> tuple[int | None, str]:
    """``'blocks.3.attn.hook_z'`` -> ``(3, 'attn.hook_z')``; model-level names give ``(None, name)``."""
    m = _LAYER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def unknown_hook(name: str, valid: list[str]) -> UnknownHookError:
    """The error for a name that is not a hook point, listing the closest valid ones."""
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    return UnknownHookError(
        f"unknown hook point {name!r}.{hint} `model.hook_names` lists all {len(valid)}; "
        "a raw HF module path (e.g. 'model.layers.0.mlp') also works."
    )
