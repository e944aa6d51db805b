"""What the web app computes with the model: text search, steering, attention, explain, the head table.

A :class:`Live` holds the model and the feature source of the database (its SAE, or the neurons of
its layer) and runs every request under one lock: hooks are attached to the shared model, so two
requests must never overlap (a steering hook would leak into a concurrent search). Everything the
pages show comes from library functions (:mod:`mechscope.features.steer`,
:func:`~mechscope.viz.attention.attention_view`, :func:`~mechscope.interventions.explain.explain`,
:mod:`mechscope.circuits.head_detectors`); this module only validates sizes and shapes the answers.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from mechscope.features.db import FeatureDB
from mechscope.features.sources import FeatureSource, Neurons, feature_source
from mechscope.features.steer import FeatureSteer, generate_steered
from mechscope.models.errors import MechscopeError
from mechscope.models.hook_names import parse
from mechscope.models.hooked import HookedModel
from mechscope.saes.sae import SAE


class WebInputError(MechscopeError, ValueError):
    """A web request whose parameters are out of range (too long a text, a layer the model lacks, ...)."""


class NoModelError(MechscopeError, RuntimeError):
    """A view that runs the model, on a server started without one (or without the database's SAE)."""


class Live:
    """The model side of the app; every public method takes the lock."""

    def __init__(self, db: FeatureDB, model: HookedModel | None, sae: SAE | None, *, max_tokens: int = 256):
        self.db, self.model, self.max_tokens = db, model, max_tokens
        self.lock = threading.Lock()
        self._heads: str | None = None
        self.source: FeatureSource | None = None
        kind = db.meta.get("source", {}).get("kind")
        if model is not None:
            if kind == "neurons":
                self.source = feature_source(model, Neurons(int(db.meta["source"]["layer"])))
            elif sae is not None:
                self.source = feature_source(model, sae)
        self.sae = sae

    # ------------------------------------------------------------------ checks
    def need_model(self) -> HookedModel:
        if self.model is None:
            raise NoModelError(
                "this view runs the model, and the server was started without one: restart with "
                "`mechscope serve DB --model MODEL --sae SAE_DIR`"
            )
        return self.model

    def need_source(self) -> FeatureSource:
        self.need_model()
        if self.source is None:
            raise NoModelError(
                "this database holds SAE latents and the server was started without its SAE: "
                "restart with `mechscope serve DB --model MODEL --sae SAE_DIR`"
            )
        return self.source

    def tokens_of(self, text: str) -> list[str]:
        model = self.need_model()
        if not text.strip():
            raise WebInputError("the text is empty: type something")
        strs = model.to_str_tokens(text)
        limit = min(self.max_tokens, model.cfg.n_ctx)
        if len(strs) > limit:
            raise WebInputError(f"the text is {len(strs)} tokens long; this server takes at most {limit}")
        return strs

    def _stop(self, hook: str) -> int | None:
        """Run only the blocks up to the hook's (its activation is all a search needs)."""
        if hook not in self.model.hook_names:
            return None
        layer = parse(hook)[0]
        return layer + 1 if isinstance(layer, int) and 0 <= layer < self.model.cfg.n_layers - 1 else None

    # ------------------------------------------------------------------ views
    @torch.no_grad()
    def search(self, text: str, k: int = 5, n_top: int = 20) -> dict[str, Any]:
        """Which features fire on which tokens of ``text``: per token its top ``k``, and the ``n_top``
        features with the largest activation anywhere (with their activation on every token)."""
        src = self.need_source()
        with self.lock:
            strs = self.tokens_of(text)
            _, cache = self.model.run_with_cache(text, [src.hook], stop_at_layer=self._stop(src.hook))
            x = cache[src.hook][0]
            acts = src.encode(x.reshape(x.shape[0], -1)).float().cpu()  # [pos n_features]
        per_token = []
        for row in acts:
            v, i = row.topk(min(k, row.shape[0]))
            per_token.append([{"id": int(a), "act": float(b)} for a, b in zip(i, v, strict=True) if b > 0])
        best, where = acts.max(0)
        v, ids = best.topk(min(n_top, best.shape[0]))
        firing = [int(i) for i, b in zip(ids, v, strict=True) if b > 0]
        summaries = {s.id: s for s in self.db.summaries(firing)}
        top = [
            {
                "id": i,
                "max": float(best[i]),
                "token": int(where[i]),
                "density": summaries[i].density,
                "explanation": summaries[i].explanation,
                "acts": [round(float(a), 5) for a in acts[:, i]],
            }
            for i in firing
        ]
        return {"tokens": strs, "per_token": per_token, "top": top}

    def steer(self, prompt: str, steers: list[FeatureSteer], max_new_tokens: int) -> dict[str, Any]:
        src = self.need_source()
        with self.lock:
            n = len(self.tokens_of(prompt))
            if n + max_new_tokens > self.model.cfg.n_ctx:
                raise WebInputError(
                    f"{n} prompt tokens + {max_new_tokens} new exceed the model's context of {self.model.cfg.n_ctx}"
                )
            for s in steers:
                self.db.check_id(s.feature)
            out = generate_steered(self.model, src, prompt, steers, max_new_tokens=max_new_tokens)
        return {
            "prompt": prompt,
            "steered": out.steered,
            "unsteered": out.unsteered,
            "steers": [s.__dict__ for s in steers],
        }

    def attention(self, prompt: str, layer: int, heads: list[int] | None) -> str:
        from mechscope.viz.attention import attention_view

        model = self.need_model()
        c = model.cfg
        if not 0 <= layer < c.n_layers:
            raise WebInputError(f"layer {layer} does not exist: the model has layers 0..{c.n_layers - 1}")
        heads = list(range(c.n_heads)) if not heads else heads
        bad = [h for h in heads if not 0 <= h < c.n_heads]
        if bad:
            raise WebInputError(f"head {bad[0]} does not exist: the model has heads 0..{c.n_heads - 1}")
        with self.lock:
            self.tokens_of(prompt)
            return attention_view(model, prompt, [(layer, h) for h in heads]).to_html()

    def explain(self, prompt: str, answer: str, wrong: str | None, corrupt: str | None) -> str:
        from mechscope.interventions.explain import ExplainConfig, explain

        model = self.need_model()
        with self.lock:
            self.tokens_of(prompt)
            cfg = ExplainConfig(answer=answer, wrong=wrong or None, corrupt=corrupt or None)
            return explain(model, prompt, cfg, name=model.name or "").to_html()

    def heads(self) -> str:
        """The head-detector table (computed once: it does not depend on any input)."""
        from mechscope.circuits.head_detectors import copying_scores, head_scores
        from mechscope.viz.heads import render_head_scores_html

        model = self.need_model()
        with self.lock:
            if self._heads is None:
                scores = {k: v.tolist() for k, v in head_scores(model).items()}
                try:
                    scores["copying (OV eigenvalues)"] = copying_scores(model).tolist()
                except (RuntimeError, ValueError, NotImplementedError):  # e.g. a family without OV views
                    pass
                self._heads = render_head_scores_html(f"Head detectors · {model.name or ''}", scores, [])
            return self._heads
