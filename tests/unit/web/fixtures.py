"""A tiny model, SAE and feature database for the web tests (built in a few seconds), shared with tests/browser."""

from __future__ import annotations

from pathlib import Path

import mechscope as ms
from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import Corpus, pydoc_corpus
from mechscope.features import FeatureConfig, build_features
from mechscope.saes.arch import make_sae
from mechscope.saes.sae import SAEConfig

HOOK = "blocks.0.hook_resid_post"
N_FEATURES = 64


def tiny_setup(root: Path, *, with_map: bool = True):
    """``(model, sae, db_path)``: tiny-llama, a 64-latent ReLU SAE, its database (and its UMAP map)."""
    model = ms.load_model("tiny-llama")
    sae = make_sae(SAEConfig(d_in=model.cfg.d_model, d_sae=N_FEATURES, kind="relu", hook_name=HOOK, seed=3))
    docs = [d for d in pydoc_corpus() if d.text.isascii()][:8]
    corpus = Corpus.from_documents(docs, {"kind": "test", "name": "pydoc8"})
    cfg = FeatureConfig(
        n_tokens=1024,
        contexts=ContextConfig(context_length=32, seed=1),
        batch_size=8,
        top_k=4,
        n_quantiles=3,
        quantile_samples=2,
        tokens_before=6,
        tokens_after=2,
        n_logits=5,
        n_neighbours=4,
    )
    db = build_features(model, sae, corpus, cfg, root / "db")
    db.set_explanations({3: "tokens about <cats> & dogs", 10: "Python keywords"}, {3: 0.9, 10: 0.5})
    if with_map:
        from mechscope.features.umap_map import feature_map

        feature_map(db, model, sae)
    db.close()
    return model, sae, root / "db"
