"""Feature databases on tiny models, checked against brute force: every activation of every context
computed with plain ``run_with_cache`` (+ ``sae.encode``) and sorted; logit effects and neighbours
recomputed from the HF parameters; resume after an interruption equals an unbroken build."""

from __future__ import annotations

import json
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import mechscope as ms
from mechscope.data.contexts import SPECIAL, ContextConfig, context_stream
from mechscope.data.corpus import Corpus, CorpusError, pydoc_corpus
from mechscope.features import (
    SCHEMAS,
    FeatureConfig,
    FeatureDB,
    FeatureDBError,
    IncompatibleFeatureDBError,
    Neurons,
    UnknownFeatureError,
    build_features,
)
from mechscope.saes.arch import make_sae
from mechscope.saes.sae import SAEConfig
from mechscope.viz.dashboard import render_feature_html

HOOK = "blocks.0.hook_resid_post"


def small_corpus() -> Corpus:
    docs = [d for d in pydoc_corpus() if d.text.isascii()][:12]
    return Corpus.from_documents(docs, {"kind": "test", "name": "pydoc12"})


def config(**kw) -> FeatureConfig:
    base = dict(
        n_tokens=2000,
        contexts=ContextConfig(context_length=32, seed=1),
        batch_size=4,
        top_k=5,
        n_quantiles=4,
        quantile_samples=3,
        tokens_before=6,
        tokens_after=2,
        n_logits=7,
        n_neighbours=4,
        checkpoint_every=3,
        checkpoint_seconds=0.0,
    )
    return FeatureConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


@pytest.fixture(scope="module")
def gpt2() -> ms.HookedModel:
    return ms.load_model("tiny-gpt2")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return small_corpus()


@pytest.fixture(scope="module")
def sae(llama):
    return make_sae(SAEConfig(d_in=llama.cfg.d_model, d_sae=96, kind="relu", hook_name=HOOK, seed=3))


@pytest.fixture(scope="module")
def sae_db(llama, sae, corpus, tmp_path_factory):
    return build_features(llama, sae, corpus, config(), tmp_path_factory.mktemp("sae_db"))


@pytest.fixture(scope="module")
def neuron_db(gpt2, corpus, tmp_path_factory):
    return build_features(gpt2, Neurons(1), corpus, config(), tmp_path_factory.mktemp("neuron_db"))


@pytest.fixture(scope="module")
def sae_acts(llama, sae, corpus):
    return brute_force(llama, corpus, config(), HOOK, sae.encode)


@pytest.fixture(scope="module")
def neuron_acts(gpt2, corpus):
    return brute_force(gpt2, corpus, config(), "blocks.1.mlp.hook_post")


