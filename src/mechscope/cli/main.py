"""``mechscope``: models, info, lens, heads and the toy-model lab from the command line.

Every command that prints results takes ``--json`` for scripts. Choices come from the registries
(model aliases, adapter families), never from a hand-kept list.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

app = typer.Typer(
    help="Mechanistic interpretability of transformer language models.",
    no_args_is_help=True,
    add_completion=False,
)
toy_app = typer.Typer(
    help="The toy-model lab: superposition and attention-only transformers.", no_args_is_help=True
)
app.add_typer(toy_app, name="toy")
console = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]


def _friendly(fn):
    """Turn mechscope's own errors into one red message and exit code 2, without a traceback.

    ValueError and IndexError count too: the library raises them for argument values it checks
    (``--pos`` outside the prompt, a config field out of range), and their messages name the fix.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mechscope.models.errors import MechscopeError

        try:
            return fn(*args, **kwargs)
        except (MechscopeError, FileNotFoundError, ValueError, IndexError) as e:
            # escape: messages quote user text and lists, which Rich would read as markup;
            # soft_wrap: one line that the terminal wraps, not Rich at 80 columns.
            err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _lit(text: str) -> str:
    """A token shown as a Python literal (whitespace visible), safe from Rich markup."""
    return escape(repr(text))


def _load(name: str):
    # The spinner says what is happening; transformers' own per-tensor bar would only clutter it.
    from transformers.utils import logging as hf_logging

    import mechscope as ms
    from mechscope.models.sources import SOURCES

    hf_logging.disable_progress_bar()
    note = " (first load converts the GGUF, ~20 s)" if name in SOURCES else ""
    with err.status(f"loading {name}{note}"):
        return ms.load_model(name)


