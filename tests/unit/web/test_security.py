"""Loopback by default, a token otherwise, no file reads from request paths, inert pages."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mechscope.features import IncompatibleFeatureDBError
from mechscope.saes.arch import make_sae
from mechscope.saes.sae import SAEConfig
from mechscope.web import WebSecurityError, create_app
from mechscope.web.security import is_loopback
from tests.unit.web.fixtures import HOOK, N_FEATURES

TOKEN = "s3cret-token-123"


@pytest.fixture(scope="module")
def exposed(tiny) -> TestClient:
    return TestClient(create_app(tiny[2], host="0.0.0.0", token=TOKEN), base_url="http://192.0.2.7:8000")


def test_binding_beyond_loopback_needs_a_token(tiny):
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(WebSecurityError, match="--token"):
            create_app(tiny[2], host=host)
    with pytest.raises(WebSecurityError, match="8 characters"):
        create_app(tiny[2], host="0.0.0.0", token="short")
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "localhost.evil.com", ""))


@pytest.mark.parametrize("path", ["/", "/feature/1", "/api/features", "/api/map", "/static/app.css", "/nope"])
def test_every_request_needs_the_token(exposed, path):
    r = exposed.get(path)
    assert r.status_code == 401 and "token" in r.text
    assert exposed.get(path, headers={"X-Mechscope-Token": "wrong-token-xyz"}).status_code == 401


def test_the_token_is_accepted_from_header_bearer_query_and_cookie(exposed):
    assert exposed.get("/", headers={"X-Mechscope-Token": TOKEN}).status_code == 200
    assert exposed.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    r = exposed.get("/", params={"token": TOKEN})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert f"mechscope_token={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    fresh = TestClient(exposed.app, base_url="http://192.0.2.7:8000", cookies={"mechscope_token": TOKEN})
    assert fresh.get("/feature/2").status_code == 200


def test_without_a_token_only_loopback_hosts_are_answered(tiny):
    c = TestClient(create_app(tiny[2]), base_url="http://rebound.example.com")
    r = c.get("/")
    assert r.status_code == 403 and "localhost" in r.text
    for base in ("http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"):
        assert TestClient(c.app, base_url=base).get("/").status_code == 200, base


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../../../etc/passwd",
        "/static/..%2F..%2Fapp.py",
        "/static/%2e%2e/%2e%2e/app.py",
        "/static/app.py",
        "/static/__init__.py",
        "/static/templates/base.html",
        "/static//etc/passwd",
        "/feature/..%2F..%2Fmeta.json",
        "/meta.json",
        "/features.parquet",
    ],
)
def test_no_request_reads_a_file_it_names(client, path):
    r = client.get(path)
    assert r.status_code in (404, 422), path
    assert "root:" not in r.text and "import" not in r.text and "model_fingerprint" not in r.text


def test_security_headers(client):
    h = client.get("/").headers
    assert (
        "default-src 'self'" in h["content-security-policy"]
        and "frame-ancestors 'self'" in h["content-security-policy"]
    )
    assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"


def test_token_in_text_is_escaped_not_executed(client):
    r = client.get("/search", params={"text": "</textarea><script>alert(1)</script>"})
    assert "<script>alert(1)</script>" not in r.text and "&lt;script&gt;alert(1)" in r.text


def test_a_database_of_another_sae_is_refused(tiny):
    model, _, path = tiny
    other = make_sae(
        SAEConfig(d_in=model.cfg.d_model, d_sae=N_FEATURES, kind="relu", hook_name=HOOK, seed=99)
    )
    with pytest.raises(IncompatibleFeatureDBError, match="another SAE"):
        create_app(path, model, other)
    with pytest.raises(ValueError, match="needs its model"):
        create_app(path, None, other)
