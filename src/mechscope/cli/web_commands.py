"""``mechscope serve``, ``mechscope features steer`` and ``mechscope features map``: the web app and its
feature tools from the command line.

``cli/main.py`` registers them with ``web_commands.register(app, _friendly)`` after ``feature_commands``
(``steer`` and ``map`` join its ``features`` group). Nothing from ``main`` is imported at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

_Db = Annotated[Path, typer.Argument(help="Feature database directory (mechscope features build --out).")]
_Sae = Annotated[
    Path | None,
    typer.Option(help="The SAE the database was built from (SAE directory or train-sae run directory)."),
]


def _source(m, sae: Path | None, neurons: int | None):
    from mechscope.features import Neurons, load_trained_sae

    if (sae is None) == (neurons is None):
        raise ValueError("give exactly one of --sae PATH (SAE latents) or --neurons LAYER (MLP neurons)")
    return Neurons(neurons) if neurons is not None else load_trained_sae(sae, m)


def parse_steer(spec: str):
    """``ID:STRENGTH[:MODE]`` (``12:8``, ``40:0:clamp``) as a :class:`FeatureSteer`."""
    from mechscope.features.steer import FeatureSteer, FeatureSteerError

    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise FeatureSteerError(
            f"--feature takes ID:STRENGTH or ID:STRENGTH:MODE (e.g. 12:8 or 40:0:clamp), got {spec!r}"
        )
    try:
        fid, strength = int(parts[0]), float(parts[1])
    except ValueError:
        raise FeatureSteerError(f"--feature {spec!r}: ID must be an integer and STRENGTH a number") from None
    return FeatureSteer(fid, strength, parts[2] if len(parts) == 3 else "add")


def serve(
    db: _Db,
    model: Annotated[
        str | None, typer.Option(help="The model the database was built with: enables search, steer, views.")
    ] = None,
    sae: _Sae = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs --token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port.")] = 8000,
    token: Annotated[
        str | None,
        typer.Option(help="Secret every request must carry (header X-Mechscope-Token, ?token=, or cookie)."),
    ] = None,
    precompute_map: Annotated[
        bool, typer.Option(help="Compute the UMAP feature map before serving (else on its first view).")
    ] = True,
):
    """Serve the local web app over a feature database: browse, search, map and steer features.

    Binds 127.0.0.1 by default. Without --model the feature pages work (index, dashboards, explanation
    search, a cached map); text search, steering, attention, explain and the head table need the model
    (and --sae for an SAE database).

    Example: mechscope serve runs/l6/features/db --model smollm2-135m --sae runs/l6
    """
    import uvicorn

    from mechscope.cli.main import _load, err
    from mechscope.web import create_app
    from mechscope.web.security import check_bind

    check_bind(host, token)  # before loading anything
    if sae is not None and model is None:
        raise ValueError("--sae needs --model (the model the SAE reads)")
    m = _load(model) if model is not None else None
    s = None
    if sae is not None:
        from mechscope.features import load_trained_sae

        s = load_trained_sae(sae, m)
    app = create_app(db, m, s, host=host, token=token)
    live = app.state.live
    if precompute_map and live.source is not None:
        from mechscope.features.umap_map import feature_map

        with err.status("computing the feature map (UMAP, once; cached in the database directory)"):
            feature_map(app.state.db, m, live.source)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    err.print(f"serving {app.state.db.title} at {url}  (Ctrl-C stops)", highlight=False, soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def steer_feature(
    model: Annotated[
        str, typer.Argument(help="Model alias (smollm2-135m, tiny-llama, ...), directory or .gguf.")
    ],
    prompt: Annotated[str, typer.Argument(help="The prompt to continue.")],
    feature: Annotated[
        list[str],
        typer.Option(
            "--feature",
            "-f",
            help="ID:STRENGTH[:MODE], repeatable; MODE add (default) or clamp. E.g. -f 12:8 -f 40:0:clamp",
        ),
    ],
    sae: _Sae = None,
    neurons: Annotated[int | None, typer.Option(help="Steer MLP neurons of this layer instead.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated (greedy).")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
):
    """Generate with SAE features (or neurons) added or clamped, beside the unsteered generation.

    add: strength x the feature's decoder direction at every token; clamp: the feature's activation set
    to the strength (0 ablates it). Greedy, so both texts are deterministic.

    Example: mechscope features steer smollm2-135m "I think that" --sae runs/l6 -f 1234:40
    """
    from mechscope.cli.main import _emit_json, _load, console
    from mechscope.features.steer import generate_steered

    steers = [parse_steer(s) for s in feature]
    m = _load(model)
    out = generate_steered(m, _source(m, sae, neurons), prompt, steers, max_new_tokens=max_new_tokens)
    if as_json:
        _emit_json(
            {
                "prompt": prompt,
                "steered": out.steered,
                "unsteered": out.unsteered,
                "steers": [s.__dict__ for s in steers],
            }
        )
        return
    from rich.markup import escape

    what = ", ".join(f"#{s.feature} {s.mode} {s.strength:g}" for s in steers)
    console.print(f"[bold]steered[/bold] ({escape(what)}):", highlight=False)
    console.print(escape(out.steered), highlight=False, soft_wrap=True)
    console.print("[bold]unsteered[/bold]:", highlight=False)
    console.print(escape(out.unsteered), highlight=False, soft_wrap=True)


def map_command(
    db: _Db,
    model: Annotated[str, typer.Option(help="The model the database was built with.")],
    sae: _Sae = None,
    n_neighbors: Annotated[int, typer.Option(min=2, help="UMAP's n_neighbors.")] = 15,
    min_dist: Annotated[float, typer.Option(min=0.0, help="UMAP's min_dist.")] = 0.1,
    seed: Annotated[int, typer.Option(help="UMAP's random_state.")] = 0,
    recompute: Annotated[bool, typer.Option(help="Replace a cached map.")] = False,
):
    """Compute the 2-D UMAP map of a database's decoder directions once (DB/map.parquet) for the web app.

    Example: mechscope features map runs/l6/features/db --model smollm2-135m --sae runs/l6
    """
    from mechscope.cli.main import _load, console, err
    from mechscope.features import FeatureDB, load_trained_sae
    from mechscope.features.umap_map import MAP_FILE, feature_map

    m = _load(model)
    s = load_trained_sae(sae, m) if sae is not None else None
    with FeatureDB.open(db, model=m, sae=s) as fdb, err.status("running UMAP"):
        table = feature_map(
            fdb, m, s, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed, recompute=recompute
        )
    console.print(f"{table.num_rows} features mapped: {Path(db) / MAP_FILE}", highlight=False)


def register(app: typer.Typer, friendly: Callable) -> None:
    """``serve`` at the top level; ``steer`` and ``map`` in the ``features`` group (registered before)."""
    app.command("serve")(friendly(serve))
    groups = [g.typer_instance for g in app.registered_groups if g.name == "features"]
    if not groups:
        raise RuntimeError("register web_commands after feature_commands: the features group is missing")
    groups[0].command("steer")(friendly(steer_feature))
    groups[0].command("map")(friendly(map_command))
