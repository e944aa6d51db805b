"""The local web app over a feature database: browse, search, map and steer features (``mechscope serve``).

:func:`create_app` returns a FastAPI app. Pages are rendered on the server (Jinja2 templates, the
feature page is :func:`mechscope.viz.dashboard.render_feature_html`); three small scripts, no build
step, drive the live views. Views (``docs/web.md`` has them all):

    /                 index: features paged, ordered by a column, filtered by density, searched by explanation
    /feature/{id}     the feature's dashboard
    /search           type text: which features fire on which tokens (model + SAE run live)
    /map              UMAP of the decoder directions; zoom, pan, click a dot to open its feature
    /steer            generate with features added or clamped, beside the plain generation
    /attention /explain /heads   the library's attention view, explain report and head-detector table
    /api/...          the JSON behind them

The database is opened once; a request reads only what it shows (point lookups and DuckDB queries,
never the whole table), so the app serves databases of any size. Views that run the model need
``model`` (and the SAE for an SAE database); without them they answer 409 with how to start the server.
Every parameter is validated: bad input is a 4xx whose body says what was wrong, never a 500.
"""

from __future__ import annotations

import json
import math
import threading
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from mechscope.features.db import ORDERABLE, FeatureDB
from mechscope.features.steer import MODES, FeatureSteer
from mechscope.features.tables import UnknownFeatureError
from mechscope.models.errors import MechscopeError
from mechscope.models.hooked import HookedModel
from mechscope.saes.sae import SAE
from mechscope.web.live import Live, NoModelError, WebInputError
from mechscope.web.security import GuardMiddleware, check_bind

STATIC = {"app.css": "text/css", "search.js": "text/javascript", "map.js": "text/javascript"} | {
    "steer.js": "text/javascript"
}
"""The only files /static serves (a fixed table: no path from a request ever reaches the filesystem)."""

MAX_TEXT = 2000
MAX_STRENGTH = 1000.0
MAX_NEW_TOKENS = 64
MAX_STEERS = 8
MAX_SEARCH_ROWS = 10_000


Order = Annotated[str, Query(pattern="^(" + "|".join(ORDERABLE) + ")$")]
Density = Annotated[str | None, Query(max_length=40)]


def _density(name: str, text: str | None) -> float | None:
    """A density bound in [0, 1]; an empty form field ("density >= [ ]") means no bound."""
    if text is None or not text.strip():
        return None
    try:
        x = float(text)
    except ValueError:
        x = math.nan
    if not 0.0 <= x <= 1.0:  # also NaN
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": f"a density is a number in [0, 1], got {text!r}",
                    "type": "value_error",
                }
            ]
        )
    return x


Prompt = Annotated[str, Query(max_length=MAX_TEXT)]


class SteerItem(BaseModel):
    feature: int = Field(ge=0)
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    mode: str = "add"


class SteerRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=MAX_TEXT)
    steers: list[SteerItem] = Field(min_length=1, max_length=MAX_STEERS)
    max_new_tokens: int = Field(default=20, ge=1, le=MAX_NEW_TOKENS)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mechscope.web", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pct"] = lambda x: "–" if x is None else f"{x:.3%}"
    env.filters["num"] = lambda x: (
        "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"
    )
    return env


def _static(name: str) -> bytes:
    return resources.files("mechscope.web").joinpath("static", name).read_bytes()


