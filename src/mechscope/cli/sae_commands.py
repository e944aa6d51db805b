"""``mechscope harvest``, ``train-sae``, ``eval-sae``: from a model and a corpus to a trained, evaluated SAE.

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
from mechscope.saes.arch import KINDS
from mechscope.saes.harvest import HarvestConfig
from mechscope.saes.store import DTYPES
from mechscope.saes.train import TrainConfig

_H = {f.name: f.default for f in fields(HarvestConfig)}
_C = {f.name: f.default for f in fields(ContextConfig)}
_T = {f.name: f.default for f in fields(TrainConfig)}
# Choices from the registries (stored dtypes, SAE kinds), never a hand-kept list.
StoredDtype = enum.Enum("StoredDtype", {k: k for k in DTYPES}, type=str)
_DEFAULT_DTYPE = StoredDtype(_H["dtype"])
Kind = enum.Enum("Kind", {k: k for k in KINDS}, type=str)
_DEFAULT_KIND = Kind("topk")


def _progress_bar(disable: bool = False):
    """A Rich progress bar over tokens with tokens/s and ETA, and the callback that drives it."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    from mechscope.cli.main import progress

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.0f} tok/s" if task.speed else "- tok/s", style="progress.data.speed")

    bar = progress(Speed(), disable=disable)
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
    Under torchrun (torchrun --nproc-per-node N -m mechscope.cli.main harvest ...) the processes share
    the shards and write the same store.

    Example: mechscope harvest smollm2-135m acts/ --hook blocks.5.hook_resid_post --tokens 200000
    """
    from rich.table import Table

    from mechscope.cli.main import _emit_json, _load, console, err
    from mechscope.data.corpus import load_corpus
    from mechscope.saes.distributed import init_from_env
    from mechscope.saes.harvest import harvest as run_harvest

    rank, _ = init_from_env()  # under torchrun: data-parallel, process 0 reports

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
    bar, show, computed = _progress_bar(disable=rank != 0)
    start = time.perf_counter()
    with bar:
        store = run_harvest(
            m, text, out, cfg, model_name=model, progress=show, verify_existing=verify_existing
        )
    if rank != 0:
        return
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


def _source(
    store: Path | None,
    model: str | None,
    hook: str | None,
    out_hook: str | None,
    corpus: str,
    context_length: int,
    seed: int,
):
    """An activation store, or the model streamed over a corpus (no disk)."""
    from mechscope.saes.sources import StoreSource, StreamSource

    if (store is None) == (model is None):
        raise ValueError(
            "give exactly one of --store DIR (harvested activations) or --model NAME (streaming)"
        )
    if store is not None:
        return StoreSource(store, hook, out_hook), None
    if hook is None:
        raise ValueError("streaming from --model needs --hook, e.g. --hook blocks.5.hook_resid_post")
    from mechscope.cli.main import _load

    m = _load(model)
    ctx = ContextConfig(context_length=context_length, seed=seed)
    return StreamSource(m, corpus, hook, out_hook, contexts=ctx), m


def train_sae(
    out: Annotated[
        Path, typer.Argument(help="Run directory: created, or resumed if it holds this same run.")
    ],
    store: Annotated[
        Path | None, typer.Option(help="Activation store to train on (mechscope harvest).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Train while streaming this model's activations instead (no disk).")
    ] = None,
    hook: Annotated[
        str | None, typer.Option(help="Hook point read (default: the store's only hook).")
    ] = None,
    out_hook: Annotated[
        str | None, typer.Option(help="Transcoder: the hook point reconstructed (must be in the store too).")
    ] = None,
    corpus: Annotated[str, typer.Option(help="Corpus when streaming (see mechscope harvest).")] = "default",
    context_length: Annotated[int, typer.Option(min=2, help="Tokens per context when streaming.")] = _C[
        "context_length"
    ],
    kind: Annotated[Kind, typer.Option(help="SAE architecture.")] = _DEFAULT_KIND,
    expansion: Annotated[int, typer.Option(min=1, help="d_sae = expansion x d_in.")] = 8,
    k: Annotated[int | None, typer.Option(help="topk / batchtopk: active latents per token.")] = None,
    l1_coefficient: Annotated[float | None, typer.Option(help="relu: L1 weight.")] = None,
    l0_coefficient: Annotated[float | None, typer.Option(help="jumprelu: L0 weight.")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="Training tokens.")] = _T["n_tokens"],
    batch_size: Annotated[int, typer.Option(min=1, help="Tokens per step (global under torchrun).")] = _T[
        "batch_size"
    ],
    lr: Annotated[float, typer.Option(help="Adam's peak learning rate.")] = _T["lr"],
    lr_warmup: Annotated[float, typer.Option(help="Fraction of steps of linear LR warm-up.")] = _T[
        "lr_warmup"
    ],
    lr_decay: Annotated[
        float, typer.Option(help="Fraction of steps of linear LR decay to 0 at the end.")
    ] = _T["lr_decay"],
    sparsity_warmup: Annotated[
        float, typer.Option(help="Fraction of steps of sparsity-coefficient warm-up.")
    ] = _T["sparsity_warmup"],
    dead_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens without firing after which a latent is dead.")
    ] = _T["dead_tokens"],
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = _T[
        "checkpoint_every"
    ],
    log_every: Annotated[int, typer.Option(min=1, help="Steps between metrics.jsonl lines.")] = _T[
        "log_every"
    ],
    seed: Annotated[int, typer.Option(help="Seed of the batch order and of the SAE's initialisation.")] = _T[
        "seed"
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the final metrics as JSON.")] = False,
):
    """Train a sparse autoencoder on harvested (--store) or streamed (--model) activations.

    Interrupt it at any time and run the same command again: it resumes from the last checkpoint and
    ends with the same weights and the same metrics.jsonl as an uninterrupted run. Under torchrun
    (torchrun --nproc-per-node N -m mechscope.cli.main train-sae ...) it trains data-parallel.

    Example: mechscope train-sae runs/l5 --store acts/ --kind topk --k 32 --tokens 2000000
    """
    from rich.progress import TextColumn

    from mechscope.cli.main import _emit_json, console, progress
    from mechscope.saes.distributed import device_for_rank, init_from_env
    from mechscope.saes.sae import SAEConfig
    from mechscope.saes.train import train_sae as run

    rank, _ = init_from_env()
    source, m = _source(store, model, hook, out_hook, corpus, context_length, seed)
    d_in, d_out = source.widths
    extra = {"k": k, "l1_coefficient": l1_coefficient, "l0_coefficient": l0_coefficient}
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=expansion * d_in,
        d_out=d_out if out_hook else None,
        kind=kind.value,
        hook_name=source.hook,
        out_hook_name=out_hook,
        model_name=source.identity().get("model", model or ""),
        seed=seed,
        **{k_: v for k_, v in extra.items() if v is not None},
    )
    cfg = TrainConfig(
        n_tokens=tokens,
        batch_size=batch_size,
        lr=lr,
        lr_warmup=lr_warmup,
        lr_decay=lr_decay,
        sparsity_warmup=sparsity_warmup,
        dead_tokens=dead_tokens,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        seed=seed,
    )
    bar = progress(TextColumn("{task.fields[info]}"), disable=rank != 0)
    task = bar.add_task("training", total=cfg.steps, info="")
    last: dict = {}

    def show(p) -> None:
        last.update(p.metrics)
        mt = p.metrics
        info = f"{mt.get('tokens_per_s', 0):,.0f} tok/s"
        if "fvu" in mt:
            info += f"  fvu {mt['fvu']:.3f}  L0 {mt['l0']:.1f}  dead {mt['dead_fraction']:.1%}"
        bar.update(task, completed=p.step, info=info)

    device = m.device if m is not None else device_for_rank()
    with bar:
        run(source, sae_cfg, cfg, out, device=device, progress=show)
    if rank != 0:
        return
    summary = {"run": str(out.resolve()), "sae": str((out / "sae").resolve()), **last}
    if as_json:
        return _emit_json(summary)
    from rich.table import Table

    table = Table("", "", title=f"trained {kind.value} SAE, {sae_cfg.d_sae} latents", show_header=False)
    for key, v in summary.items():
        table.add_row(key, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


def eval_sae(
    sae: Annotated[Path, typer.Argument(help="SAE directory (native, SAELens or Gemma Scope format).")],
    store: Annotated[Path, typer.Option(help="Activation store with the SAE's hook point(s).")],
    tokens: Annotated[int, typer.Option(min=1, help="Stored tokens to evaluate reconstruction on.")] = 1
    << 16,
    model: Annotated[
        str | None, typer.Option(help="Also splice the SAE into this model: CE loss recovered and KL.")
    ] = None,
    contexts: Annotated[int, typer.Option(min=1, help="Stored contexts for the downstream loss.")] = 64,
    html: Annotated[Path | None, typer.Option(help="Write the feature-density histogram here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
):
    """Evaluate an SAE: L0, MSE, FVU, dead / dense latents, density histogram; with --model, CE loss recovered.

    Example: mechscope eval-sae runs/l5/sae --store acts/ --model smollm2-135m --html density.html
    """
    from itertools import islice

    from mechscope.cli.main import _emit_json, _load, console
    from mechscope.saes.evals import evaluate_sae, store_contexts
    from mechscope.saes.formats import load_sae
    from mechscope.saes.sources import StoreSource

    s = load_sae(sae)
    src = StoreSource(store, s.cfg.hook_name, s.cfg.out_hook_name)
    if src.widths != (s.cfg.d_in, s.cfg.d_out):
        raise ValueError(
            f"the SAE is {s.cfg.d_in} -> {s.cfg.d_out} wide but the store's rows are {src.widths}"
        )
    batch = 4096
    batches = islice(src.batches(min(batch, tokens), seed=0), max(1, tokens // batch))
    m = _load(model) if model else None
    ctx = store_contexts(src.store, contexts) if m is not None else None
    if m is not None:
        s = s.to(m.device)
    result = evaluate_sae(s, batches, model=m, contexts=ctx)
    if html is not None:
        html.write_text(
            f"<!doctype html><meta charset=utf-8><title>{sae.name}: feature density</title>"
            + result.density_histogram()
        )
    data = result.to_dict()
    if as_json:
        return _emit_json(data)
    from rich.table import Table

    table = Table("metric", "value", title=f"SAE {sae}")
    for part in data.values():
        for key, v in (part or {}).items():
            table.add_row(key, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(table)


def register(app: typer.Typer, friendly: Callable) -> None:
    """Add this module's commands to ``app``, each wrapped in ``friendly`` (main's error handler)."""
    app.command("harvest")(friendly(harvest))
    app.command("train-sae")(friendly(train_sae))
    app.command("eval-sae")(friendly(eval_sae))
