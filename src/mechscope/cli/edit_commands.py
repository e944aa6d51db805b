"""``mechscope edit``: write a new fact into a model with ROME and show how well it took.

``cli/main.py`` registers the command with ``edit_commands.register(app, _friendly)``. Nothing from
``main`` is imported at import time (only inside the command), so the modules import in any order.
The edited weights are not saved: the command computes the edit, scores it and undoes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Annotated

import typer

from mechscope.probes.rome import RomeConfig

_R = {f.name: f.default for f in fields(RomeConfig)}
_STAGES = {"trace": "causal trace", "covariance": "key covariance (tokens)", "optimisation": "optimising v*"}


def _progress():
    """A Rich progress display with one bar per ROME stage, and the ``progress(stage, done, total)`` callback."""
    from mechscope.cli.main import progress

    bar = progress()
    tasks: dict[str, int] = {}

    def show(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(_STAGES.get(stage, stage), total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, show


def _tail(text: str, prompt: str) -> str:
    return text[len(prompt) :] if text.startswith(prompt) else text


def _pct(p: float) -> str:
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def edit(
    model: Annotated[
        str, typer.Argument(help="Model alias (smollm2-135m, tiny-llama, ...), directory or .gguf.")
    ],
    prompt: Annotated[
        str,
        typer.Option(help="The fact's prompt: a template with {} for the subject, or the full prompt."),
    ],
    subject: Annotated[str, typer.Option(help="The words naming the subject, as they appear in the prompt.")],
    target: Annotated[
        str, typer.Option(help="The new object, e.g. ' Rome' (a leading space is added to a word).")
    ],
    layer: Annotated[
        int | None, typer.Option(help="MLP layer to edit; default: the causal trace picks it.")
    ] = None,
    paraphrase: Annotated[
        list[str] | None,
        typer.Option(help="Another wording of the fact ({} for the subject allowed); repeat the flag."),
    ] = None,
    neighbour: Annotated[
        list[str] | None,
        typer.Option(help="A prompt about another subject with the same relation, which should not change."),
    ] = None,
    old: Annotated[
        str | None, typer.Option(help="The old object to compare with; default: the model's top prediction.")
    ] = None,
    corpus: Annotated[
        str,
        typer.Option(
            help="Corpus for the key covariance: default | shakespeare | pydoc | a path | hf:<dataset>."
        ),
    ] = "default",
    cov_tokens: Annotated[int, typer.Option(min=2, help="Corpus tokens for the key covariance.")] = _R[
        "cov_tokens"
    ],
    steps: Annotated[int, typer.Option(min=0, help="Adam steps optimising v*.")] = _R["steps"],
    trace_samples: Annotated[int, typer.Option(min=1, help="Noise samples of the causal trace.")] = _R[
        "trace_samples"
    ],
    seed: Annotated[
        int, typer.Option(help="Seed of the prefixes, the trace noise and the corpus order.")
    ] = _R["seed"],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per sample.")] = 20,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")
    ] = False,
):
    """Edit one fact with ROME (rank-one update of an MLP's output weights) and report the result.

    Prints the predictions before and after on the prompt, its paraphrases and neighbouring prompts:
    efficacy (p(new) > p(old) on the prompt), paraphrase success and specificity (neighbours keep
    their answer), plus greedy generations. The key covariance is cached, so a second edit at the
    same layer is much faster.

    Example: mechscope edit smollm2-135m --prompt "{} is located in the city of" --subject "The Eiffel Tower"
    --target " Rome" --neighbour "The Louvre is located in the city of"
    """
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _lit, _load, console, err
    from mechscope.data.corpus import load_corpus
    from mechscope.probes.rome import EditRequest, rome
    from mechscope.probes.rome_eval import evaluate_edit

    cfg = RomeConfig(layer=layer, cov_tokens=cov_tokens, steps=steps, trace_samples=trace_samples, seed=seed)
    EditRequest.make(prompt, subject, target)  # a bad request fails before anything loads
    m = _load(model)
    bar, show = _progress()
    with bar:
        e = rome(m, prompt, subject, target, cfg, corpus=load_corpus(corpus), progress=show)
    with err.status("scoring the edit"):
        ev = evaluate_edit(
            e,
            paraphrases=paraphrase or [],
            neighbours=neighbour or [],
            old=old,
            max_new_tokens=max_new_tokens,
        )
    if as_json:
        return _emit_json({"model": model, "edit": e.to_json(), "evaluation": ev.to_json()})
    where = (
        "given"
        if e.trace is None
        else f"causal trace: MLP effect {e.trace.effect[e.layer]:+.3f} at the last subject token"
    )
    console.print(f"edit {_lit(e.request.prompt)} -> {_lit(e.request.target)} at layer {e.layer} ({where})")
    t = Table(
        "", "prompt", "old", "top before", "top after", "p(new) before", "p(new) after", "p(old) after", "ok"
    )
    rows = [("edit", ev.efficacy, ev.efficacy.success)]
    rows += [("paraphrase", p, p.success) for p in ev.paraphrases]
    rows += [("neighbour", n, n.kept) for n in ev.neighbours]
    for kind, s, ok in rows:
        t.add_row(
            kind,
            _lit(s.prompt),
            _lit(s.old),
            _lit(s.top_before),
            _lit(s.top_after),
            _pct(s.p_new_before),
            _pct(s.p_new_after),
            _pct(s.p_old_after),
            "yes" if ok else "no",
        )
    console.print(t)
    summary = Table("", "", title="summary", show_header=False)
    for k, v in ev.summary().items():
        summary.add_row(k, "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(summary)
    g = Table("prompt", "before", "after", title="greedy generations")
    for p, before, after in ev.generations:
        g.add_row(_lit(p), _lit(_tail(before, p)), _lit(_tail(after, p)))
    console.print(g)


def register(app: typer.Typer, friendly: Callable) -> None:
    """Add this module's commands to ``app``, each wrapped in ``friendly`` (main's error handler)."""
    app.command("edit")(friendly(edit))