def create_app(
    db_path: str | Path,
    model: HookedModel | None = None,
    sae: SAE | None = None,
    *,
    host: str = "127.0.0.1",
    token: str | None = None,
    max_tokens: int = 256,
) -> FastAPI:
    """The web app over the feature database in ``db_path``.

    Args:
        db_path: a feature database directory (``mechscope features build``).
        model: the model it was built with; enables text search, steering and the model views.
        sae: the SAE it was built from (SAE databases; neuron databases need only the model).
        host: the address the server will bind; a non-loopback one requires ``token``.
        token: a secret every request must carry (see :mod:`mechscope.web.security`).
        max_tokens: the longest text (in tokens) a live view accepts.

    Raises:
        WebSecurityError: a non-loopback ``host`` without a token.
        FeatureDBError: ``db_path`` is not a feature database.
        IncompatibleFeatureDBError: it was built with another model or SAE.
    """
    check_bind(host, token)
    if sae is not None and model is None:
        raise ValueError("an SAE needs its model: pass model= too (mechscope serve DB --model M --sae S)")
    db = FeatureDB.open(db_path, model=model, sae=sae)
    live = Live(db, model, sae, max_tokens=max_tokens)
    env = _env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        db.close()

    app = FastAPI(title="mechscope", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(GuardMiddleware, token=token)
    app.state.db, app.state.live = db, live
    map_lock = threading.Lock()
    map_cache: dict[str, bytes] = {}

    nav = [("/", "Features"), ("/search", "Search"), ("/map", "Map"), ("/steer", "Steer")]
    nav += [("/attention", "Attention"), ("/explain", "Explain"), ("/heads", "Heads")]

    def page(name: str, title: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = env.get_template(name).render(
            title=title, nav=nav, db_title=db.title, has_model=live.model is not None, **ctx
        )
        return HTMLResponse(html, status_code=status)

    def fail(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith(("/api/", "/static/")) or "/view" in request.url.path:
            return JSONResponse({"error": message}, status_code=status)
        return page("error.html", f"Error {status}", status=status, status_code=status, message=message)

    # ------------------------------------------------------------------ errors -> 4xx with a message
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body"))
            parts.append(f"{where or 'request'}: {e.get('msg', 'invalid')}")
        return fail(request, 422, "invalid parameters: " + "; ".join(parts))

    def answer(status: int):
        async def handler(request: Request, exc: Exception) -> Response:
            return fail(request, status, str(exc))

        return handler

    # Starlette picks the handler of the exception's nearest class, so the order here does not matter.
    for exc_type, status in (
        (UnknownFeatureError, 404),
        (NoModelError, 409),
        (MechscopeError, 400),
        (ValueError, 400),
    ):
        app.add_exception_handler(exc_type, answer(status))

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> Response:
        return fail(request, 404, f"no such page: {request.url.path}")

    # ------------------------------------------------------------------ the index
    def listing(page_: int, per_page: int, order: str, desc: bool, lo, hi, q: str) -> dict[str, Any]:
        lo, hi = _density("min_density", lo), _density("max_density", hi)
        offset = (page_ - 1) * per_page
        if q.strip():
            if offset + per_page > MAX_SEARCH_ROWS:  # the search has no OFFSET: never fetch unbounded rows
                raise WebInputError(
                    f"explanation search pages through the first {MAX_SEARCH_ROWS:,} matches; add words to narrow it"
                )
            rows = db.search_explanations(q, limit=offset + per_page, min_density=lo, max_density=hi)[offset:]
            total = None
        else:
            rows = db.features(
                order_by=order, descending=desc, min_density=lo, max_density=hi, limit=per_page, offset=offset
            )
            total = db.count(min_density=lo, max_density=hi)
        return {"rows": [r._asdict() for r in rows], "total": total, "page": page_, "per_page": per_page}

    @app.get("/", response_class=HTMLResponse)
    def index(
        request: Request,
        page_: Annotated[int, Query(alias="page", ge=1, le=10**7)] = 1,
        per_page: Annotated[int, Query(ge=1, le=500)] = 50,
        order: Order = "id",
        desc: bool = False,
        min_density: Density = None,
        max_density: Density = None,
        q: Annotated[str, Query(max_length=200)] = "",
    ):
        got = listing(page_, per_page, order, desc, min_density, max_density, q)
        params = {
            k: v
            for k, v in dict(
                per_page=per_page,
                order=order,
                desc=str(desc).lower(),
                min_density=min_density,
                max_density=max_density,
                q=q,
            ).items()
            if v not in (None, "")
        }
        total = got["total"]
        last = max(1, math.ceil(total / per_page)) if total is not None else None
        more = len(got["rows"]) == per_page and (last is None or page_ < last)
        return page(
            "index.html",
            db.title,
            **got,
            last=last,
            prev_url="/?" + urlencode({**params, "page": page_ - 1}) if page_ > 1 else None,
            next_url="/?" + urlencode({**params, "page": page_ + 1}) if more else None,
            orderable=ORDERABLE,
            order=order,
            desc=desc,
            min_density=_density("min_density", min_density),
            max_density=_density("max_density", max_density),
            q=q,
            n_features=db.n_features,
            meta=db.meta,
        )

    @app.get("/api/features")
    def api_features(
        page_: Annotated[int, Query(alias="page", ge=1, le=10**7)] = 1,
        per_page: Annotated[int, Query(ge=1, le=500)] = 50,
        order: Order = "id",
        desc: bool = False,
        min_density: Density = None,
        max_density: Density = None,
        q: Annotated[str, Query(max_length=200)] = "",
    ):
        return listing(page_, per_page, order, desc, min_density, max_density, q)

    # ------------------------------------------------------------------ one feature
    @app.get("/feature/{fid}", response_class=HTMLResponse)
    def feature(fid: int):
        from mechscope.viz.dashboard import render_feature_html

        rec = db.feature(fid)
        body = render_feature_html(rec, full_page=False, link=lambda i: f"/feature/{i}")
        return page(
            "feature.html",
            f"Feature #{rec.id}",
            fid=rec.id,
            body=body,
            prev_id=rec.id - 1 if rec.id > 0 else None,
            next_id=rec.id + 1 if rec.id + 1 < db.n_features else None,
        )

    @app.get("/api/feature/{fid}")
    def api_feature(fid: int):
        return _finite(db.feature(fid).to_dict())

    @app.get("/api/info")
    def api_info():
        src = db.meta.get("source", {})
        return {
            "title": db.title,
            "n_features": db.n_features,
            "model": db.meta.get("model"),
            "hook": src.get("hook"),
            "kind": src.get("kind"),
            "n_tokens": db.meta.get("n_tokens"),
            "live": live.source is not None,
        }

    # ------------------------------------------------------------------ text search
    @app.get("/search", response_class=HTMLResponse)
    def search_page(text: Annotated[str, Query(max_length=MAX_TEXT)] = ""):
        return page("search.html", "Search by text", text=text, live=live.source is not None)

    @app.get("/api/search")
    def api_search(
        text: Annotated[str, Query(min_length=1, max_length=MAX_TEXT)],
        k: Annotated[int, Query(ge=1, le=20)] = 5,
        top: Annotated[int, Query(ge=1, le=100)] = 20,
    ):
        return live.search(text, k=k, n_top=top)

    # ------------------------------------------------------------------ map
    @app.get("/map", response_class=HTMLResponse)
    def map_page():
        from mechscope.features.umap_map import MAP_FILE

        cached = (Path(db.path) / MAP_FILE).is_file()
        return page("map.html", "Feature map", cached=cached, can_compute=live.source is not None)

    @app.get("/api/map")
    def api_map():
        from mechscope.features.umap_map import feature_map, load_map

        with map_lock:  # computed (UMAP, seconds) and serialised once per server
            if "json" not in map_cache:
                table = load_map(db)
                if table is None:
                    src = live.need_source()
                    with live.lock:
                        table = feature_map(db, live.model, src)
                density = db.sql("SELECT density FROM features ORDER BY id").column(0).to_pylist()
                xs, ys = table.column("x").to_pylist(), table.column("y").to_pylist()
                map_cache["json"] = json.dumps(
                    {
                        "n": len(xs),
                        "x": [round(v, 4) for v in xs],
                        "y": [round(v, 4) for v in ys],
                        "density": [float(f"{d:.3g}") for d in density],
                    },
                    separators=(",", ":"),
                ).encode()
        return Response(map_cache["json"], media_type="application/json")

    # ------------------------------------------------------------------ steering
    @app.get("/steer", response_class=HTMLResponse)
    def steer_page(
        feature: Annotated[int | None, Query(ge=0)] = None,
        strength: Annotated[float, Query(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)] = 10.0,
    ):
        if feature is not None:
            db.check_id(feature)
        return page(
            "steer.html",
            "Steer",
            feature=feature,
            strength=strength,
            modes=MODES,
            live=live.source is not None,
            n_features=db.n_features,
            max_strength=MAX_STRENGTH,
            max_new_tokens=MAX_NEW_TOKENS,
        )

    @app.post("/api/steer")
    def api_steer(req: Annotated[SteerRequest, Body()]):
        steers = [FeatureSteer(s.feature, s.strength, s.mode) for s in req.steers]
        return live.steer(req.prompt, steers, req.max_new_tokens)

    # ------------------------------------------------------------------ other views
    @app.get("/attention", response_class=HTMLResponse)
    def attention_page(
        request: Request,
        prompt: Prompt = "",
        layer: Annotated[int, Query(ge=0, le=1000)] = 0,
        heads: str = "",
    ):
        view = "/attention/view?" + request.url.query if prompt else None
        return page(
            "attention.html", "Attention patterns", prompt=prompt, layer=layer, heads=heads, view=view
        )

    @app.get("/attention/view", response_class=HTMLResponse)
    def attention_view(
        prompt: Annotated[str, Query(min_length=1, max_length=MAX_TEXT)],
        layer: Annotated[int, Query(ge=0, le=1000)] = 0,
        heads: Annotated[str, Query(max_length=200, pattern=r"^[0-9, ]*$")] = "",
    ):
        ids = [int(h) for h in heads.replace(",", " ").split()]
        return HTMLResponse(live.attention(prompt, layer, ids))

    @app.get("/explain", response_class=HTMLResponse)
    def explain_page(
        request: Request, prompt: Prompt = "", answer: Prompt = "", wrong: Prompt = "", corrupt: Prompt = ""
    ):
        view = "/explain/view?" + request.url.query if prompt and answer else None
        return page(
            "explain.html", "Explain", prompt=prompt, answer=answer, wrong=wrong, corrupt=corrupt, view=view
        )

    @app.get("/explain/view", response_class=HTMLResponse)
    def explain_view(
        prompt: Annotated[str, Query(min_length=1, max_length=MAX_TEXT)],
        answer: Annotated[str, Query(min_length=1, max_length=100)],
        wrong: Annotated[str, Query(max_length=100)] = "",
        corrupt: Prompt = "",
    ):
        return HTMLResponse(live.explain(prompt, answer, wrong, corrupt))

    @app.get("/heads", response_class=HTMLResponse)
    def heads_page():
        return page("heads.html", "Head detectors", view="/heads/view")

    @app.get("/heads/view", response_class=HTMLResponse)
    def heads_view():
        return HTMLResponse(live.heads())

    # ------------------------------------------------------------------ static files (a fixed table)
    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return Response(_static(name), media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})

    return app


def _finite(x: Any) -> Any:
    """JSON has no NaN: a NaN statistic (a feature that never fired) becomes null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


__all__ = ["create_app"]
