"""A real server (uvicorn, in a thread) on the tiny database, and headless Debian chromium driven by Playwright.

Skipped, with the reason, only when chromium or Playwright is missing (``bash scripts/setup_browser.sh``
installs chromium), and never under CI (``CI`` set), where ``.ci/run`` installs both. Screenshots go to ``test-artifacts/browser/`` (gitignored); the path is printed.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.unit.web.fixtures import tiny_setup

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The base URL of the app served by uvicorn on a free loopback port."""
    import uvicorn

    from mechscope.web import create_app

    model, sae, path = tiny_setup(tmp_path_factory.mktemp("browser"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(path, model, sae), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline:
            raise RuntimeError("the test server did not start in 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _missing(reason: str):
    (pytest.fail if os.environ.get("CI") else pytest.skip)(reason)


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None:
        _missing("chromium is not installed: run `bash scripts/setup_browser.sh` (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install -e '.[dev]'")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        # --no-sandbox: chromium's sandbox cannot start as root in a container
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page; any JavaScript error (or CSP violation) on it fails the test."""
    ctx = browser.new_context(base_url=server, viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.ms_errors = errors  # a test that provokes an error on purpose checks and clears it
    yield pg
    ctx.close()
    assert not errors, f"errors in the page: {errors}"


def pytest_terminal_summary(terminalreporter):
    if ARTIFACTS.is_dir() and any(ARTIFACTS.glob("*.png")):
        terminalreporter.write_line(f"browser screenshots: {ARTIFACTS}")


def shot(page, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
