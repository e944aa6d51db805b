"""``mechscope demo``: the main job, the whole loop on one model (:func:`mechscope.demo.run_demo`).

``cli/main.py`` registers it with ``demo_commands.register(app, _friendly)``. Nothing from ``main``
is imported at import time (only inside the command), so the two import in either order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from mechscope.demo import STEPS, DemoConfig

_D = {f.name: f.default for f in fields(DemoConfig)}


def demo(
    model: Annotated[
        str, typer.Argument(help="Model alias (the embedded default smollm2-135m, tiny-llama, ...).")
    ] = "smollm2-135m",
    out: Annotated[
        Path, typer.Option(help="Demo directory: created, or resumed if it holds this same demo.")
    ] = Path("mechscope-demo"),
    tokens: Annotated[
        int, typer.Option(min=1, help="Tokens harvested for the SAE and its feature database.")
    ] = _D["tokens"],
    layer: Annotated[
        int | None, typer.Option(help="Layer whose resid_post is harvested (default: the middle one).")
    ] = None,
    train_tokens: Annotated[int, typer.Option(min=1, help="SAE training tokens.")] = _D["train_tokens"],
    expansion: Annotated[int, typer.Option(min=1, help="d_sae = expansion x d_model.")] = _D["expansion"],
    k: Annotated[int, typer.Option(min=1, help="TopK: active latents per token.")] = _D["k"],
    top_n: Annotated[int, typer.Option(min=0, help="Features given a dashboard page.")] = _D["top_n"],
    prompt: Annotated[str, typer.Option(help="The prompt whose next token is explained.")] = _D["prompt"],
    answer: Annotated[str, typer.Option(help="Its expected next token (one token).")] = _D["answer"],
    wrong: Annotated[str | None, typer.Option(help="A rival token (metric: the logit difference).")] = _D[
        "wrong"
    ],
    corrupt: Annotated[
        str | None, typer.Option(help="A prompt of the same token length that changes the answer.")
    ] = _D["corrupt"],
    serve: Annotated[
        bool, typer.Option("--serve", help="Then serve the feature database in the web app (Ctrl-C stops).")
    ] = False,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The web app's port (with --serve).")] = 8000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Explain a prediction, harvest a mid layer, train a TopK SAE, build its feature database and dashboards.

    Writes OUT/index.html linking the explain report, the dashboards and the SAE's evaluation (FVU,
    L0, dead latents, CE loss recovered on held-out tokens). Interrupt it at any time and run the
    same command again: finished steps are reused and unfinished ones resume.

    Example: mechscope demo smollm2-135m --out mechscope-demo --serve
    """
    from rich.markup import escape
    from transformers.utils import logging as hf_logging

    from mechscope.cli.main import _emit_json, err
    from mechscope.demo import DemoStep, run_demo
    from mechscope.models.sources import SOURCES

    hf_logging.disable_progress_bar()  # the status line says what is happening

    cfg = DemoConfig(
        prompt=prompt,
        answer=answer,
        wrong=wrong,
        corrupt=corrupt,
        layer=layer,
        tokens=tokens,
        train_tokens=train_tokens,
        expansion=expansion,
        k=k,
        top_n=top_n,
    )
    status = err.status("")

    def show(s: DemoStep) -> None:
        head = f"[{s.number}/{len(STEPS)}] {s.name}" if s.number else f"loading {s.detail}"
        if s.status == "start":
            note = " (the first load converts the GGUF, ~20 s)" if s.detail in SOURCES else ""
            status.update(f"{head}{note}" if not s.number else f"{head}: running")
            status.start()
            return
        status.stop()
        when = "reused" if s.status == "reused" else f"{s.seconds:.1f} s"
        detail = f": {escape(s.detail)}" if s.number else ""
        err.print(f"{head} ({when}){detail}", highlight=False, soft_wrap=True)

    try:
        result = run_demo(model, out, cfg=cfg, progress=show)
    finally:
        status.stop()
    if as_json:
        _emit_json(result.to_dict())
    else:
        _report(result, model)
    if serve:
        from mechscope.cli.web_commands import serve as serve_db

        serve_db(result.features_db, model=model, sae=result.sae_dir, port=port)


def _report(result, model: str) -> None:
    from rich.markup import escape

    from mechscope.cli.main import console

    ev, down = result.evaluation["heldout"], result.evaluation.get("downstream")
    line = f"SAE on {result.hook}: held-out FVU {ev['fvu']:.3f}, L0 {ev['l0']:.1f}"
    if down:
        line += f", CE loss recovered {down['ce_loss_recovered']:.1%}"
    line += f", dead {result.evaluation['train']['dead_fraction']:.1%}"
    console.print(line, highlight=False, soft_wrap=True)
    console.print(
        f"Open {escape(str(result.index_html))}  ({result.seconds['total']:.0f} s)", highlight=False
    )
    console.print(
        f"Browse: mechscope serve {escape(str(result.features_db))} --model {escape(model)} "
        f"--sae {escape(str(result.sae_dir))}",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer, friendly: Callable) -> None:
    """Add ``mechscope demo`` to ``app``, wrapped in ``friendly`` (main's error handler)."""
    app.command("demo")(friendly(demo))
