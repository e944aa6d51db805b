"""SAE views: the feature-density histogram, as self-contained SVG."""

from __future__ import annotations

import math
from html import escape

import torch


def density_histogram(density: torch.Tensor, *, bins: int = 40, width: int = 480, height: int = 200) -> str:
    """Histogram of ``log10(density)`` over the latents that fire; dead latents are counted in the title.

    The usual SAE health plot (Anthropic's "feature density" histograms): a healthy SAE has one bump
    well below 0 (``log10 1 = 0`` is a latent firing on every token) and few dead latents.
    """
    density = density.detach().double().flatten()
    live = density[density > 0]
    dead = int((density == 0).sum())
    title = f"{len(live)} live latents, {dead} dead ({dead / max(len(density), 1):.1%})"
    if len(live) == 0:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="40"><text y="20">{title}</text></svg>'
    logd = live.log10()
    lo, hi = math.floor(float(logd.min())), 0.0
    lo = min(lo, hi - 1)
    counts = torch.histc(logd, bins=bins, min=lo, max=hi)
    pad, plot_h = 30, height - 50
    bar_w = (width - 2 * pad) / bins
    peak = float(counts.max()) or 1.0
    rects = []
    for i, c in enumerate(counts.tolist()):
        h = plot_h * c / peak
        a = lo + (hi - lo) * i / bins
        rects.append(
            f'<rect x="{pad + i * bar_w:.1f}" y="{20 + plot_h - h:.1f}" width="{max(bar_w - 1, 1):.1f}" '
            f'height="{h:.1f}" fill="#4c78a8"><title>10^{a:.2f}..10^{a + (hi - lo) / bins:.2f}: '
            f"{int(c)}</title></rect>"
        )
    ticks = "".join(
        f'<text x="{pad + (t - lo) / (hi - lo) * (width - 2 * pad):.1f}" y="{height - 12}" '
        f'font-size="10" text-anchor="middle">1e{t}</text>'
        for t in range(lo, 1)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
        f'<text x="{pad}" y="13" font-size="12">{escape(title)}; x: log10 density</text>'
        f"{''.join(rects)}{ticks}</svg>"
    )
