"""``mechscope steer`` and ``mechscope steer-sweep``: ActAdd steering from the command line.

``cli/main.py`` registers the commands with ``steer_commands.register(app, _friendly)``. Nothing from
``main`` is imported at import time (only inside the commands), so the modules import in any order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from mechscope.steering.evaluate import SweepConfig

_Model = Annotated[
    str, typer.Argument(help="Model alias (smollm2-135m, tiny-llama, ...), directory or .gguf.")
]
_Pos = Annotated[str, typer.Option("--pos", help="The prompt to steer towards, e.g. 'Love'.")]
_Neg = Annotated[str, typer.Option("--neg", help="The prompt to steer away from, e.g. 'Hate'.")]
_Hook = Annotated[
    str,
    typer.Option(help="Point in each block: hook_resid_pre (ActAdd's), hook_resid_post, hook_attn_out, ..."),
]
_Pad = Annotated[
    str | None,
    typer.Option(
        help="If --pos and --neg differ in token length, pad the shorter on the right with this single "
        "token (the ActAdd paper pads with a space); --pad '' makes a mismatch an error."
    ),
]
_Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def _tail(text: str, prompt: str) -> str:
    return text[len(prompt) :] if text.startswith(prompt) else text


def steer(
    model: _Model,
    prompt: Annotated[str, typer.Argument(help="The prompt to continue, e.g. 'I hate you because'.")],
    pos: _Pos,
    neg: _Neg,
    layer: Annotated[int, typer.Option(help="Block whose hook point gets the vector.")] = 6,
    coeff: Annotated[float, typer.Option(help="Injection coefficient (ActAdd uses 1-15).")] = 5.0,
    hook: _Hook = "hook_resid_pre",
    pad: _Pad = " ",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated.")] = 30,
    samples: Annotated[
        int, typer.Option(min=1, help="Continuations of each kind (>1 implies --sample).")
    ] = 1,
    sample: Annotated[
        bool, typer.Option(help="Sample (temperature 1, top-p 0.3 as in ActAdd) instead of greedy.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of the sampling; steered and unsteered share it.")] = 0,
    as_json: _Json = False,
):
    """Add the ActAdd vector act(POS) - act(NEG) at one layer and print steered vs unsteered generations.

    The vector is the per-position difference of the two prompts' activations at
    blocks.LAYER.HOOK, added COEFF times at the first positions of PROMPT (the prompt pass only:
    generated tokens see it through the KV cache).

    Example: mechscope steer smollm2-135m "I hate you because" --pos "Love" --neg "Hate" --layer 6 --coeff 10
    """
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _lit, _load, console, err
    from mechscope.steering import actadd, generate

    m = _load(model)
    v = actadd(m, pos, neg, f"blocks.{layer}.{hook}", coeff=coeff, pad=pad or None)
    do_sample = sample or samples > 1
    gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample)
    if do_sample:
        gen |= dict(temperature=1.0, top_p=0.3)
    rows = []
    with err.status("generating"):
        for i in range(samples):
            g = generate(m, prompt, v, seed=seed + i, **gen)
            rows.append((_tail(g.unsteered, prompt), _tail(g.steered, prompt)))
    info = {
        "model": model,
        "prompt": prompt,
        "pos": pos,
        "neg": neg,
        "hook": v.hook_name,
        "coeff": coeff,
        "positions": f"{v.start}..{v.start + v.direction.shape[0] - 1}",
        "pair_tokens": [m.to_str_tokens(pos), m.to_str_tokens(neg)],
        "vector_norm": v.norm(),
        "sampling": gen,
        "seed": seed,
    }
    if as_json:
        return _emit_json({**info, "generations": [{"unsteered": u, "steered": s} for u, s in rows]})
    console.print(
        f"{_lit(pos)} - {_lit(neg)} at {v.hook_name}, positions {info['positions']}, coeff {coeff:g} "
        f"(|coeff * vector| = {v.norm():.1f})"
    )
    t = Table("unsteered", "steered", title=_lit(prompt), show_lines=True)
    for u, s in rows:
        t.add_row(_lit(u), _lit(s))
    console.print(t)


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated numbers, e.g. 1,2,5, got {text!r}") from None


def steer_sweep(
    model: _Model,
    pos: _Pos,
    neg: _Neg,
    concept: Annotated[
        list[str], typer.Option(help="A concept word whose probability is the target (repeat; e.g. ' love').")
    ],
    prompt: Annotated[
        list[str] | None, typer.Option(help="A steering prompt (repeat); default: a few neutral openings.")
    ] = None,
    layers: Annotated[str, typer.Option(help="Comma-separated layers.")] = "2,6,10,16",
    coeffs: Annotated[str, typer.Option(help="Comma-separated coefficients.")] = "1,2,5,10",
    hook: _Hook = "hook_resid_pre",
    pad: _Pad = " ",
    random_baseline: Annotated[
        bool, typer.Option(help="Also sweep a random direction of the same norm.")
    ] = True,
    random_draws: Annotated[
        int, typer.Option(min=1, help="Random directions per vector (the control is their mean).")
    ] = SweepConfig.random_draws,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward.")] = SweepConfig.batch_size,
    html: Annotated[str | None, typer.Option(help="Write the effect/cost plots to this HTML file.")] = None,
    as_json: _Json = False,
):
    """Measure an ActAdd vector's effect (concept-word probability) against its cost (KL on neutral text).

    Sweeps layers x coefficients in batched forwards, next to a random direction of the same norm.

    Example: mechscope steer-sweep smollm2-135m --pos Love --neg Hate --concept " love" --concept " loved"
    --html steer.html
    """
    from rich.progress import Progress
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _load, console, err
    from mechscope.steering import actadd
    from mechscope.steering.evaluate import sweep

    layer_list = [int(x) for x in _floats(layers, "layers")]
    cfg = SweepConfig(
        coeffs=_floats(coeffs, "coeffs"),
        random_baseline=random_baseline,
        random_draws=random_draws,
        batch_size=batch_size,
    )
    prompts = prompt or ["I think that you are", "My opinion of him is that", "Yesterday my friend said"]
    m = _load(model)
    vecs = [actadd(m, pos, neg, f"blocks.{L}.{hook}", pad=pad or None) for L in layer_list]
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("sweeping", total=None)
        r = sweep(
            m, vecs, prompts, concept, cfg=cfg, progress=lambda d, n: bar.update(task, completed=d, total=n)
        )
    if html:
        with open(html, "w", encoding="utf-8") as f:
            f.write(r.to_html(f"{pos!r} - {neg!r} on {model}"))
    if as_json:
        return _emit_json(
            {
                "model": model,
                "pos": pos,
                "neg": neg,
                "prompts": prompts,
                "metric": r.metric,
                "unsteered": r.baseline,
                "random_draws": random_draws if random_baseline else 0,
                "forwards": r.forwards,
                "rows": r.rows(),
            }
        )
    t = Table(
        "hook", "coeff", "effect", "KL", "dNLL", *(("rand effect", "rand KL") if random_baseline else ())
    )
    for row in r.rows():
        extra = (f"{row['random_effect']:+.3f}", f"{row['random_kl']:.3f}") if random_baseline else ()
        t.add_row(
            row["hook"], f"{row['coeff']:g}", f"{row['effect']:+.3f}", f"{row['kl']:.3f}",
            f"{row['delta_nll']:+.3f}", *extra,
        )  # fmt: skip
    console.print(f"target: {r.metric}; unsteered {r.baseline:.3f}; {r.forwards} forwards")
    console.print(t)
    if html:
        console.print(f"plots: {html}")


def register(app: typer.Typer, friendly: Callable) -> None:
    """Add this module's commands to ``app``, each wrapped in ``friendly`` (main's error handler)."""
    app.command("steer")(friendly(steer))
    app.command("steer-sweep")(friendly(steer_sweep))
