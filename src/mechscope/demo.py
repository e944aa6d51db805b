"""The main job: the whole loop on one model in one call, from a prediction to a browsable SAE.

:func:`run_demo` does, into one directory::

    out/
      demo.json           the settings and every step's numbers (a re-run reads it)
      explain.html        1. the explain report of one prediction (IOI by default)
      acts/               2. activations of one mid layer's resid_post over the embedded corpus
      acts-heldout/          and a few more on another shuffle (seed + 1), for evaluation only
      sae/                3. a TopK SAE trained on acts/ (``sae/sae/`` is the SAE)
                          4. its evaluation: FVU, L0, CE loss recovered on acts-heldout/
      features/db/        5. its feature database, read from acts/ (no second forward pass)
      features/dashboards/   and the dashboards of its top features
      index.html          6. a self-contained landing page linking all of it

**Resuming is re-running.** Each step records its numbers in ``demo.json`` once its output is whole;
a re-run with the same settings reuses recorded steps whose files are still there (the model is not
even loaded when nothing is left to do) and redoes the rest. A step killed midway resumes from its
own checkpoints (the store's finished shards, the trainer's and the feature build's checkpoints), so
the result equals an uninterrupted run's. Other settings in the same directory are refused
(:class:`DemoMismatchError`), since every artifact there was made from them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any, NamedTuple

from jaxtyping import Float
from torch import Tensor

from mechscope.models.errors import MechscopeError

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
STEPS = ("explain", "harvest", "train", "evaluate", "features", "index")
_DOWNSTREAM = {"harvest": ("train", "evaluate", "features"), "train": ("evaluate", "features")}
DEMO_FILE = "demo.json"
_FORMAT, _VERSION = "mechscope.demo", 2  # 2: contexts start with BOS


class DemoMismatchError(MechscopeError, ValueError):
    """The demo directory holds a run made with another model or other settings."""


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything the demo's result depends on; saved in ``demo.json`` (a re-run must match it)."""

    prompt: str = IOI_PROMPT
    """The prompt whose next token ``explain`` explains."""
    answer: str = " Mary"
    wrong: str | None = " John"
    corrupt: str | None = IOI_CORRUPT
    """Same token length, other answer: enables the patching sections of the report."""
    layer: int | None = None
    """The layer whose ``hook_resid_post`` is harvested (None: ``n_layers // 2``)."""
    tokens: int = 1 << 16
    """Tokens harvested for training and for the feature database."""
    heldout_tokens: int = 1 << 11
    """Tokens harvested on another shuffle of the corpus, only to evaluate the SAE."""
    corpus: str = "default"
    context_length: int = 128
    expansion: int = 8
    """``d_sae = expansion * d_model``."""
    k: int = 32
    """TopK: latents active per token."""
    train_tokens: int = 1 << 18
    """Training tokens (passes over the store as often as needed)."""
    batch_size: int = 1024
    lr: float = 1e-3
    top_n: int = 50
    """Features given a dashboard page: the most often firing ones."""
    eval_contexts: int = 8
    """Held-out contexts for the CE loss with the SAE spliced in (three forwards each)."""
    seed: int = 0

    def __post_init__(self):
        for name in ("tokens", "heldout_tokens", "train_tokens", "batch_size", "expansion", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("tokens", "heldout_tokens"):
            if getattr(self, name) < self.context_length:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) is less than one context ({self.context_length} tokens)"
                )
        if self.train_tokens < self.batch_size:
            raise ValueError(f"train_tokens ({self.train_tokens}) is less than one batch ({self.batch_size})")
        if self.top_n < 0 or self.eval_contexts < 1:
            raise ValueError(
                f"need top_n >= 0 and eval_contexts >= 1, got {self.top_n}, {self.eval_contexts}"
            )


class DemoStep(NamedTuple):
    """What the progress callback gets as a step starts (``status="start"``) and ends."""

    number: int
    """1-based, of ``len(STEPS)``; 0 for loading the model (only when some step needs it)."""
    name: str
    status: str
    """``start``, ``done`` (computed now) or ``reused`` (recorded by an earlier run)."""
    detail: str
    seconds: float


