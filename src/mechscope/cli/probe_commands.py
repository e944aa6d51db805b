"""``mechscope probe layers | calendar | ccs``: linear probes, circular geometry and CCS from the command line.

``cli/main.py`` registers the group with ``probe_commands.register(app, _friendly)``. Nothing from
``main`` is imported at import time (only inside the commands), so the modules import in any order.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from mechscope.probes import datasets

_Model = Annotated[
    str, typer.Argument(help="Model alias (smollm2-135m, tiny-llama, ...), directory or .gguf.")
]
_Hooks = Annotated[
    list[str] | None,
    typer.Option(
        "--hook",
        help="Hook point to probe (repeat the flag); default: the embeddings and every block's resid_post.",
    ),
]
_Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
_Seed = Annotated[int, typer.Option(help="Seed of the train/validation split and the control task.")]


# Choices from the dataset registries, never a hand-kept list.
LabelledSet = enum.Enum("LabelledSet", {k: k for k in datasets.LABELLED}, type=str)
PairSet = enum.Enum("PairSet", {k: k for k in datasets.PAIRS}, type=str)
Cycle = enum.Enum("Cycle", {k: k for k in ("days", "months")}, type=str)
Projection = enum.Enum("Projection", {k: k for k in ("pca", "umap")}, type=str)
_PCA = Projection("pca")
_SENTIMENT, _PAIRS_SENTIMENT, _DAYS = LabelledSet("sentiment"), PairSet("sentiment"), Cycle("days")


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict]:
    from mechscope.probes.activations import ProbeError

    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ProbeError(f"{path}:{i + 1} is not JSON ({e}); write one JSON object per line") from None
        missing = [k for k in keys if k not in row]
        if missing:
            raise ProbeError(f"{path}:{i + 1} lacks {missing}; each line needs {list(keys)}")
        rows.append(row)
    if not rows:
        raise ProbeError(f"{path} holds no examples")
    return rows


def _forward_bar(total: int, what: str):
    """A Rich progress bar over prompts and the ``progress(done, total)`` callback that drives it."""
    from mechscope.cli.main import progress

    bar = progress()
    task = bar.add_task(what, total=total)
    return bar, lambda done, _total: bar.update(task, completed=done)


def layers(
    model: _Model,
    dataset: Annotated[
        LabelledSet, typer.Option(help="Built-in labelled prompts (ignored with --data).")
    ] = _SENTIMENT,
    data: Annotated[
        Path | None,
        typer.Option(
            help='JSONL file, one {"text": ..., "label": ...} per line (string/int labels: classes; floats: regression).'
        ),
    ] = None,
    hook: _Hooks = None,
    read: Annotated[
        str, typer.Option(help="Position read: last, mean, or an int (0 = first token).")
    ] = "last",
    l2: Annotated[
        float, typer.Option(min=0.0, help="L2 penalty (standardised units, on the mean loss).")
    ] = 1e-2,
    val_fraction: Annotated[
        float,
        typer.Option(
            help="Share held out at random (the built-in sentiment set holds out its own words and sentences)."
        ),
    ] = 0.25,
    seed: _Seed = 0,
    save_direction: Annotated[
        Path | None,
        typer.Option(
            help="Write the best probe's unit direction (its activation pattern, for the last class) as "
            "safetensors with the hook name in the metadata, for steering."
        ),
    ] = None,
    projection: Annotated[
        Projection, typer.Option(help="2-D map of the best hook point's activations (umap needs umap-learn).")
    ] = _PCA,
    html: Annotated[Path, typer.Option(help="Where to write the 'which layer knows' plot.")] = Path(
        "mechscope-probe.html"
    ),
    as_json: _Json = False,
):
    """Fit a linear probe at every layer: which layer's activations encode the label?

    Logistic regression for classes, ridge for numbers; each probe is also fitted on randomly
    permuted labels (the control task), so validation minus control says how much is the label's.

    Example: mechscope probe layers smollm2-135m --dataset sentiment
    """
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _load, console, err
    from mechscope.probes.activations import gather_activations
    from mechscope.probes.geometry import project
    from mechscope.probes.linear import ProbeConfig, train_probes
    from mechscope.viz.probes import (
        render_layer_scores_svg,
        render_probe_report_html,
        render_scatter_svg,
        render_table_html,
    )

    if data is not None:
        rows = _read_jsonl(data, ("text", "label"))
        texts, labels, source = [r["text"] for r in rows], [r["label"] for r in rows], str(data)
        val_indices = None
    else:
        d = datasets.LABELLED[dataset.value]()
        texts, labels, source = d.texts, d.labels, dataset.value
        val_indices = d.val_indices or None  # held-out words/sentences where the dataset defines them
    position: str | int = int(read) if read.lstrip("-").isdigit() else read
    cfg = ProbeConfig(l2=l2, val_fraction=val_fraction, seed=seed, skip_constant=hook is None)
    m = _load(model)
    bar, show = _forward_bar(len(texts), "caching activations")
    with bar:
        acts = gather_activations(m, texts, hook, read=position, progress=show)
    with err.status(f"fitting {2 * len(acts)} probes"):
        result = train_probes(acts, labels, cfg, val_indices=val_indices)
    records = result.to_records()
    best = result.best()
    title = (
        f"{source} probes on {model} ({result.metric}; {result.n_train} train / {result.n_val} validation)"
    )
    sections = [("Which layer knows", render_layer_scores_svg(records, metric=result.metric, title=title))]
    if result.task == "classification":
        with err.status(f"{projection.value} projection of {best.hook_name}"):
            coords = project(acts[best.hook_name], projection.value).coords
        scatter = render_scatter_svg(
            coords.tolist(), labels, classes=list(result.probes[best.hook_name].classes),
            title=f"{best.hook_name}, {projection.value}, coloured by label",
        )  # fmt: skip
        sections.append((f"{projection.value.upper()} of the best hook point", scatter))
    sections.append(("Scores", render_table_html(records)))
    html.write_text(render_probe_report_html(title, sections))
    if save_direction is not None:
        from safetensors.torch import save_file

        cls = best.classes[-1] if best.classes else None  # the last class in sorted order
        meta = {
            "hook_name": best.hook_name,
            "source": f"linear probe ({source}), activation pattern",
            "class": str(cls),
            "val_score": str(best.val_score),
        }
        save_file({"direction": best.direction(cls)}, save_direction, meta)
    if as_json:
        return _emit_json(
            dict(
                model=model,
                dataset=source,
                task=result.task,
                metric=result.metric,
                n_train=result.n_train,
                n_val=result.n_val,
                split="random" if val_indices is None else "held out by the dataset",
                skipped=list(result.skipped),
                best=best.hook_name,
                probes=records,
                html=str(html.resolve()),
            )
        )
    table = Table("hook point", "train", "validation", "control", "selectivity", title=title)
    for r in records:
        mark = " *" if r["hook"] == best.hook_name else ""
        table.add_row(
            r["hook"] + mark,
            *(f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("train", "val", "control", "selectivity")),
        )
    console.print(table)
    if result.skipped:
        err.print(f"skipped (no variance): {', '.join(result.skipped)}")
    err.print(f"best: {best.hook_name} ({result.metric} {best.val_score:.3f}); plot written to {html}")


def calendar(
    model: _Model,
    kind: Annotated[Cycle, typer.Option(help="Days of the week or months of the year.")] = _DAYS,
    hook: _Hooks = None,
    permutations: Annotated[int, typer.Option(min=10, help="Random orderings for the chance level.")] = 1000,
    html: Annotated[Path, typer.Option(help="Where to write the plots.")] = Path("mechscope-calendar.html"),
    as_json: _Json = False,
):
    """Is the model's representation of days / months circular? Circle fit, angle probe, hierarchy check.

    Per hook point: how much of the names' mean activations a circle in one plane explains (vs random
    orderings), whether they go round in order, whether a linear probe trained on the other names puts
    a held-out name at its angle, and the cosine between "a day" and "Monday - a day".

    Example: mechscope probe calendar smollm2-135m --kind months
    """
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _load, console, err
    from mechscope.probes.calendar import analyse_calendar
    from mechscope.viz.probes import render_probe_report_html, render_scatter_svg, render_table_html

    m = _load(model)
    n = len(datasets.calendar("days").texts) + len(datasets.calendar("months").texts)
    bar, show = _forward_bar(n, "caching activations")
    with bar:
        result = analyse_calendar(m, kind.value, hook, n_permutations=permutations, progress=show)
    records = result.to_records()
    best = result.best()
    fit = result.circles[best]
    scatter = render_scatter_svg(
        fit.coords.tolist(), result.labels, classes=result.classes, centres=fit.means_2d.tolist(), cyclic=True,
        title=f"{best}: examples in the fitted plane",
    )  # fmt: skip
    title = f"{kind.value} in {model}"
    html.write_text(
        render_probe_report_html(
            title, [("Best circle", scatter), ("Per hook point", render_table_html(records))]
        )
    )
    if as_json:
        return _emit_json(
            dict(model=model, kind=kind.value, best=best, hooks=records, html=str(html.resolve()))
        )
    cols = {  # column: header (short enough for an 80-column terminal)
        "circle_r2": "circle R²",
        "chance_r2": "chance",
        "p_value": "p",
        "aspect": "aspect",
        "in_order": "in order",
        "angle_acc": "angle acc",
        "angle_err_deg": "angle err°",
        "hierarchy_abs_cos": "|cos| hier",
    }
    chance = 1 / len(result.classes)
    table = Table("hook", *cols.values(), title=f"{title}: circle fit (chance angle acc {chance:.3f})")
    for r in records:
        short = r["hook"].replace("blocks.", "L").replace(".hook_resid_", " ").replace(".hook_", " ")
        table.add_row(short, *(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    console.print(table)
    err.print(f"best circle: {best} (R² {fit.circle_r2:.3f} vs chance {fit.chance_r2:.3f}); plots in {html}")


def ccs(
    model: _Model,
    dataset: Annotated[
        PairSet, typer.Option(help="Built-in contrast pairs (ignored with --data).")
    ] = _PAIRS_SENTIMENT,
    data: Annotated[
        Path | None,
        typer.Option(
            help='JSONL file, one {"pos": ..., "neg": ..., "label": 0/1} per line (label optional: null).'
        ),
    ] = None,
    hook: _Hooks = None,
    restarts: Annotated[int, typer.Option(min=1, help="Random restarts (the lowest loss is kept).")] = 10,
    epochs: Annotated[int, typer.Option(min=1, help="Full-batch AdamW steps.")] = 1000,
    seed: _Seed = 0,
    html: Annotated[Path, typer.Option(help="Where to write the accuracy plot.")] = Path(
        "mechscope-ccs.html"
    ),
    as_json: _Json = False,
):
    """Contrast-Consistent Search (Burns et al. 2022): a truth direction found without labels.

    Labels, where given, only score the result: CCS accuracy (sign-free) against a supervised logistic
    probe on the same pairs (the upper bound).

    Example: mechscope probe ccs smollm2-135m --dataset sentiment --hook blocks.15.hook_resid_post
    """
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _load, console, err
    from mechscope.probes.activations import default_probe_hooks, gather_activations
    from mechscope.probes.ccs import CCSConfig, train_ccs
    from mechscope.viz.probes import render_layer_scores_svg, render_probe_report_html, render_table_html

    if data is not None:
        rows = _read_jsonl(data, ("pos", "neg"))
        pos, neg, source = [r["pos"] for r in rows], [r["neg"] for r in rows], str(data)
        given = [r.get("label") for r in rows]
        labels = None if any(v is None for v in given) else given
    else:
        pairs = datasets.PAIRS[dataset.value]()
        pos, neg, labels, source = pairs.pos, pairs.neg, pairs.labels, dataset.value
    cfg = CCSConfig(n_restarts=restarts, epochs=epochs, seed=seed)
    m = _load(model)
    bar, show = _forward_bar(2 * len(pos), "caching activations")
    with bar:
        names = hook or default_probe_hooks(m)[1:]  # embeddings: the answer token itself (see ccs_layers)
        acts = gather_activations(m, list(pos) + list(neg), names, progress=show)
    n = len(pos)
    with err.status(f"training CCS: {len(acts)} hook points x {restarts} restarts x {epochs} steps"):
        probes = train_ccs(
            {h: a[:n] for h, a in acts.items()}, {h: a[n:] for h, a in acts.items()}, labels, cfg
        )
    records = [
        dict(hook=h, ccs_acc=p.accuracy, lr_acc=p.lr_accuracy, loss=p.loss, flipped=p.flipped)
        for h, p in probes.items()
    ]
    title = f"CCS on {source} ({model}, {n} pairs)"
    sections = [("Scores", render_table_html(records))]
    if labels is not None:
        plot = [dict(hook=r["hook"], val=r["ccs_acc"], train=r["lr_acc"]) for r in records]
        svg = render_layer_scores_svg(
            plot, title=title, names={"val": "CCS", "train": "logistic probe (upper bound)"}
        )
        sections.insert(0, ("CCS vs a supervised probe", svg))
    html.write_text(render_probe_report_html(title, sections))
    if as_json:
        return _emit_json(
            dict(model=model, dataset=source, n_pairs=n, hooks=records, html=str(html.resolve()))
        )
    table = Table("hook point", "CCS acc", "LR acc (upper bound)", "CCS loss", title=title)
    for r in records:
        fmt = [f"{r[k]:.3f}" if r[k] is not None else "-" for k in ("ccs_acc", "lr_acc", "loss")]
        table.add_row(r["hook"], *fmt)
    console.print(table)
    err.print(f"written to {html}")


def register(app: typer.Typer, friendly: Callable) -> None:
    """Add the ``probe`` command group to ``app``, each command wrapped in ``friendly`` (main's error handler)."""
    probe_app = typer.Typer(
        help="Linear probes, circular geometry and CCS on a model's activations.", no_args_is_help=True
    )
    probe_app.command("layers")(friendly(layers))
    probe_app.command("calendar")(friendly(calendar))
    probe_app.command("ccs")(friendly(ccs))
    app.add_typer(probe_app, name="probe")
