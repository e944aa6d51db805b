"""A Neuroscope-style database of SmolLM2's layer-3 neurons over a few thousand tokens of the default
corpus, checked against plain ``run_with_cache`` and the HF weights."""

from __future__ import annotations

import re
from itertools import islice

import numpy as np
import pytest
import torch

from mechscope.data.contexts import ContextConfig, context_stream
from mechscope.data.corpus import default_corpus
from mechscope.features import FeatureConfig, Neurons, build_features, top_features
from mechscope.viz.dashboard import write_dashboards

pytestmark = pytest.mark.slow
LAYER, HOOK = 3, "blocks.3.mlp.hook_post"
CFG = FeatureConfig(n_tokens=2048, contexts=ContextConfig(context_length=64), batch_size=8, top_k=8)


@pytest.fixture(scope="module")
def db(smollm2, tmp_path_factory):
    return build_features(smollm2, Neurons(LAYER), "default", CFG, tmp_path_factory.mktemp("neurons"))


def test_database_facts(db, smollm2):
    assert db.n_features == smollm2.cfg.d_mlp == 1536
    assert db.meta["n_tokens"] == 2048 and db.meta["corpus"]["name"] == "default"
    dens = db.sql("SELECT min(density) AS lo, max(density) AS hi, count(*) AS n FROM features").to_pylist()[0]
    assert (
        dens["n"] == 1536 and 0 < dens["lo"] <= dens["hi"] < 1
    )  # SiLU-gated neurons: fire on part of the text


@pytest.fixture(scope="module")
def brute(smollm2):
    """Every context's layer-3 neuron activations ``[contexts pos d_mlp]`` by plain ``run_with_cache``."""
    ctxs = list(islice(context_stream(smollm2, default_corpus(), CFG.contexts), 2048 // 64))
    tokens = torch.from_numpy(np.stack([c.index[:, 0] for c in ctxs])).long()
    with torch.no_grad():
        run = lambda ids: smollm2.run_with_cache(ids, [HOOK], stop_at_layer=LAYER + 1)[1][HOOK]  # noqa: E731
        acts = torch.cat([run(tokens[b : b + 8]) for b in range(0, len(tokens), 8)])
    return acts.float(), tokens


def test_top_contexts_equal_run_with_cache(db, brute):
    acts, tokens = brute
    ctx_val, ctx_pos = acts.max(dim=1)
    docs = list(default_corpus())
    for n in range(0, 1536, 97):
        rec = db.feature(n)
        firing = (ctx_val[:, n] > 0).nonzero().squeeze(1).tolist()
        want = sorted(firing, key=lambda c: (-float(ctx_val[c, n]), c))[: CFG.top_k]
        assert [e.context for e in rec.top] == want
        for e in rec.top:
            assert e.value == pytest.approx(float(ctx_val[e.context, n]), rel=1e-5)
            assert e.tokens[e.max_index] == int(tokens[e.context, ctx_pos[e.context, n]])
            if e.document >= 0:  # the max token is where the index says it is in the text
                assert docs[e.document].text[e.char_offset :].startswith(e.strs[e.max_index].lstrip("Ġ"))


def test_statistics_and_quantile_samples_equal_run_with_cache(db, brute):
    acts, _ = brute
    flat = acts.reshape(-1, acts.shape[-1]).double()
    table = db.sql("SELECT n_firing, mean, max FROM features ORDER BY id").to_pydict()
    np.testing.assert_array_equal(table["n_firing"], (flat > 0).sum(0).numpy())
    np.testing.assert_allclose(table["max"], flat.max(0).values.numpy(), rtol=1e-5)
    np.testing.assert_allclose(table["mean"], flat.mean(0).numpy(), rtol=1e-4, atol=1e-7)
    ctx_val = acts.max(dim=1).values
    for n in (5, 600, 1200):
        rec = db.feature(n)
        for j, samples in enumerate(rec.quantiles):
            lo, hi = rec.interval_edges(j)
            for s in samples:  # each sample is a real context whose activation lies in its interval
                assert s.value == pytest.approx(float(ctx_val[s.context, n]), rel=1e-5)
                assert lo <= s.value <= hi


def test_dashboards_of_the_top_neurons(db, tmp_path):
    ids = top_features(db, 3, "max")
    index = write_dashboards(db, tmp_path, ids)
    assert [int(i) for i in re.findall(r"href='feature-(\d+).html'", index.read_text())] == ids
    for i in ids:
        page = (tmp_path / f"feature-{i}.html").read_text()
        rec = db.feature(i)
        assert f"Feature #{i}" in page and page.count("class='max'") == len(rec.top) + sum(
            map(len, rec.quantiles)
        )


def test_logit_effects_equal_the_hf_weights(db, smollm2):
    hf = smollm2.hf_model
    w_out = hf.model.layers[LAYER].mlp.down_proj.weight.detach().T.float()  # [d_mlp d_model]
    u = w_out / w_out.norm(dim=-1, keepdim=True)
    logits = (u * hf.model.norm.weight.detach().float()) @ hf.lm_head.weight.detach().float().T
    for n in (0, 700, 1535):
        rec = db.feature(n)
        want = logits[n].topk(10)
        assert [t.token for t in rec.promoted] == want.indices.tolist()
        np.testing.assert_allclose([t.value for t in rec.promoted], want.values, rtol=1e-4)
        assert [t.str for t in rec.promoted] == [smollm2.tokenizer.decode([i]) for i in want.indices]
