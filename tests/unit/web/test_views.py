"""Every endpoint answers, and what it shows is what the library computes independently."""

from __future__ import annotations

import re
from html import unescape

import pyarrow.parquet as pq
import pytest

from mechscope.features import FeatureDB
from mechscope.viz.dashboard import render_feature_body
from tests.unit.web.fixtures import HOOK, N_FEATURES


@pytest.fixture(scope="module")
def db(tiny):
    with FeatureDB.open(tiny[2]) as d:
        yield d


def ids_in(html: str) -> list[int]:
    return [int(i) for i in re.findall(r"<td><a href=\"/feature/(\d+)\">", html)]


def test_index_pages_orders_and_filters_like_the_database(client, db):
    r = client.get("/", params={"order": "max", "desc": "true", "per_page": 10, "page": 2})
    assert r.status_code == 200
    want = [f.id for f in db.features(order_by="max", descending=True, limit=10, offset=10)]
    assert ids_in(r.text) == want and len(want) == 10
    assert 'href="/?' in r.text and "page 2 of 7" in r.text  # 64 features / 10 per page
    r = client.get("/", params={"min_density": 0.05, "max_density": 0.5, "per_page": 500})
    dens = {f.id for f in db.features(min_density=0.05, max_density=0.5, limit=500)}
    assert set(ids_in(r.text)) == dens and f"{len(dens)} matching" in r.text


def test_explanation_search_finds_the_feature_and_escapes_it(client):
    r = client.get("/", params={"q": "CATS dogs"})
    assert ids_in(r.text) == [3]
    assert "tokens about &lt;cats&gt; &amp; dogs" in r.text and "<cats>" not in r.text
    assert client.get("/api/features", params={"q": "python"}).json()["rows"][0]["id"] == 10


def test_feature_page_is_the_dashboard(client, db):
    r = client.get("/feature/3")
    assert r.status_code == 200
    assert render_feature_body(db.feature(3), link=lambda i: f"/feature/{i}") in r.text
    assert 'href="/steer?feature=3"' in r.text
    j = client.get("/api/feature/3").json()
    assert j["id"] == 3 and j["explanation"] == "tokens about <cats> & dogs"
    assert [e["context"] for e in j["top"]] == [e.context for e in db.feature(3).top]


def test_text_search_equals_running_the_sae_by_hand(client, tiny):
    model, sae, _ = tiny
    text = "def add(a, b):\n    return a + b"
    j = client.get("/api/search", params={"text": text, "k": 3}).json()
    _, cache = model.run_with_cache(text, [HOOK])
    acts = sae.encode(cache[HOOK])[0].detach()  # [pos d_sae]
    assert j["tokens"] == model.to_str_tokens(text)
    for p, row in enumerate(j["per_token"]):
        v, i = acts[p].topk(3)
        assert [f["id"] for f in row] == [int(x) for x, a in zip(i, v, strict=True) if a > 0]
        assert [f["act"] for f in row] == pytest.approx([float(a) for a in v if a > 0], rel=1e-5)
    best = acts.max(0).values
    assert [f["id"] for f in j["top"]] == [int(x) for x in best.topk(20).indices if best[x] > 0]
    first = j["top"][0]
    assert first["acts"] == pytest.approx(acts[:, first["id"]].tolist(), abs=1e-4)
    assert client.get("/search", params={"text": "hi"}).status_code == 200


def test_steer_endpoint_strength_zero_is_the_plain_generation(client, tiny):
    model = tiny[0]
    body = {"prompt": "I think that", "steers": [{"feature": 3, "strength": 0.0}], "max_new_tokens": 6}
    j = client.post("/api/steer", json=body).json()
    assert j["steered"] == j["unsteered"] == model.generate("I think that", max_new_tokens=6)
    body["steers"] = [
        {"feature": 3, "strength": 60.0, "mode": "add"},
        {"feature": 5, "strength": 2, "mode": "clamp"},
    ]
    j = client.post("/api/steer", json=body).json()
    assert j["steered"] != j["unsteered"]
    assert client.get("/steer", params={"feature": 7}).status_code == 200


def test_map_serves_the_cached_umap(client, tiny, db):
    r = client.get("/api/map")
    assert r.status_code == 200
    j = r.json()
    table = pq.read_table(tiny[2] / "map.parquet")
    assert j["n"] == N_FEATURES
    assert j["x"] == pytest.approx(table.column("x").to_pylist(), abs=1e-4)
    assert j["density"] == pytest.approx(
        db.sql("SELECT density FROM features ORDER BY id").column(0).to_pylist(), rel=1e-2
    )
    assert "map.js" in client.get("/map").text


def test_other_views(client, tiny):
    model = tiny[0]
    r = client.get("/attention/view", params={"prompt": "hello world", "layer": 1, "heads": "0, 1"})
    assert (
        r.status_code == 200
        and "<h3>L1H0</h3>" in r.text
        and "<h3>L1H1</h3>" in r.text
        and "L1H2" not in r.text
    )
    page = client.get("/attention", params={"prompt": "hello world", "layer": 1})
    assert 'src="/attention/view?prompt=hello+world&amp;layer=1"' in page.text
    r = client.get("/explain/view", params={"prompt": "The cat sat on the", "answer": " "})
    assert r.status_code == 200 and "logit lens" in unescape(r.text).lower()
    r = client.get("/heads/view")
    assert r.status_code == 200 and "induction" in r.text and f"L{model.cfg.n_layers - 1}" in r.text
    for path in ("/explain", "/heads", "/api/info", "/static/app.css", "/static/map.js"):
        assert client.get(path).status_code == 200, path


def test_live_views_say_how_to_start_without_a_model(bare):
    assert bare.get("/").status_code == 200 and bare.get("/feature/1").status_code == 200
    for method, path, kw in [
        ("get", "/api/search", {"params": {"text": "hi"}}),
        ("post", "/api/steer", {"json": {"prompt": "hi", "steers": [{"feature": 1, "strength": 1}]}}),
        ("get", "/attention/view", {"params": {"prompt": "hi"}}),
        ("get", "/heads/view", {}),
    ]:
        r = getattr(bare, method)(path, **kw)
        assert r.status_code == 409 and "--model" in r.json()["error"], path
    assert "restart with" in bare.get("/search").text
    assert bare.get("/api/map").status_code == 200  # the cached map needs no model
