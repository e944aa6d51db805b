"""Bad input is a 4xx whose body says what was wrong, never a 500 (and never a traceback)."""

from __future__ import annotations

import pytest

from tests.unit.web.fixtures import N_FEATURES

LONG = "x" * 5000
GETS = [
    ("/feature/64", 404, "does not exist"),
    ("/feature/-1", 404, "does not exist"),
    ("/feature/abc", 422, "fid"),
    ("/feature/1.5", 422, "fid"),
    ("/feature/99999999999999999999999", 404, "does not exist"),
    ("/api/feature/64", 404, f"{N_FEATURES} features"),
    ("/?page=0", 422, "page"),
    ("/?per_page=100000", 422, "per_page"),
    ("/?order=density;DROP TABLE features", 422, "order"),
    ("/?order=explanation", 422, "order"),
    ("/?min_density=-1", 422, "min_density"),
    ("/?max_density=2", 422, "max_density"),
    ("/?min_density=nan", 422, "min_density"),
    ("/?min_density=abc", 422, "min_density"),
    ("/?desc=maybe", 422, "desc"),
    (f"/?q={LONG}", 422, "q"),
    ("/?q=cats&page=1000", 400, "first 10,000 matches"),
    ("/api/search", 422, "text"),
    ("/api/search?text=", 422, "text"),
    ("/api/search?text=%20%20", 400, "empty"),
    (f"/api/search?text={LONG}", 422, "text"),
    ("/api/search?text=hi&k=0", 422, "k"),
    ("/api/search?text=hi&top=1000", 422, "top"),
    ("/api/search?text=" + "ab " * 400, 400, "at most"),
    ("/steer?feature=64", 404, "does not exist"),
    ("/steer?feature=-3", 422, "feature"),
    ("/steer?strength=1e9", 422, "strength"),
    ("/attention/view?prompt=hi&layer=7", 400, "layer 7"),
    ("/attention/view?prompt=hi&layer=-1", 422, "layer"),
    ("/attention/view?prompt=hi&heads=99", 400, "head 99"),
    ("/attention/view?prompt=hi&heads=0;alert(1)", 422, "heads"),
    ("/attention/view", 422, "prompt"),
    ("/explain/view?prompt=The%20cat&answer=%20mat%20and%20hat", 400, "not one"),
    ("/explain/view?prompt=The%20cat", 422, "answer"),
    ("/explain/view?prompt=The%20cat&answer=%20&corrupt=A%20much%20longer%20prompt", 400, "align"),
    ("/no/such/page", 404, "no such page"),
]


@pytest.mark.parametrize(("url", "status", "words"), GETS)
def test_bad_get_is_a_4xx_with_a_message(client, url, status, words):
    r = client.get(url)
    assert r.status_code == status, r.text[:300]
    assert words in r.text
    assert "Traceback" not in r.text


STEERS = [
    ({}, "prompt"),
    ({"prompt": "hi"}, "steers"),
    ({"prompt": "hi", "steers": []}, "steers"),
    ({"prompt": "", "steers": [{"feature": 1, "strength": 1}]}, "prompt"),
    ({"prompt": "hi", "steers": [{"feature": 64, "strength": 1}]}, "does not exist"),
    ({"prompt": "hi", "steers": [{"feature": -1, "strength": 1}]}, "feature"),
    ({"prompt": "hi", "steers": [{"feature": "one", "strength": 1}]}, "feature"),
    ({"prompt": "hi", "steers": [{"feature": 1, "strength": 1e6}]}, "strength"),
    ({"prompt": "hi", "steers": [{"feature": 1, "strength": "nan"}]}, "strength"),
    ({"prompt": "hi", "steers": [{"feature": 1, "strength": 1, "mode": "multiply"}]}, "mode"),
    ({"prompt": "hi", "steers": [{"feature": 1, "strength": 1}] * 9}, "steers"),
    ({"prompt": "hi", "steers": [{"feature": 1, "strength": 1}], "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "hi", "steers": [{"feature": 1, "strength": 1}], "max_new_tokens": 1000}, "max_new_tokens"),
    ({"prompt": "ab " * 30, "steers": [{"feature": 1, "strength": 1}], "max_new_tokens": 64}, "context"),
]


@pytest.mark.parametrize(("body", "words"), STEERS)
def test_bad_steer_is_a_4xx_with_a_message(client, body, words):
    r = client.post("/api/steer", json=body)
    assert 400 <= r.status_code < 500, r.text[:300]
    assert words in r.json()["error"]


def test_malformed_json_is_a_4xx(client):
    r = client.post("/api/steer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_pages_show_errors_as_html_and_apis_as_json(client):
    page = client.get("/feature/64")
    assert page.headers["content-type"].startswith("text/html") and 'id="error"' in page.text
    api = client.get("/api/feature/64")
    assert api.headers["content-type"] == "application/json" and "does not exist" in api.json()["error"]
