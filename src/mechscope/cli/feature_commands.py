"""``mechscope features build | show | list | dashboards``: feature databases from the command line.

``cli/main.py`` registers the group with ``feature_commands.register(app, _friendly)``. Like
``sae_commands``, nothing from ``main`` is imported at import time, only inside the commands.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Annotated

import typer

from mechscope.data.contexts import ContextConfig
from mechscope.features.build import FeatureConfig
from mechscope.features.db import ORDERABLE

_F = {f.name: f.default for f in fields(FeatureConfig)}
_C = {f.name: f.default for f in fields(ContextConfig)}
OrderBy = enum.Enum("OrderBy", {k: k for k in ORDERABLE}, type=str)  # from the DB's list, never by hand
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DbDir = Annotated[Path, typer.Argument(help="Feature database directory (mechscope features build --out).")]


def build(
    model: Annotated[
        str, typer.Argument(help="Model alias (smollm2-135m, tiny-llama, ...), directory or .gguf.")
    ],
    out: Annotated[Path, typer.Option(help="Database directory: created, resumed, or reopened if finished.")],
    sae: Annotated[
        Path | None,
        typer.Option(
            help="SAE directory (native, SAELens or Gemma Scope format) or a train-sae run directory."
        ),
    ] = None,
    neurons: Annotated[
        int | None, typer.Option(help="Use the MLP neurons of this layer instead (blocks.L.mlp.hook_post).")
    ] = None,
    corpus: Annotated[
        str,
        typer.Option(
            help="default | shakespeare | pydoc, a .txt/.jsonl/.parquet file or directory, or hf:<dataset>."
        ),
    ] = "default",
    store: Annotated[
        Path | None,
        typer.Option(
            help="Read activations from this store (mechscope harvest) instead of running the model."
        ),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", "--n-tokens", min=1, help="Tokens to read.")] = _F[
        "n_tokens"
    ],
    context_length: Annotated[int, typer.Option(min=2, help="Tokens per context, BOS included.")] = _C[
        "context_length"
    ],
    batch_size: Annotated[int, typer.Option(min=1, help="Contexts per forward pass.")] = _F["batch_size"],
    top_k: Annotated[int, typer.Option(min=1, help="Top-activating contexts kept per feature.")] = _F[
        "top_k"
    ],
    n_quantiles: Annotated[int, typer.Option(min=1, help="Activation intervals sampled.")] = _F[
        "n_quantiles"
    ],
    quantile_samples: Annotated[int, typer.Option(min=1, help="Contexts sampled per interval.")] = _F[
        "quantile_samples"
    ],
    seed: Annotated[int, typer.Option(help="Seed of the context shuffle and of the quantile sampling.")] = _F[
        "seed"
    ],
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Batches between checkpoints, at least.")] = _F[
        "checkpoint_every"
    ],
    checkpoint_seconds: Annotated[
        float,
        typer.Option(min=0, help="And seconds between checkpoints, at least (0: every --checkpoint-every)."),
    ] = _F["checkpoint_seconds"],
    as_json: JsonFlag = False,
):
    """Build a feature database: top contexts, quantile samples, histograms, logit effects, neighbours.

    One streaming pass over the corpus with bounded memory. Interrupt it at any time and run the same
    command again: it resumes from the last checkpoint and ends with the same database.

    With --store the activations come from a harvested store (its contexts and corpus; the model
    then only supplies the weights for logit effects): no forward passes.

    Example: mechscope features build smollm2-135m --neurons 6 --out feats/l6 --tokens 100000
    """
    from mechscope.cli.main import _emit_json, _load, console, err
    from mechscope.cli.sae_commands import _progress_bar
    from mechscope.data.corpus import load_corpus
    from mechscope.features import Neurons, build_features, load_trained_sae
    from mechscope.saes.store import ActivationStore

    if (sae is None) == (neurons is None):
        raise ValueError("give exactly one of --sae PATH (SAE latents) or --neurons LAYER (MLP neurons)")
    cfg = FeatureConfig(
        n_tokens=tokens,
        contexts=ContextConfig(context_length=context_length, seed=seed),
        batch_size=batch_size,
        top_k=top_k,
        n_quantiles=n_quantiles,
        quantile_samples=quantile_samples,
        seed=seed,
        checkpoint_every=checkpoint_every,
        checkpoint_seconds=checkpoint_seconds,
    )
    if store is not None:
        data = ActivationStore.open(store)
    else:
        with err.status(f"reading corpus {corpus}"):
            data = load_corpus(corpus)
    m = _load(model)
    source = Neurons(neurons) if neurons is not None else load_trained_sae(sae, m)
    bar, show, computed = _progress_bar()

    def shown(p) -> None:
        show(p)
        bar.update(bar.tasks[0].id, description="resuming" if p.skipped else "reading")

    start = time.perf_counter()
    with bar:
        db = build_features(m, source, data, cfg, out, model_name=model, progress=shown)
    seconds = time.perf_counter() - start
    dead = db.sql("SELECT count(*) AS n FROM features WHERE n_firing = 0").to_pylist()[0]["n"]
    summary = {
        "database": str(out.resolve()),
        "model": model,
        "source": f"{db.meta['source']['kind']} at {db.meta['source']['hook']}",
        "features": db.n_features,
        "never_firing": dead,
        "tokens": db.meta["n_tokens"],
        "tokens_read_now": computed[0],
        "seconds": round(seconds, 2),
        "tokens_per_s": round(computed[0] / seconds, 1) if seconds > 0 else None,
    }
    if as_json:
        return _emit_json(summary)
    from rich.table import Table

    table = Table("", "", title=f"feature database {out}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, str(v))
    console.print(table)


def _tokens_markup(strs: list[str], acts: list[float], vmax: float, highlight: int) -> str:
    """A context for the terminal: tokens on an orange scale, the max token underlined."""
    from rich.markup import escape

    out = []
    for i, (s, a) in enumerate(zip(strs, acts, strict=True)):
        level = min(5, int(6 * a / vmax)) if vmax > 0 and a > 0 else 0
        style = ["", "on #3a2200", "on #5c3500", "on #804a00", "on #a65f00", "on #cc7400"][level]
        style += " underline" if i == highlight else ""
        text = escape(s.replace("\n", "↵"))
        out.append(f"[{style.strip()}]{text}[/]" if style.strip() else text)
    return "".join(out)


def show(
    database: DbDir,
    feature: Annotated[int, typer.Argument(help="Feature id.")],
    html: Annotated[Path | None, typer.Option(help="Also write the dashboard page here.")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Top contexts to print.")] = 5,
    as_json: JsonFlag = False,
):
    """Print one feature: statistics, top contexts (max token underlined), logit effects, neighbours.

    Example: mechscope features show feats/l6 42 --html feature42.html
    """
    from mechscope.cli.main import _emit_json, _lit, console, err
    from mechscope.features import FeatureDB

    with FeatureDB.open(database) as db:
        rec = db.feature(feature)
    if html is not None:
        html.write_text(rec.to_html(), encoding="utf-8")
        err.print(f"dashboard written to {html}")
    if as_json:
        return _emit_json(rec.to_dict())
    console.print(f"[bold]Feature #{rec.id}[/bold]  {rec.title}")
    mean_f = "-" if rec.mean_firing is None else f"{rec.mean_firing:.4g}"
    console.print(
        f"density {rec.density:.3%}  max {rec.max:.4g}  mean {rec.mean:.4g}  mean when firing {mean_f}"
    )
    if rec.explanation:
        console.print(f"explanation: {rec.explanation}", markup=False)
    for e in rec.top[:examples]:
        console.print(f"{e.value:8.3f}  " + _tokens_markup(e.strs, e.activations, rec.max, e.max_index))
    for name, effects in (("promoted", rec.promoted), ("suppressed", rec.suppressed)):
        if effects:
            console.print(f"{name}: " + ", ".join(f"{_lit(t.str)} {t.value:+.2f}" for t in effects))
    if rec.neighbours:
        console.print("neighbours: " + ", ".join(f"#{n.id} ({n.cosine:.2f})" for n in rec.neighbours))


def list_features(
    database: DbDir,
    order_by: Annotated[OrderBy, typer.Option(help="Column to sort by.")] = OrderBy.max,  # type: ignore[attr-defined]
    ascending: Annotated[bool, typer.Option(help="Smallest first (default: largest first).")] = False,
    min_density: Annotated[float | None, typer.Option(help="Keep features at least this dense.")] = None,
    max_density: Annotated[float | None, typer.Option(help="Keep features at most this dense.")] = None,
    search: Annotated[
        str | None, typer.Option(help="Only features whose explanation has every word.")
    ] = None,
    limit: Annotated[int, typer.Option(min=0)] = 20,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    as_json: JsonFlag = False,
):
    """List features, filtered by density (and explanation text), sorted by a column.

    Example: mechscope features list feats/l6 --order-by density --max-density 0.01
    """
    from mechscope.cli.main import _emit_json, console
    from mechscope.features import FeatureDB

    with FeatureDB.open(database) as db:
        if search is not None:
            rows = db.search_explanations(
                search, limit=limit, min_density=min_density, max_density=max_density
            )
        else:
            rows = db.features(
                order_by=order_by.value,
                descending=not ascending,
                min_density=min_density,
                max_density=max_density,
                limit=limit,
                offset=offset,
            )
        title = db.title
    if as_json:
        return _emit_json([r._asdict() for r in rows])
    from rich.table import Table

    table = Table("feature", "density", "max", "mean", "explanation", title=title)
    for r in rows:
        table.add_row(str(r.id), f"{r.density:.3%}", f"{r.max:.4g}", f"{r.mean:.4g}", r.explanation or "")
    console.print(table)


def dashboards(
    database: DbDir,
    out: Annotated[Path, typer.Option(help="Directory for index.html and feature-<id>.html.")],
    feature: Annotated[
        list[int] | None, typer.Option(help="A feature to write (repeat the flag); default: all.")
    ] = None,
    top: Annotated[
        int | None, typer.Option(min=0, help="Instead: the TOP firing features by --order-by, largest first.")
    ] = None,
    order_by: Annotated[OrderBy, typer.Option(help="Ranking used by --top.")] = OrderBy.density,  # type: ignore[attr-defined]
    as_json: JsonFlag = False,
):
    """Write self-contained dashboard pages (no network needed to view them) and an index.

    Example: mechscope features dashboards feats/l6 --out dash/ --top 50 --order-by max
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from mechscope.cli.main import _emit_json, err
    from mechscope.features import FeatureDB, top_features
    from mechscope.viz.dashboard import write_dashboards

    with (
        FeatureDB.open(database) as db,
        Progress(TextColumn("pages"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as bar,
    ):
        if top is not None:
            if feature:
                raise ValueError("give --feature or --top, not both")
            feature = top_features(db, top, order_by.value)
        task = bar.add_task("pages", total=None)
        index = write_dashboards(
            db, out, feature, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
        n = len(set(feature)) if feature is not None else db.n_features
    if as_json:
        return _emit_json({"index": str(index.resolve()), "pages": n})
    err.print(f"{n} dashboard pages and {index} written")


def register(app: typer.Typer, friendly: Callable) -> None:
    """Add the ``features`` command group to ``app``, each command wrapped in ``friendly``."""
    group = typer.Typer(
        help="Feature databases and dashboards (SAE latents or MLP neurons).", no_args_is_help=True
    )
    group.command("build")(friendly(build))
    group.command("show")(friendly(show))
    group.command("list")(friendly(list_features))
    group.command("dashboards")(friendly(dashboards))
    app.add_typer(group, name="features")
