"""``mechscope harvest``: a model's activations over a corpus, into an activation store.

``cli/main.py`` registers the commands here with ``sae_commands.register(app, _friendly)``. This
module imports nothing from ``main`` at import time (only inside the commands), so the two can be
imported in either order, and ``python -m mechscope.cli.main`` works.
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
from mechscope.saes.harvest import HarvestConfig
from mechscope.saes.store import DTYPES

_H = {f.name: f.default for f in fields(HarvestConfig)}
_C = {f.name: f.default for f in fields(ContextConfig)}
# Choices from the registry of stored dtypes, never a hand-kept list.
StoredDtype = enum.Enum("StoredDtype", {k: k for k in DTYPES}, type=str)
_DEFAULT_DTYPE = StoredDtype(_H["dtype"])


def _progress_bar(err):
    """A Rich progress bar over tokens with tokens/s and ETA, and the callback that drives it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f} tok/s" if task.speed else "- tok/s", style="progress.data.speed")

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Speed(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    task = bar.add_task("tokenizing", total=None)
    computed = [0]

    def show(p) -> None:
        if p.skipped:  # shards found done: reset, so they do not count as speed
            bar.reset(task, total=p.tokens_total, completed=p.tokens_done, description="resuming")
        else:
            computed[0] += p.tokens_done - bar.tasks[0].completed
            bar.update(task, total=p.tokens_total, completed=p.tokens_done, description="harvesting")

    return bar, show, computed


def harvest(
    model: Annotated[
        str, typer.Argument(help="Model alias (smollm2-135m, tiny-llama, ...), directory or .gguf.")
    ],
    out: Annotated[
        Path, typer.Argument(help="Store directory: created, or resumed if it holds this same harvest.")
    ],
    hook: Annotated[
        list[str],
        typer.Option(
            help="Hook point to store, e.g. blocks.5.hook_resid_post (repeat the flag for several)."
        ),
    ],
    corpus: Annotated[
        str,
        typer.Option(
            help="default | shakespeare | pydoc, a .txt/.jsonl/.parquet file or a directory of them, or hf:<dataset>."
        ),
    ] = "default",
    tokens: Annotated[int, typer.Option(min=1, help="Tokens to harvest (fewer if the corpus ends).")] = _H[
        "n_tokens"
    ],
    context_length: Annotated[int, typer.Option(min=2, help="Tokens per context, BOS included.")] = _C[
        "context_length"
    ],
    batch_size: Annotated[int, typer.Option(min=1, help="Contexts per forward pass.")] = _H["batch_size"],
    dtype: Annotated[StoredDtype, typer.Option(help="Stored dtype.")] = _DEFAULT_DTYPE,
    shard_tokens: Annotated[int, typer.Option(min=1, help="Tokens per shard file.")] = _H["shard_tokens"],
    seed: Annotated[int, typer.Option(help="Seed of the document and context shuffles.")] = _C["seed"],
    text_field: Annotated[
        str, typer.Option(help="JSONL field / Parquet column / dataset field with the text.")
    ] = ("text"),
    hf_config: Annotated[str | None, typer.Option(help="Configuration of an hf: dataset.")] = None,
    hf_split: Annotated[str, typer.Option(help="Split of an hf: dataset.")] = "train",
    verify_existing: Annotated[
        bool, typer.Option(help="When resuming, checksum the shards already written and redo corrupt ones.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")
    ] = False,
):
    """Harvest activations of one or more hook points over a corpus into a sharded on-disk store.

    The forward stops after the deepest requested layer. Interrupt it at any time and run the same
    command again: finished shards are kept and the result is identical to an uninterrupted run.

    Example: mechscope harvest smollm2-135m acts/ --hook blocks.5.hook_resid_post --tokens 200000
    """
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _load, console, err
    from mechscope.data.corpus import load_corpus
    from mechscope.saes.harvest import harvest as run_harvest

    cfg = HarvestConfig(
        hooks=tuple(hook),
        n_tokens=tokens,
        contexts=ContextConfig(context_length=context_length, seed=seed),
        batch_size=batch_size,
        dtype=dtype.value,
        shard_tokens=shard_tokens,
    )
    with err.status(f"reading corpus {corpus}"):
        text = load_corpus(corpus, text_field=text_field, config=hf_config, split=hf_split)
    m = _load(model)
    bar, show, computed = _progress_bar(err)
    start = time.perf_counter()
    with bar:
        store = run_harvest(
            m, text, out, cfg, model_name=model, progress=show, verify_existing=verify_existing
        )
    seconds = time.perf_counter() - start
    files = [f for f in out.rglob("*") if f.is_file()]
    summary = {
        "store": str(out.resolve()),
        "model": model,
        "hooks": store.hooks,
        "dtype": dtype.value,
        "context_length": context_length,
        "tokens": store.n_tokens,
        "tokens_harvested_now": computed[0],
        "shards": store.n_shards,
        "bytes": sum(f.stat().st_size for f in files),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(computed[0] / seconds, 1) if seconds > 0 else None,
        "corpus": store.identity["corpus"].get("name"),
        "seed": seed,
    }
    if as_json:
        return _emit_json(summary)
    table = Table("", "", title=f"activation store {out}", show_header=False)
    for k, v in summary.items():
        table.add_row(k, ", ".join(f"{h} ({w})" for h, w in v.items()) if isinstance(v, dict) else str(v))
    console.print(table)


def register(app: typer.Typer, friendly: Callable) -> None:
    """Add this module's commands to ``app``, each wrapped in ``friendly`` (main's error handler)."""
    app.command("harvest")(friendly(harvest))
