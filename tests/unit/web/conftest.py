"""One tiny model + SAE + feature database (with its map) per session, and clients on it."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mechscope.web import create_app
from tests.unit.web.fixtures import tiny_setup


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """``(model, sae, db_path)``."""
    return tiny_setup(tmp_path_factory.mktemp("web"))


@pytest.fixture(scope="session")
def client(tiny) -> TestClient:
    model, sae, path = tiny
    # raise_server_exceptions=False: an unhandled error shows up as the 500 a browser would get
    return TestClient(
        create_app(path, model, sae), base_url="http://127.0.0.1", raise_server_exceptions=False
    )


@pytest.fixture(scope="session")
def bare(tiny) -> TestClient:
    """The same database served without a model."""
    return TestClient(create_app(tiny[2]), base_url="http://127.0.0.1", raise_server_exceptions=False)