def brute_force(model, corpus, cfg, hook, encode=lambda x: x):
    """All activations ``[contexts pos features]`` and token ids, the same contexts as the build; BOS and
    separator positions zeroed (they are not text, and a database leaves them out)."""
    ctxs = list(
        islice(context_stream(model, corpus, cfg.contexts), cfg.n_tokens // cfg.contexts.context_length)
    )
    index = np.stack([c.index for c in ctxs])
    tokens = torch.from_numpy(index[..., 0]).long()
    with torch.no_grad():
        acts = torch.cat(
            [
                encode(model.run_with_cache(tokens[b : b + cfg.batch_size], [hook])[1][hook]).float()
                for b in range(0, len(tokens), cfg.batch_size)
            ]
        )
    special = torch.from_numpy(index[..., 1] == SPECIAL)
    assert special.any()  # the tiny models prepend BOS: the masking is exercised
    return acts.masked_fill(special[..., None], 0.0), tokens, index


def check_top_contexts(db: FeatureDB, acts, tokens, cfg) -> None:
    """Every feature's stored top contexts (one SQL query) against the sorted brute force."""
    L = acts.shape[1]
    ctx_val, ctx_pos = acts.max(dim=1)  # [contexts F]
    rows = db.sql(
        "SELECT feature, context, position, value, window_start, tokens, activations FROM examples "
        "WHERE kind = 'top' ORDER BY feature, rank"
    ).to_pylist()
    stored: dict[int, list[dict]] = {}
    for r in rows:
        stored.setdefault(r["feature"], []).append(r)
    for f in range(acts.shape[2]):
        firing = (ctx_val[:, f] > 0).nonzero().squeeze(1).tolist()
        want = sorted(firing, key=lambda c: (-float(ctx_val[c, f]), c))[: cfg.top_k]
        got = stored.get(f, [])
        assert [e["context"] for e in got] == want, f
        for e in got:
            c, p = e["context"], int(ctx_pos[e["context"], f])
            assert e["position"] == p and e["value"] == pytest.approx(float(ctx_val[c, f]), rel=1e-6)
            lo, hi = max(0, p - cfg.tokens_before), min(L, p + cfg.tokens_after + 1)
            assert e["window_start"] == lo and e["tokens"] == tokens[c, lo:hi].tolist()
            np.testing.assert_allclose(e["activations"], acts[c, lo:hi, f].numpy(), rtol=1e-6, atol=1e-7)
    for f in (0, acts.shape[2] // 2):  # the record API returns the same rows
        rec = db.feature(f)
        assert [(e.context, e.tokens) for e in rec.top] == [
            (e["context"], e["tokens"]) for e in stored.get(f, [])
        ]
        for e in rec.top:
            assert e.activations[e.max_index] == pytest.approx(e.value, rel=1e-6)
            assert e.strs == [db.vocab()[t] for t in e.tokens]


def check_statistics(db: FeatureDB, acts, index) -> None:
    text = (index[..., 1] != SPECIAL).reshape(-1)
    flat = acts.reshape(-1, acts.shape[-1]).double().numpy()[text]  # statistics over text tokens only
    assert db.meta["n_tokens"] == len(flat)
    table = db.sql("SELECT * FROM features ORDER BY id").to_pydict()
    firing = flat > 0
    np.testing.assert_array_equal(table["n_firing"], firing.sum(0))
    np.testing.assert_allclose(table["density"], firing.mean(0), rtol=1e-12)
    np.testing.assert_allclose(table["mean"], flat.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(table["max"], flat.max(0), rtol=1e-6)
    pos_mean = [flat[firing[:, f], f].mean() if firing[:, f].any() else np.nan for f in range(flat.shape[1])]
    np.testing.assert_allclose(np.array(table["mean_firing"], dtype=float), pos_mean, rtol=1e-5)
    edges = np.array(db.meta["hist_edges"])
    bins = np.concatenate([[0.0], edges, [np.inf]])
    for f in range(flat.shape[1]):
        want, _ = np.histogram(flat[firing[:, f], f], bins=bins)
        assert table["histogram"][f] == want.tolist(), f


def test_sae_top_contexts_equal_brute_force(sae_db, sae_acts):
    acts, tokens, _ = sae_acts
    check_top_contexts(sae_db, acts, tokens, config())


def test_sae_statistics_equal_brute_force(sae_db, sae_acts):
    acts, _, index = sae_acts
    check_statistics(sae_db, acts, index)


def test_neuron_database_equals_brute_force(neuron_db, neuron_acts, gpt2):
    acts, tokens, index = neuron_acts
    assert neuron_db.n_features == gpt2.cfg.d_mlp
    assert neuron_db.meta["source"] == {
        "kind": "neurons",
        "hook": "blocks.1.mlp.hook_post",
        "n_features": gpt2.cfg.d_mlp,
        "layer": 1,
    }
    check_top_contexts(neuron_db, acts, tokens, config())
    check_statistics(neuron_db, acts, index)


def test_provenance_points_at_the_text(sae_db, corpus, llama):
    docs = list(corpus)
    checked = 0
    for e in sae_db.feature(5).top + [x for q in sae_db.feature(5).quantiles for x in q]:
        if e.document < 0:
            continue
        doc = docs[e.document]
        assert e.source == doc.source
        token = e.tokens[e.max_index]
        assert doc.text[e.char_offset :].startswith(llama.tokenizer.decode([token]))
        checked += 1
    assert checked > 0


def test_quantile_samples_lie_in_their_intervals(sae_db, sae_acts):
    cfg = config()
    acts, tokens, _ = sae_acts
    ctx_val, ctx_pos = acts.max(dim=1)
    filled = available = 0
    for f in range(acts.shape[2]):
        rec = sae_db.feature(f)
        assert len(rec.quantiles) == cfg.n_quantiles
        per_interval = np.minimum(
            np.floor(ctx_val[:, f].numpy() / rec.max * cfg.n_quantiles), cfg.n_quantiles - 1
        )
        firing = ctx_val[:, f].numpy() > 0
        for j, samples in enumerate(rec.quantiles):
            lo, hi = rec.interval_edges(j)
            assert len(samples) <= cfg.quantile_samples
            assert len({s.context for s in samples}) == len(samples)
            assert [s.value for s in samples] == sorted((s.value for s in samples), reverse=True)
            for s in samples:
                assert s.interval == j and (
                    lo <= s.value < hi or (j == cfg.n_quantiles - 1 and s.value == hi)
                )
                assert s.value == pytest.approx(float(ctx_val[s.context, f]), rel=1e-6)
                assert s.position == int(ctx_pos[s.context, f])
                np.testing.assert_allclose(
                    s.activations,
                    acts[s.context, s.window_start : s.window_start + len(s.tokens), f],
                    rtol=1e-6,
                )
            n_true = int((firing & (per_interval == j)).sum())
            filled += len(samples)
            available += min(cfg.quantile_samples, n_true)
    # The intervals follow the running max (see stats.py): nearly every interval is as full as it can be.
    assert filled <= available and filled >= 0.9 * available


def test_sampling_is_seeded(llama, sae, corpus, sae_db, tmp_path):
    other = build_features(llama, sae, corpus, config(seed=7), tmp_path)
    q = "SELECT feature, interval, context FROM examples WHERE kind = 'quantile' ORDER BY ALL"
    top = "SELECT feature, context, activations FROM examples WHERE kind = 'top' ORDER BY ALL"
    assert sae_db.sql(q) != other.sql(q)
    assert sae_db.sql(top) == other.sql(top)


def test_logit_effects_equal_unembedding_of_the_normalised_direction(sae_db, llama, sae):
    hf = llama.hf_model
    u = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    logits = (u * hf.model.norm.weight.detach()) @ hf.get_output_embeddings().weight.detach().T  # RMSNorm
    for f in (0, 17, 95):
        rec = sae_db.feature(f)
        want = logits[f].topk(7)
        assert [t.token for t in rec.promoted] == want.indices.tolist()
        np.testing.assert_allclose([t.value for t in rec.promoted], want.values, rtol=1e-5)
        low = logits[f].topk(7, largest=False)
        assert [t.token for t in rec.suppressed] == low.indices.tolist()
        assert [t.str for t in rec.promoted] == [llama.tokenizer.decode([i]) for i in want.indices]


def test_neuron_logit_effects_centre_for_layernorm(neuron_db, gpt2):
    hf = gpt2.hf_model
    w_out = hf.transformer.h[1].mlp.c_proj.weight.detach()  # Conv1D: [d_mlp d_model]
    u = w_out / w_out.norm(dim=-1, keepdim=True)
    u = u - u.mean(-1, keepdim=True)
    logits = (u * hf.transformer.ln_f.weight.detach()) @ hf.get_output_embeddings().weight.detach().T
    for f in (0, 100, 255):
        rec = neuron_db.feature(f)
        want = logits[f].topk(7)
        assert [t.token for t in rec.promoted] == want.indices.tolist()
        np.testing.assert_allclose([t.value for t in rec.promoted], want.values, rtol=1e-5)


def test_neighbours_are_nearest_by_decoder_cosine(sae_db, sae):
    u = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    cos = u @ u.T
    cos.fill_diagonal_(-2)
    for f in (0, 50):
        want = cos[f].topk(4)
        got = sae_db.feature(f).neighbours
        assert [n.id for n in got] == want.indices.tolist()
        np.testing.assert_allclose([n.cosine for n in got], want.values, rtol=1e-5)


def snapshot(root: Path) -> dict:
    tables = {name: pq.read_table(root / f"{name}.parquet") for name in SCHEMAS}
    return {"meta": json.loads((root / "meta.json").read_text()), **tables}


def test_interrupted_build_resumes_to_the_same_database(llama, sae, corpus, sae_db, tmp_path):
    calls = []

    def interrupt(p):
        calls.append(p)
        if len(calls) == 8:  # after the checkpoint at batch 6
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_features(llama, sae, corpus, config(), tmp_path, progress=interrupt)
    assert (tmp_path / "checkpoint" / "progress.json").is_file() and not (tmp_path / "meta.json").exists()
    with pytest.raises(FeatureDBError, match="interrupted: re-run it"):
        FeatureDB.open(tmp_path)
    resumed = []
    build_features(llama, sae, corpus, config(), tmp_path, progress=resumed.append)
    assert resumed[0].skipped and resumed[0].tokens_done == 6 * 4 * 32
    assert len(resumed) == 1 + (16 - 6)  # 62 contexts = 16 batches, 6 restored
    assert not (tmp_path / "checkpoint").exists()
    assert snapshot(tmp_path) == snapshot(sae_db.path)


def test_rerun_of_a_finished_build_reopens_it_and_another_config_is_refused(llama, sae, corpus, sae_db):
    before = (sae_db.path / "features.parquet").stat().st_mtime_ns
    db = build_features(llama, sae, corpus, config(), sae_db.path)
    assert db.n_features == 96 and (sae_db.path / "features.parquet").stat().st_mtime_ns == before
    with pytest.raises(IncompatibleFeatureDBError, match="config.top_k"):
        build_features(llama, sae, corpus, config(top_k=6), sae_db.path)


def test_database_of_another_model_or_sae_is_refused(sae_db, neuron_db, llama, gpt2, sae):
    assert FeatureDB.open(sae_db.path, model=llama, sae=sae).n_features == 96
    with pytest.raises(IncompatibleFeatureDBError, match="fingerprints differ"):
        FeatureDB.open(sae_db.path, model=gpt2)
    other = make_sae(SAEConfig(d_in=llama.cfg.d_model, d_sae=96, kind="relu", hook_name=HOOK, seed=4))
    with pytest.raises(IncompatibleFeatureDBError, match="another SAE"):
        FeatureDB.open(sae_db.path, sae=other)
    with pytest.raises(IncompatibleFeatureDBError, match="neurons of blocks.1.mlp.hook_post, not SAE"):
        FeatureDB.open(neuron_db.path, sae=sae)


def test_bad_requests_fail_with_clear_errors(sae_db, llama, sae, corpus, tmp_path):
    for bad in (-1, 96, 10**9):
        with pytest.raises(UnknownFeatureError, match=r"has 96 features \(0..95\)"):
            sae_db.feature(bad)
    with pytest.raises(ValueError, match="order_by must be one of"):
        sae_db.features(order_by="id; DROP TABLE features")
    with pytest.raises(FeatureDBError, match="not a feature database"):
        FeatureDB.open(tmp_path)
    with pytest.raises(ValueError, match="out of range"):
        build_features(llama, Neurons(5), corpus, config(), tmp_path)
    with pytest.raises(CorpusError, match="yields no context"):
        build_features(llama, sae, Corpus.from_texts(["too short"]), config(), tmp_path / "empty")
    wrong = make_sae(SAEConfig(d_in=32, d_sae=8, kind="relu", hook_name=HOOK))
    with pytest.raises(ms.MechscopeError, match="32"):
        build_features(llama, wrong, corpus, config(), tmp_path / "wrong")


def test_build_from_an_activation_store_equals_the_corpus_build(llama, gpt2, sae, corpus, sae_db, tmp_path):
    from mechscope.saes.harvest import HarvestConfig, harvest
    from mechscope.saes.store import IncompatibleStoreError

    cfg = config()
    # Shards of 5 contexts: build batches of 4 straddle shard boundaries.
    hcfg = HarvestConfig(
        hooks=(HOOK,), n_tokens=cfg.n_tokens, contexts=cfg.contexts, batch_size=4, shard_tokens=160
    )
    store = harvest(llama, corpus, tmp_path / "store", hcfg)
    db = build_features(llama, sae, store, cfg, tmp_path / "db")
    assert db.meta["identity"]["store"] == store.identity and db.meta["corpus"] == sae_db.meta["corpus"]
    got, want = snapshot(db.path), snapshot(sae_db.path)
    for name in SCHEMAS:  # the same contexts, activations and sources: the same tables
        assert got[name] == want[name], name
    with pytest.raises(IncompatibleStoreError, match="weights differ"):
        build_features(gpt2, Neurons(0), store, cfg, tmp_path / "other-model")
    with pytest.raises(IncompatibleStoreError, match="not 'blocks.0.mlp.hook_post'"):
        build_features(llama, Neurons(0), store, cfg, tmp_path / "other-hook")


def test_feature_report_writes_the_top_pages(llama, sae, corpus, sae_db, tmp_path):
    from mechscope.features import feature_report
    from mechscope.saes.formats import save_sae

    run = tmp_path / "run"
    save_sae(sae, run / "sae")
    (run / "run.json").write_text("{}")  # what train_sae leaves beside sae/
    report = feature_report(llama, run, corpus, tmp_path / "report", cfg=config(), top_n=5, order_by="max")
    want = sae_db.sql("SELECT id FROM features WHERE n_firing > 0 ORDER BY max DESC, id LIMIT 5")
    assert report.features == want.column("id").to_pylist() and len(report.features) == 5
    assert report.index == tmp_path / "report" / "dashboards" / "index.html"
    pages = re.findall(r"href='feature-(\d+).html'", report.index.read_text())
    assert [int(p) for p in pages] == report.features  # listed in rank order
    for i in report.features:
        page = (report.index.parent / f"feature-{i}.html").read_text()
        want = render_feature_html(
            sae_db.feature(i), link=lambda j: f"feature-{j}.html" if j in report.features else None
        )
        assert page == want
    assert snapshot(report.db.path)["features"] == snapshot(sae_db.path)["features"]
    with pytest.raises(ValueError, match="order_by must be one of"):
        feature_report(llama, sae, corpus, tmp_path / "bad", order_by="max; DROP TABLE features")


def test_merging_features_in_chunks_changes_nothing(llama, sae, corpus, sae_db, tmp_path, monkeypatch):
    import mechscope.features.stats as stats

    monkeypatch.setattr(stats, "ROW_CHUNK", 7)  # 96 latents in 14 chunks, the last one short
    db = build_features(llama, sae, corpus, config(), tmp_path)
    assert snapshot(db.path) == snapshot(sae_db.path)