@dataclass
class DemoResult:
    """Where everything is, and the numbers worth printing (``to_dict`` for JSON)."""

    out: Path
    model: str
    layer: int
    hook: str
    index_html: Path
    explain_html: Path
    store: Path
    heldout_store: Path
    run_dir: Path
    sae_dir: Path
    """The trained SAE (native format): ``mechscope serve DB --sae`` takes it."""
    features_db: Path
    """The feature database: ``mechscope serve`` opens it."""
    dashboards_index: Path
    explain: dict[str, Any]
    train: dict[str, Any]
    evaluation: dict[str, Any]
    features: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each step took in this run (0 for a reused step); ``total`` includes the model load."""
    reused: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# ---------------------------------------------------------------------------------------- helpers
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{k} ({have.get(k)!r} there, {want.get(k)!r} now)" for k in want if have.get(k) != want.get(k)]


class _Record:
    """``demo.json``: the settings, then each finished step's numbers, rewritten after every step."""

    def __init__(self, out: Path, model_name: str, cfg: DemoConfig):
        self.path = out / DEMO_FILE
        want = {"model": model_name, **asdict(cfg)}
        if self.path.is_file():
            data = json.loads(self.path.read_text())
            have = {"model": data.get("model"), **data.get("config", {})}
            if (data.get("format"), data.get("version")) != (_FORMAT, _VERSION) or have != want:
                diff = _differences(have, want) or ["version of mechscope demo"]
                raise DemoMismatchError(
                    f"{out} holds a demo made with another {', '.join(diff[:4])}; give another --out, "
                    f"or delete {out} to start over"
                )
            self.steps: dict[str, dict[str, Any]] = data.get("steps", {})
        else:
            self.steps = {}
        self.head = {"format": _FORMAT, "version": _VERSION, "model": model_name, "config": asdict(cfg)}

    def save(self) -> None:
        _write_atomic(self.path, json.dumps({**self.head, "steps": self.steps}, indent=2) + "\n")


