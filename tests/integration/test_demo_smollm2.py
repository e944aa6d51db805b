"""The demo loop on SmolLM2 at a small size (no patching sweeps): the IOI answer wins, the SAE reconstructs.

The full-size run (``mechscope demo``, a few minutes) is the README's main job; this checks the same
path on the real model in well under a minute and a half.
"""

from __future__ import annotations

import numpy as np
import pytest

from mechscope.demo import run_demo
from mechscope.features import FeatureDB
from mechscope.saes.formats import load_sae
from mechscope.saes.store import ActivationStore

pytestmark = pytest.mark.slow


def test_demo_on_smollm2(smollm2, tmp_path, monkeypatch):
    import mechscope as ms

    monkeypatch.setattr(ms, "load_model", lambda name: smollm2)  # the session's copy, already loaded
    result = run_demo(
        "smollm2-135m",
        tmp_path / "demo",
        corrupt=None,  # the patching sweeps are the explain tests' business; they take a minute
        tokens=4096,
        heldout_tokens=1024,
        train_tokens=1 << 14,
        batch_size=512,
        top_n=5,
        eval_contexts=2,
    )
    assert result.layer == 15 and result.hook == "blocks.15.hook_resid_post"
    top = result.explain["predictions"][0][0]
    assert top == " Mary" and result.explain["metric"] > 0  # logit(Mary) - logit(John), the IOI answer
    held, down = result.evaluation["heldout"], result.evaluation["downstream"]
    assert held["fvu"] < 0.5 and held["l0"] == pytest.approx(32, abs=0.5)
    assert down["ce_loss_clean"] < down["ce_loss_sae"] < down["ce_loss_zero"]
    assert 0 < down["ce_loss_recovered"] <= 1
    db = FeatureDB.open(result.features_db, model=smollm2, sae=load_sae(result.sae_dir, model=smollm2))
    # SmolLM2 prepends no BOS, the demo does: position 0, the attention sink, is left out everywhere.
    store = ActivationStore.open(result.store)
    first = store.index_rows(np.arange(0, 4096, store.context_length))
    assert (first[:, 0] == smollm2.tokenizer.bos_token_id).all() and (first[:, 1] < 0).all()
    assert db.n_features == 8 * 576 and db.meta["n_tokens"] == 4096 - 4096 // store.context_length
    assert len(result.features["pages"]) == 5 and result.index_html.is_file()

    # The web app on the demo's database (what `mechscope demo --serve` opens), against direct computations.
    import torch
    from fastapi.testclient import TestClient

    from mechscope.web import create_app

    sae = load_sae(result.sae_dir, model=smollm2)
    web = TestClient(create_app(result.features_db, smollm2, sae), base_url="http://127.0.0.1")
    assert web.get("/api/info").json()["live"]
    text = "To be, or not to be, that is the question"
    found = web.get("/api/search", params={"text": text, "k": 3}).json()
    _, cache = smollm2.run_with_cache(text, names=[result.hook])
    acts = sae.encode(cache[result.hook][0]).float()
    assert len(found["per_token"]) == acts.shape[0]
    for row, got in zip(acts, found["per_token"], strict=True):
        top = row.topk(len(got))
        assert [g["id"] for g in got] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([g["act"] for g in got]), top.values, atol=1e-4, rtol=1e-4)
    fid = found["top"][0]["id"]
    assert web.get(f"/feature/{fid}").status_code == 200
    steer = {
        "prompt": "The weather today is",
        "steers": [{"feature": fid, "strength": 0.0}],
        "max_new_tokens": 8,
    }
    out = web.post("/api/steer", json=steer).json()
    assert out["steered"] == out["unsteered"]  # strength 0 adds nothing
    steer["steers"][0]["strength"] = 200.0
    assert web.post("/api/steer", json=steer).json()["steered"] != out["unsteered"]