def progress(*columns, disable: bool = False):
    """A transient Rich progress display on stderr: description, bar, done/total, ``columns``, ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *columns,
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=disable,
    )


def _emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
@_friendly
def models(as_json: JsonFlag = False):
    """List model aliases and whether each is installed here.

    Example: mechscope models --json
    """
    from mechscope.models.adapters import adapters
    from mechscope.models.sources import DEFAULT_MODEL, SOURCES

    rows = [
        dict(
            alias=s.alias,
            available=s.available(),
            default=s.alias == DEFAULT_MODEL,
            description=s.description,
            install=s.install,
        )
        for s in SOURCES.values()
    ]
    rows += [
        dict(
            alias=f"tiny-{name}",
            available=True,
            default=False,
            description=f"random tiny {name} model (tests)",
            install="",
        )
        for name in adapters()
    ]
    if as_json:
        return _emit_json(rows)
    # The install command is there to be copied: fold it, never truncate it with an ellipsis.
    table = Table("alias", "available", "description", Column("install", overflow="fold"))
    for r in rows:
        table.add_row(
            r["alias"] + (" (default)" if r["default"] else ""),
            "yes" if r["available"] else "[red]no[/red]",
            r["description"],
            r["install"],
        )
    console.print(table)


@app.command()
@_friendly
def info(
    model: Annotated[str, typer.Argument(help="Alias, tiny-<family>, local directory or .gguf file.")],
    as_json: JsonFlag = False,
):
    """Architecture facts and every hook point with its shape on a 2 x 5-token probe batch.

    Example: mechscope info smollm2-135m
    """
    import torch

    m = _load(model)
    _, cache = m.run_with_cache(torch.zeros(2, 5, dtype=torch.long))
    shapes = {name: list(cache[name].shape) for name in m.hook_names}
    if as_json:
        return _emit_json(
            {"model": model, "facts": m.cfg.to_dict(), "probe": {"batch": 2, "pos": 5}, "hook_points": shapes}
        )
    facts = Table("fact", "value", title=f"{model}")
    for k, v in m.cfg.to_dict().items():
        facts.add_row(k, str(v))
    console.print(facts)
    points = Table("hook point", "shape for batch=2, pos=5", title=f"{len(shapes)} hook points")
    for name, shape in shapes.items():
        points.add_row(name, str(tuple(shape)))
    console.print(points)


@app.command()
@_friendly
def lens(
    model: Annotated[str, typer.Argument(help="Model alias (the default model is smollm2-135m).")],
    prompt: Annotated[str, typer.Argument(help="The text whose next token is predicted.")],
    pos: Annotated[int, typer.Option(help="Position to read (negative counts from the end).")] = -1,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Predictions shown per layer.")] = 5,
    html: Annotated[Path, typer.Option(help="Where to write the self-contained HTML view.")] = Path(
        "mechscope-lens.html"
    ),
    as_json: JsonFlag = False,
):
    """Top next-token predictions, and the logit lens: what each layer's residual stream predicts.

    Each stage goes through the model's final norm and unembedding: the last row is its output.

    Also writes a self-contained HTML view (--html).

    Example: mechscope lens smollm2-135m "The Eiffel Tower is in the city of"
    """
    from mechscope.circuits.logit_lens import logit_lens
    from mechscope.viz.lens import render_logit_lens_html

    m = _load(model)
    result = logit_lens(m, prompt, pos=pos, top_k=top_k)
    html.write_text(render_logit_lens_html(result), encoding="utf-8")
    if as_json:
        return _emit_json(
            {
                "model": model,
                "prompt": prompt,
                "pos": pos,
                "tokens": result.str_tokens,
                "html": str(html.resolve()),
                "lens": result.to_records(),
            }
        )
    console.print("Prediction: " + ", ".join(f"[bold]{_lit(t)}[/bold] {p:.3f}" for t, p in result.prediction))
    table = Table(
        "stage",
        *[f"#{i + 1}" for i in range(top_k)],
        title="Logit lens (each stage decoded through the final norm and unembedding)",
    )
    for label, top in zip(result.labels, result.top_tokens(), strict=True):
        table.add_row(label, *[f"{_lit(t)} {p:.2f}" for t, p in top])
    console.print(table)
    err.print(f"HTML view written to {html.resolve()}", highlight=False, soft_wrap=True)


@app.command()
@_friendly
def heads(
    model: Annotated[str, typer.Argument(help="Model alias.")],
    seq_len: Annotated[int, typer.Option(help="Length of the random sequence that is repeated.")] = 32,
    batch: Annotated[int, typer.Option(help="Random sequences averaged over.")] = 8,
    html: Annotated[Path, typer.Option(help="Where to write the HTML tables.")] = Path(
        "mechscope-heads.html"
    ),
    top: Annotated[int, typer.Option(help="Head pairs listed per composition mode.")] = 5,
    as_json: JsonFlag = False,
):
    """Detector scores for every head (previous-token, duplicate-token, induction, OV copying) and top compositions.

    Example: mechscope heads smollm2-135m --json
    """
    from mechscope.circuits.composition import MODES, composition_scores
    from mechscope.circuits.head_detectors import copying_scores, head_scores
    from mechscope.viz.heads import render_head_scores_html

    m = _load(model)
    with err.status("running detectors"):
        scores = {k: v.tolist() for k, v in head_scores(m, seq_len=seq_len, batch=batch).items()}
        scores["ov_copying"] = copying_scores(m).tolist()
    comps = []
    if m.cfg.n_layers > 1:
        with err.status("composition scores"):
            result = composition_scores(m)
        comps = [(mode, a, b, s) for mode in MODES for a, b, s in result.top(mode, top)]
    html.write_text(render_head_scores_html(f"Heads of {model}", scores, comps), encoding="utf-8")
    if as_json:
        return _emit_json(
            {
                "model": model,
                "scores": scores,
                "top_compositions": [dict(mode=c[0], sender=c[1], receiver=c[2], score=c[3]) for c in comps],
                "html": str(html),
            }
        )
    table = Table("head", *scores, title=f"Head detectors ({model}); strongest 15 by max score")
    flat = [(layer, h) for layer in range(m.cfg.n_layers) for h in range(m.cfg.n_heads)]
    flat.sort(key=lambda lh: -max(s[lh[0]][lh[1]] for k, s in scores.items() if k != "ov_copying"))
    for layer, h in flat[:15]:
        table.add_row(f"L{layer}H{h}", *[f"{s[layer][h]:.2f}" for s in scores.values()])
    console.print(table)
    if comps:
        ct = Table("mode", "sender", "receiver", "score - baseline", title="Top compositions")
        for c in comps:
            ct.add_row(c[0], c[1], c[2], f"{c[3]:.3f}")
        console.print(ct)
    err.print(f"HTML tables written to {html}")


@app.command()
@_friendly
def explain(
    model: Annotated[str, typer.Argument(help="Model alias (the default model is smollm2-135m).")],
    prompt: Annotated[str, typer.Argument(help="The prompt whose next token is explained.")],
    answer: Annotated[str, typer.Option(help="The expected next token, e.g. ' Mary' (one token).")],
    wrong: Annotated[
        str | None, typer.Option(help="A rival token: the metric becomes logit(answer) - logit(wrong).")
    ] = None,
    corrupt: Annotated[
        str | None,
        typer.Option(help="A prompt of the same token length that changes the answer: enables patching."),
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="The subject of a factual prompt (a substring): enables ROME traces.")
    ] = None,
    top_heads: Annotated[int, typer.Option(min=1, help="Heads whose attention is drawn.")] = 4,
    html: Annotated[Path, typer.Option(help="Where to write the self-contained report.")] = Path(
        "mechscope-explain.html"
    ),
    as_json: JsonFlag = False,
):
    """Explain one prediction: logit lens, direct logit attribution, attention, patching sweeps, traces.

    With --corrupt: activation patching of resid_pre, attn_out, mlp_out (layer x position) and every
    head, plus attribution patching beside it. With --subject: ROME causal traces. Writes one HTML
    report (--html); --json prints every number instead of the summary.

    Example: mechscope explain smollm2-135m "When Mary and John went to the store, John gave a drink to"
    --answer " Mary" --wrong " John" --corrupt "When Mary and John went to the store, Mary gave a drink to"
    """
    import torch
    from rich.progress import Progress

    from mechscope.interventions.explain import ExplainConfig
    from mechscope.interventions.explain import explain as run_explain

    cfg = ExplainConfig(answer, wrong, corrupt, subject, top_heads=top_heads)
    m = _load(model)
    steps = 3 + (len(cfg.points) + 1 if corrupt else 0) + (1 if subject else 0)
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("explaining", total=steps)

        done: list[str] = []

        def step(name: str) -> None:  # called as each part starts: the previous one is done
            bar.update(task, advance=1 if done else 0, description=name)
            done.append(name)

        result = run_explain(m, prompt, cfg, name=model, progress=step)
    html.write_text(result.to_html(), encoding="utf-8")
    if as_json:
        return _emit_json({**result.to_json(), "html": str(html.resolve())})
    console.print(
        f"Metric {_lit(answer)}"
        + (f" - {_lit(wrong)}" if wrong else "")
        + f": [bold]{result.metric:.3f}[/bold]"
    )
    console.print(
        "Prediction: " + ", ".join(f"[bold]{_lit(t)}[/bold] {p:.3f}" for t, p in result.predictions)
    )
    console.print(
        "Top heads by direct logit attribution: "
        + ", ".join(f"{label} {v:+.2f}" for label, v in result.dla.top(top_heads))
    )
    for point, r in result.patching.items():
        flat = r.normalised.flatten()
        best = int(flat.abs().argmax())
        idx = torch.unravel_index(torch.tensor(best), r.normalised.shape)
        where = ", ".join(f"{a} {int(i)}" for a, i in zip(r.axes, idx, strict=True))
        c = result.comparisons[point]
        console.print(
            f"patching {point}: strongest cell {where} ({flat[best]:.2f} normalised); "
            f"attribution vs real r = {c.correlation:.2f}"
        )
    err.print(f"report written to {html}")


@toy_app.command("superposition")
@_friendly
def toy_superposition(
    features: Annotated[int, typer.Option(help="Number of features.")] = 5,
    hidden: Annotated[int, typer.Option(help="Hidden dimensions.")] = 2,
    sparsity: Annotated[
        list[float] | None,
        typer.Option(help="Sparsity S per instance (repeat the flag); default 0 0.7 0.9 0.97 0.99."),
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 5000,
    out: Annotated[Path | None, typer.Option(help="Directory to save the trained sweep in.")] = None,
    html: Annotated[
        Path, typer.Option(help="Where to write the paper's views (self-contained HTML).")
    ] = Path("mechscope-superposition.html"),
    as_json: JsonFlag = False,
):
    """Train toy models of superposition, one instance per sparsity, all at once.

    Writes W^T W, feature norms, 2-D geometry and feature dimensionality per instance to --html.

    Example: mechscope toy superposition --sparsity 0 --sparsity 0.9 --steps 3000
    """
    from mechscope.toy import superposition as sp

    sparsities = tuple(sparsity) if sparsity else sp.ToyConfig.sparsities
    cfg = sp.ToyConfig(n_features=features, n_hidden=hidden, sparsities=sparsities, steps=steps)
    with err.status(f"training {cfg.n_instances} instances"):
        model = sp.train(cfg, log_every=0)
    if out is not None:
        sp.save(model, out)
    from mechscope.viz.superposition import render_superposition_html

    html.write_text(render_superposition_html(model), encoding="utf-8")
    rows = [
        dict(sparsity=s, represented=n, norms=norms, dimensionality=dims)
        for s, n, norms, dims in zip(
            cfg.sparsities,
            sp.n_represented(model),
            sp.feature_norms(model).tolist(),
            sp.feature_dimensionality(model).tolist(),
            strict=True,
        )
    ]
    if as_json:
        return _emit_json({"config": cfg.__dict__, "instances": rows, "html": str(html.resolve())})
    table = Table(
        "sparsity",
        "features kept",
        "||W_i||",
        "dimensionality D_i",
        title=f"{features} features in {hidden} dimensions",
    )
    for r in rows:
        table.add_row(
            f"{r['sparsity']:.2f}",
            str(r["represented"]),
            " ".join(f"{v:.2f}" for v in r["norms"]),
            " ".join(f"{v:.2f}" for v in r["dimensionality"]),
        )
    console.print(table)


@toy_app.command("attn-only")
@_friendly
def toy_attn_only(
    layers: Annotated[int, typer.Option(help="Attention layers (0, 1, 2, ...).")] = 2,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 1500,
    d_model: Annotated[int, typer.Option(help="Residual width.")] = 128,
    heads: Annotated[int, typer.Option(help="Heads per layer.")] = 4,
    n_ctx: Annotated[int, typer.Option(help="Context length in bytes.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Rows per step.")] = 16,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warmup, then cosine).")] = 1e-3,
    repeat_fraction: Annotated[
        float, typer.Option(help="Share of rows that repeat a stretch of text (rewards induction).")
    ] = 0.0,
    eval_every: Annotated[int, typer.Option(help="Steps between evaluations.")] = 100,
    out: Annotated[Path, typer.Option(help="Checkpoint directory (loads with load_model).")] = Path(
        "attn-only"
    ),
    as_json: JsonFlag = False,
):
    """Train an attention-only transformer on offline text, save it, and print what its weights say.

    With layers >= 1 the training curves (loss, in-context-learning score, induction and
    previous-token scores) are also written to OUT/phase_change.svg.

    Example: mechscope toy attn-only --layers 2 --steps 3000 --repeat-fraction 0.5 --lr 3e-3
    """
    import logging

    from mechscope.toy.train_attn_only import (
        AttnOnlyTrainConfig,
        bigram_table,
        skip_trigrams,
        train_attn_only,
    )

    logging.getLogger("mechscope").setLevel(logging.INFO)
    cfg = AttnOnlyTrainConfig(
        n_layers=layers,
        steps=steps,
        d_model=d_model,
        n_heads=heads,
        n_ctx=n_ctx,
        batch_size=batch_size,
        lr=lr,
        repeat_fraction=repeat_fraction,
        eval_every=eval_every,
    )
    with err.status(f"training a {layers}-layer attention-only model"):
        model, history = train_attn_only(cfg, out_dir=out)
    if layers >= 1:
        from mechscope.toy.train_attn_only import phase_change_step
        from mechscope.viz.phase_change import render_phase_change_svg

        (out / "phase_change.svg").write_text(render_phase_change_svg(history, phase_change_step(history)))
    analysis: dict = {}
    if layers == 0:
        table = bigram_table(model)
        analysis["bigrams"] = [
            dict(token=model.tokenizer.decode([t]), next=model.tokenizer.decode([int(table[t].argmax())]))
            for t in b"etaoin ,."
        ]
    elif layers == 1:
        analysis["skip_trigrams"] = [
            dict(head=h, source=s, destination=d, output=o, score=sc)
            for h, s, d, o, sc in skip_trigrams(model, k=5)
        ]
    if as_json:
        return _emit_json({"config": cfg.__dict__, "checkpoint": str(out), "history": history, **analysis})
    t = Table(*history[0].keys(), title=f"training ({out})")
    for row in history:
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()])
    console.print(t)
    for key, rows in analysis.items():
        at = Table(*rows[0].keys(), title=key)
        for r in rows:
            at.add_row(
                *[
                    _lit(v) if isinstance(v, str) else f"{v:.2f}" if isinstance(v, float) else str(v)
                    for v in r.values()
                ]
            )
        console.print(at)


from mechscope.cli import sae_commands  # noqa: E402  (after _friendly, which it wraps commands with)

sae_commands.register(app, _friendly)

from mechscope.cli import edit_commands  # noqa: E402

edit_commands.register(app, _friendly)

from mechscope.cli import feature_commands  # noqa: E402

feature_commands.register(app, _friendly)

from mechscope.cli import steer_commands  # noqa: E402

steer_commands.register(app, _friendly)

from mechscope.cli import probe_commands  # noqa: E402

probe_commands.register(app, _friendly)


from mechscope.cli import web_commands  # noqa: E402  (after feature_commands: joins its group)

web_commands.register(app, _friendly)

from mechscope.cli import demo_commands  # noqa: E402

demo_commands.register(app, _friendly)

if __name__ == "__main__":
    app()