def _store_complete(path: Path) -> bool:
    from mechscope.saes.store import ActivationStore

    try:
        return ActivationStore.open(path).complete
    except (MechscopeError, OSError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ demo
def run_demo(
    model_name: str = "smollm2-135m",
    out: str | Path = "mechscope-demo",
    *,
    cfg: DemoConfig | None = None,
    progress: Callable[[DemoStep], None] | None = None,
    **settings: Any,
) -> DemoResult:
    """Explain one prediction, harvest, train a TopK SAE, evaluate it, build its feature database and
    dashboards, and write ``out/index.html`` linking them; resumable (see the module docstring).

    Args:
        model_name: a ``load_model`` name (the embedded default ``smollm2-135m``, ``tiny-llama``, ...).
        out: the demo directory; created, or resumed if it holds a demo with the same settings.
        cfg: the settings; or give any :class:`DemoConfig` field as a keyword (``layer=``, ``tokens=``...).
        progress: called with a :class:`DemoStep` as each step starts and ends.

    Raises:
        DemoMismatchError: ``out`` holds a demo with another model or settings.
        TokenizationError: ``answer`` or ``wrong`` is not one token of this model.
    """
    if cfg is None:
        cfg = DemoConfig(**settings)
    elif settings:
        cfg = DemoConfig(**{**asdict(cfg), **settings})
    root = Path(out).resolve()  # the SAE run records its store's path: one spelling, wherever it runs from
    root.mkdir(parents=True, exist_ok=True)
    rec = _Record(root, model_name, cfg)
    t_start = time.perf_counter()
    say = progress or (lambda step: None)
    loaded: list = []
    seconds: dict[str, float] = {}

    def model():  # loaded only if some step has work left
        if not loaded:
            import mechscope as ms

            say(DemoStep(0, "load", "start", model_name, 0.0))
            t0 = time.perf_counter()
            m = ms.load_model(model_name)
            _hook(m, cfg)  # a bad --layer fails now, not after the explain report
            loaded.append(m)
            seconds["load"] = round(time.perf_counter() - t0, 2)
            say(DemoStep(0, "load", "done", model_name, seconds["load"]))
        return loaded[0]

    paths = dict(
        explain_html=root / "explain.html",
        store=root / "acts",
        heldout_store=root / "acts-heldout",
        run_dir=root / "sae",
        sae_dir=root / "sae" / "sae",
        features_db=root / "features" / "db",
        dashboards_index=root / "features" / "dashboards" / "index.html",
        index_html=root / "index.html",
    )
    whole = {
        "explain": lambda: paths["explain_html"].is_file(),
        "harvest": lambda: _store_complete(paths["store"]) and _store_complete(paths["heldout_store"]),
        "train": lambda: (paths["sae_dir"] / "cfg.json").is_file(),
        "evaluate": lambda: True,
        "features": lambda: (
            (paths["features_db"] / "meta.json").is_file()
            and paths["dashboards_index"].is_file()
            and all(
                _feature_page(paths["dashboards_index"].parent, i).is_file()
                for i in rec.steps["features"]["pages"]
            )
        ),
    }
    work = {
        "explain": lambda: _explain(model(), model_name, cfg, paths["explain_html"]),
        "harvest": lambda: _harvest(model(), model_name, cfg, paths),
        "train": lambda: _train(model_name, cfg, rec.steps["harvest"], paths),
        "evaluate": lambda: _evaluate(model(), cfg, paths),
        "features": lambda: _features(model(), cfg, rec.steps["harvest"], paths),
    }
    reused: list[str] = []
    for number, name in enumerate(STEPS, 1):
        if name == "index":
            break
        if name in rec.steps and whole[name]():
            reused.append(name)
            seconds[name] = 0.0
            say(DemoStep(number, name, "reused", _detail(name, rec.steps[name]), 0.0))
            continue
        say(DemoStep(number, name, "start", "", 0.0))
        t0, had_model = time.perf_counter(), bool(loaded)
        step = work[name]()
        load = seconds.get("load", 0.0) if loaded and not had_model else 0.0  # the model loaded in this step
        seconds[name] = round(time.perf_counter() - t0 - load, 2)
        rec.steps[name] = step
        step["seconds"] = seconds[name]
        for later in _DOWNSTREAM.get(name, ()):  # made from this step's output: redo (or reopen) them
            rec.steps.pop(later, None)
        rec.save()
        say(DemoStep(number, name, "done", _detail(name, rec.steps[name]), seconds[name]))
    number = len(STEPS)
    say(DemoStep(number, "index", "start", "", 0.0))
    t0 = time.perf_counter()
    result = DemoResult(
        out=root,
        model=model_name,
        layer=rec.steps["harvest"]["layer"],
        hook=rec.steps["harvest"]["hook"],
        explain=rec.steps["explain"],
        train=rec.steps["train"],
        evaluation=rec.steps["evaluate"],
        features=rec.steps["features"],
        reused=reused,
        **paths,
    )
    _write_atomic(paths["index_html"], render_index(result, cfg, paths["features_db"]))
    seconds["index"] = round(time.perf_counter() - t0, 2)
    say(DemoStep(number, "index", "done", str(paths["index_html"]), seconds["index"]))
    seconds["total"] = round(time.perf_counter() - t_start, 2)
    result.seconds = seconds
    return result


def _detail(name: str, r: dict[str, Any]) -> str:
    """The one-line summary of a finished step."""
    if name == "explain":
        top = r["predictions"][0]
        return f"metric {r['metric']:.3f}; top prediction {top[0]!r} ({top[1]:.3f}); heads {', '.join(r['heads'])}"
    if name == "harvest":
        return f"{r['tokens']:,} + {r['heldout_tokens']:,} held-out tokens of {r['hook']}"
    if name == "train":
        return f"{r['d_sae']:,} latents, {r['steps']} steps; last batch FVU {r['fvu']:.3f}, L0 {r['l0']:.1f}"
    if name == "evaluate":
        h = r["heldout"]
        s = f"held-out FVU {h['fvu']:.3f}, L0 {h['l0']:.1f}"
        if r.get("downstream"):
            s += f", CE loss recovered {r['downstream']['ce_loss_recovered']:.1%}"
        return s + f"; dead {r['train']['dead_fraction']:.1%} over the training tokens"
    if name == "features":
        return f"{r['n_features']:,} features over {r['n_tokens']:,} tokens; {len(r['pages'])} dashboards"
    return ""


def _explain(model, model_name: str, cfg: DemoConfig, html: Path) -> dict[str, Any]:
    from mechscope.interventions.explain import ExplainConfig, explain

    ex = explain(model, cfg.prompt, ExplainConfig(cfg.answer, cfg.wrong, cfg.corrupt), name=model_name)
    _write_atomic(html, ex.to_html())
    return {
        "metric": ex.metric,
        "predictions": [[t, p] for t, p in ex.predictions],
        "heads": [f"L{layer}H{h}" for layer, h in ex.heads],
        "dla_top": [[label, float(v)] for label, v in ex.dla.top(4)],
    }


def _hook(model, cfg: DemoConfig) -> tuple[int, str]:
    layer = model.cfg.n_layers // 2 if cfg.layer is None else cfg.layer
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in 0 .. {model.cfg.n_layers - 1} for this model, got {layer}")
    return layer, f"blocks.{layer}.hook_resid_post"


def _harvest(model, model_name: str, cfg: DemoConfig, paths: dict[str, Path]) -> dict[str, Any]:
    from mechscope.data.contexts import ContextConfig
    from mechscope.saes.harvest import HarvestConfig, harvest

    layer, hook = _hook(model, cfg)
    # Every context starts with BOS, even for a model that prepends none (SmolLM2): position 0 is an
    # attention sink whatever its token (a residual norm ~150x the others' at layer 15), and as BOS it
    # is left out of training, evaluation and the feature statistics instead of dominating them.
    bos = True if model.tokenizer.bos_token_id is not None else None  # None: the model's own policy
    stores = {}
    for key, n, seed in (
        ("store", cfg.tokens, cfg.seed),
        ("heldout_store", cfg.heldout_tokens, cfg.seed + 1),
    ):
        hcfg = HarvestConfig(
            hooks=(hook,),
            n_tokens=n,
            contexts=ContextConfig(context_length=cfg.context_length, seed=seed, prepend_bos=bos),
            batch_size=16,
        )
        stores[key] = harvest(model, cfg.corpus, paths[key], hcfg, model_name=model_name)
    return {
        "layer": layer,
        "hook": hook,
        "d_model": model.cfg.d_model,
        "tokens": stores["store"].n_tokens,
        "heldout_tokens": stores["heldout_store"].n_tokens,
    }


def _train(
    model_name: str, cfg: DemoConfig, harvested: dict[str, Any], paths: dict[str, Path]
) -> dict[str, Any]:
    from mechscope.saes.sae import SAEConfig
    from mechscope.saes.sources import StoreSource
    from mechscope.saes.train import TrainConfig, train_sae

    d = harvested["d_model"]
    sae_cfg = SAEConfig(
        d_in=d,
        d_sae=cfg.expansion * d,
        kind="topk",
        k=cfg.k,
        hook_name=harvested["hook"],
        model_name=model_name,
        seed=cfg.seed,
    )
    # A latent silent for a quarter of the run counts as dead (AuxK revives it): the default
    # (2^20 tokens) is longer than this whole run, so no latent would ever be revived.
    tcfg = TrainConfig(
        n_tokens=cfg.train_tokens,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        dead_tokens=max(cfg.batch_size, cfg.train_tokens // 4),
        init_tokens=min(8192, harvested["tokens"]),
        checkpoint_every=16,
        seed=cfg.seed,
    )
    train_sae(StoreSource(paths["store"]), sae_cfg, tcfg, paths["run_dir"])
    rows = (paths["run_dir"] / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    return {
        "d_sae": sae_cfg.d_sae,
        "k": cfg.k,
        "steps": tcfg.steps,
        "fvu": last["fvu"],
        "l0": last["l0"],
        "dead_fraction": last["dead_fraction"],
    }


def _text_rows(store, hook: str, *, chunk: int = 4096) -> Iterator[Float[Tensor, "rows d_in"]]:
    """Every row of ``hook`` in ``store`` except BOS / separators (as training saw them), in order, once."""
    import numpy as np

    rows = np.arange(store.n_tokens)
    rows = rows[store.index_rows(rows)[:, 1] >= 0]  # document -1: BOS or separator
    for start in range(0, len(rows), chunk):
        yield store.read(hook, rows[start : start + chunk])


def _evaluate(model, cfg: DemoConfig, paths: dict[str, Path]) -> dict[str, Any]:
    from mechscope.saes.evals import evaluate_sae, reconstruction_metrics, store_contexts
    from mechscope.saes.formats import load_sae
    from mechscope.saes.store import ActivationStore
    from mechscope.viz.sae import density_histogram

    sae = load_sae(paths["sae_dir"], model=model).to(model.device)
    hook = sae.cfg.hook_name
    held = ActivationStore.open(paths["heldout_store"])
    ev = evaluate_sae(
        sae, _text_rows(held, hook), model=model, contexts=store_contexts(held, cfg.eval_contexts)
    ).to_dict()
    # Dead / dense latents over the training tokens (a few thousand held-out ones would call rare ones dead).
    on_train = reconstruction_metrics(sae, _text_rows(ActivationStore.open(paths["store"]), hook))
    return {
        "heldout": ev["reconstruction"],
        "downstream": ev["downstream"],
        "train": {k: v for k, v in asdict(on_train).items() if k != "density"},
        "density_svg": density_histogram(on_train.density),
    }


def _features(model, cfg: DemoConfig, harvested: dict[str, Any], paths: dict[str, Path]) -> dict[str, Any]:
    from mechscope.features import FeatureConfig, feature_report
    from mechscope.saes.store import ActivationStore

    store = ActivationStore.open(paths["store"])
    fcfg = FeatureConfig(n_tokens=store.n_tokens, seed=cfg.seed)
    report = feature_report(
        model, paths["run_dir"], store, paths["features_db"].parent, cfg=fcfg, top_n=cfg.top_n
    )
    db = report.db
    top = []
    for i in report.features[:10]:
        r = db.feature(i)
        ex = r.top[0] if r.top else None
        at = ex.position - ex.window_start if ex else 0
        top.append(
            {
                "id": i,
                "density": r.density,
                "max": r.max,
                "promoted": [e.str for e in r.promoted[:5]],
                # its strongest context: a few tokens before the max token, the token, two after
                "context": [ex.strs[max(0, at - 8) : at], ex.strs[at], ex.strs[at + 1 : at + 3]]
                if ex
                else None,
            }
        )
    return {
        "n_features": db.n_features,
        "n_tokens": db.meta["n_tokens"],
        "firing": int(db.sql("SELECT count(*) AS n FROM features WHERE n_firing > 0").column("n")[0].as_py()),
        "pages": report.features,
        "top": top,
    }


# ------------------------------------------------------------------------------------- the page
_CSS = """
body{font:15px system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
.note{color:#555}table{border-collapse:collapse}td,th{border-bottom:1px solid #eee;padding:3px 10px;text-align:left}
td.n{font-variant-numeric:tabular-nums;text-align:right}
.tok{font-family:ui-monospace,monospace;white-space:pre;background:#f0f0f5;padding:0 3px;margin:0 1px;border-radius:3px}
.links a{display:inline-block;margin-right:1.5em;font-weight:600}
code{background:#f5f5f5;padding:1px 4px;border-radius:3px}
td.ctx{font-family:ui-monospace,monospace;font-size:13px;white-space:pre-wrap}td.ctx b{background:#fdd9a0}
"""


def _tok(t: str) -> str:
    return f"<span class='tok'>{escape(repr(t)[1:-1])}</span>"


def _context(c: list | None) -> str:
    if not c:
        return ""
    before, token, after = c
    return escape("".join(before)) + f"<b>{escape(token)}</b>" + escape("".join(after))


def _feature_page(dashboards: Path, i: int) -> Path:
    return dashboards / f"feature-{i}.html"  # the name write_dashboards gives page i


def _rel(path: Path, root: Path) -> str:
    return escape(path.relative_to(root).as_posix(), quote=True)


def render_index(result: DemoResult, cfg: DemoConfig, db_path: Path) -> str:
    """``index.html``: links to the report and the dashboards, the SAE's numbers, its top features."""
    root = result.out
    ex, tr, ev, fe = result.explain, result.train, result.evaluation, result.features
    held, down, on_train = ev["heldout"], ev.get("downstream"), ev["train"]
    rows = [
        ("FVU (held-out)", f"{held['fvu']:.4f}", "fraction of variance unexplained: 0 is perfect"),
        ("L0 (held-out)", f"{held['l0']:.1f}", f"active latents per token (TopK k = {tr['k']})"),
        (
            "dead latents",
            f"{on_train['dead_fraction']:.2%}",
            f"never fire on the {on_train['n_tokens']:,} training tokens",
        ),
        ("dense latents", f"{on_train['dense_fraction']:.2%}", "fire on more than 10% of tokens"),
    ]
    if down:
        rows += [
            (
                "CE loss recovered",
                f"{down['ce_loss_recovered']:.2%}",
                "SAE spliced in, vs clean and zero-ablated",
            ),
            (
                "CE loss clean / SAE / zero",
                f"{down['ce_loss_clean']:.3f} / {down['ce_loss_sae']:.3f} / {down['ce_loss_zero']:.3f}",
                f"nats, {down['n_tokens']:,} held-out predictions",
            ),
            ("KL(clean || SAE)", f"{down['kl']:.4f}", "nats per token"),
        ]
    metrics = "".join(
        f"<tr><td>{a}</td><td class='n'>{b}</td><td class='note'>{escape(c)}</td></tr>" for a, b, c in rows
    )
    dash = result.dashboards_index.parent
    feats = "".join(
        f"<tr><td><a href='{_rel(_feature_page(dash, f['id']), root)}'>#{f['id']}</a></td>"
        f"<td class='n'>{f['density']:.3%}</td><td class='n'>{f['max']:.3g}</td>"
        f"<td class='ctx'>{_context(f['context'])}</td><td>{''.join(_tok(t) for t in f['promoted'])}</td></tr>"
        for f in fe["top"]
    )
    preds = ", ".join(f"{_tok(t)} {p:.3f}" for t, p in ex["predictions"])
    metric_name = f"logit({cfg.answer!r}) - logit({cfg.wrong!r})" if cfg.wrong else f"log p({cfg.answer!r})"
    title = f"mechscope demo: {result.model}"
    body = f"""
<h1>{escape(title)}</h1>
<p class='note'>One prediction explained, then a sparse autoencoder trained on layer {result.layer}'s residual
stream (<code>{escape(result.hook)}</code>) and its features laid out. Everything here is in
<code>{escape(str(root))}</code>; open the feature database in the web app with
<code>mechscope serve {escape(str(db_path))} --model {escape(result.model)} --sae {escape(str(result.sae_dir))}</code>.</p>
<p class='links'><a href='{_rel(result.explain_html, root)}'>explain report</a>
<a href='{_rel(result.dashboards_index, root)}'>feature dashboards ({len(fe["pages"])})</a></p>
<h2>The prediction</h2>
<p>{escape(cfg.prompt)} → top: {preds}</p>
<p>{escape(metric_name)} = <b>{ex["metric"]:.3f}</b>; strongest heads by direct logit attribution:
{escape(", ".join(f"{label} {v:+.2f}" for label, v in ex["dla_top"]))}.</p>
<h2>The SAE</h2>
<p class='note'>TopK (k = {tr["k"]}), {tr["d_sae"]:,} latents ({cfg.expansion} × d_model), trained for
{tr["steps"]} steps of {cfg.batch_size} tokens over {result.features["n_tokens"]:,} harvested tokens; evaluated on
{held["n_tokens"]:,} held-out tokens from another shuffle of the corpus (BOS and separators left out).</p>
<table>{metrics}</table>
{ev.get("density_svg") or ""}
<h2>Features</h2>
<p class='note'>{fe["firing"]:,} of {fe["n_features"]:,} features fire on the {fe["n_tokens"]:,} tokens read.
The ten that fire most often, each with the context it fires on most (its max token in bold) and the
tokens it promotes most through the unembedding:</p>
<table><tr><th>feature</th><th>density</th><th>max</th><th>strongest context</th><th>promotes</th></tr>{feats}</table>
"""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )
