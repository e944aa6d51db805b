"""Training curves of an attention-only transformer as one self-contained SVG: the phase change.

Three panels against training step, from the history rows of
:func:`mechscope.toy.train_attn_only.train_attn_only`: validation loss; the in-context-learning
score (loss late in the context minus early; more negative = more learning from context); and the
best induction and previous-token head scores. When induction heads form, the last two panels
move together at the same step (Olsson et al. 2022); a dashed line marks that step if given.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

_W, _H, _M = 300, 220, 44  # panel width, height, margin (px)
_COLOURS = {
    "val_loss": "#333333",
    "icl_score": "#1f77b4",
    "induction": "#d62728",
    "previous_token": "#2ca02c",
}
_PANELS = (  # the untrained step-0 loss (~ln 259) is left out of the loss panel: it would flatten the rest
    ("validation loss (nats/byte)", ("val_loss",)),
    ("in-context-learning score", ("icl_score",)),
    ("best head score", ("induction", "previous_token")),
)


def _panel(history: Sequence[dict], title: str, keys: Sequence[str], x_off: int, mark: int | None) -> str:
    steps = [float(r["step"]) for r in history]
    ys = [float(r[k]) for r in history for k in keys]
    x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    y0, y1 = min(ys) if keys == ("val_loss",) else min(ys + [0.0]), max(ys)  # scores keep their zero
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x: float) -> float:
        return x_off + _M + (x - x0) / (x1 - x0) * (_W - 1.5 * _M)

    def py(y: float) -> float:
        return _H - _M - (y - y0) / (y1 - y0) * (_H - 1.8 * _M)

    parts = [
        f'<text x="{x_off + _W / 2}" y="16" text-anchor="middle" font-weight="600">{escape(title)}</text>',
        f'<line x1="{x_off + _M}" y1="{_H - _M}" x2="{x_off + _W - _M / 2}" y2="{_H - _M}" stroke="#333"/>',
        f'<line x1="{x_off + _M}" y1="{py(y1):.1f}" x2="{x_off + _M}" y2="{_H - _M}" stroke="#333"/>',
        f'<text x="{x_off + _W / 2}" y="{_H - 10}" text-anchor="middle" font-size="11">training step</text>',
    ]
    for i in range(5):
        tx, ty = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(
            f'<text x="{px(tx):.1f}" y="{_H - _M + 14}" text-anchor="middle" font-size="10">{tx:.0f}</text>'
        )
        parts.append(
            f'<text x="{x_off + _M - 4}" y="{py(ty) + 3:.1f}" text-anchor="end" font-size="10">{ty:.3g}</text>'
        )
    if y0 < 0 < y1:
        parts.append(
            f'<line x1="{x_off + _M}" y1="{py(0.0):.1f}" x2="{x_off + _W - _M / 2}" y2="{py(0.0):.1f}" stroke="#bbb"/>'
        )
    if mark is not None:
        parts.append(
            f'<line x1="{px(float(mark)):.1f}" y1="{py(y1):.1f}" x2="{px(float(mark)):.1f}" y2="{_H - _M}" stroke="#888" '
            f'stroke-dasharray="4 3"><title>phase change, step {mark}</title></line>'
        )
    for j, key in enumerate(keys):
        pts = " ".join(f"{px(s):.1f},{py(float(r[key])):.1f}" for s, r in zip(steps, history, strict=True))
        colour = _COLOURS[key]
        parts.append(
            f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.6"><title>{key}</title></polyline>'
        )
        if len(keys) > 1:
            parts.append(
                f'<text x="{x_off + _W - _M / 2}" y="{_H - _M - 8 - 13 * j}" text-anchor="end" font-size="11" '
                f'fill="{colour}">{escape(key.replace("_", " "))}</text>'
            )
    return "".join(parts)


def render_phase_change_svg(history: Sequence[dict], phase_step: int | None = None) -> str:
    """An SVG of the three panels; ``history`` rows need ``step``, ``val_loss``, ``icl_score``,
    ``induction`` and ``previous_token`` (a model with at least one layer)."""
    missing = {k for _, keys in _PANELS for k in keys} - set(history[0]) if history else {"step"}
    if missing:
        raise ValueError(f"history rows lack {sorted(missing)}: train a model with at least one layer")
    width = _W * len(_PANELS)
    panels = "".join(
        _panel(
            history[1:] if keys == ("val_loss",) and len(history) > 2 else history,
            t,
            keys,
            i * _W,
            phase_step,
        )
        for i, (t, keys) in enumerate(_PANELS)
    )
    return (
        f'<svg width="{width}" height="{_H}" viewBox="0 0 {width} {_H}" xmlns="http://www.w3.org/2000/svg" '
        f'font-family="system-ui,sans-serif" font-size="13">{panels}</svg>'
    )
