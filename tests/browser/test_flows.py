"""The main flows in headless chromium: index -> feature, text search -> feature, steer, map -> click a dot,
the model views. Each saves a screenshot under test-artifacts/browser/."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.browser.conftest import shot


def test_open_the_index_then_a_feature(page):
    page.goto("/?order=max&desc=true")
    rows = page.locator("#features tbody tr")
    assert rows.count() == 50
    shot(page, "01-index")
    first = rows.first.locator("a")
    fid = first.inner_text().lstrip("#")
    first.click()
    page.wait_for_url(re.compile(rf"/feature/{fid}$"))
    assert page.locator("#dashboard h1").inner_text() == f"Feature #{fid}"
    assert page.locator("#dashboard .ctx span").count() > 0  # shaded top contexts
    assert page.locator("#dashboard svg rect").count() > 0  # the histogram
    shot(page, "02-feature")
    page.goto("/")
    page.fill("input[name=q]", "cats")
    page.click("form.filters button[type=submit]")
    assert page.locator("#features tbody tr").count() == 1
    assert "<cats>" in page.locator("#features tbody").inner_text()


def test_search_text_then_open_a_feature(page):
    page.goto("/search")
    page.fill("#text", "def add(a, b):\n    return a + b")
    page.wait_for_selector("#top-features tr.top-feature")
    n_tokens = page.locator("#tokens span").count()
    api = page.request.get("/api/search", params={"text": "def add(a, b):\n    return a + b"}).json()
    assert n_tokens == len(api["tokens"]) and page.locator("#tokens").inner_text() == "".join(api["tokens"])
    shaded = page.locator("#tokens span").evaluate_all("s => s.filter(x => x.style.background).length")
    assert shaded > 0
    page.locator("#tokens span").nth(3).click()
    assert page.locator("#tok-label").inner_text() == '"' + api["tokens"][3] + '"'
    assert page.locator("#token-features tr").count() == max(1, len(api["per_token"][3]))
    shot(page, "03-search")
    link = page.locator("#top-features tr.top-feature a").first
    fid = link.inner_text().lstrip("#")
    link.click()
    page.wait_for_url(re.compile(rf"/feature/{fid}$"))


def test_steer_side_by_side(page):
    page.goto("/feature/3")
    page.click("#steer-link")
    page.wait_for_url(re.compile(r"/steer\?feature=3$"))
    assert page.locator(".steer .feature").input_value() == "3"
    page.fill("#prompt", "I think that")
    page.fill(".steer .strength", "0")
    page.fill("#max-new", "8")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text(re.compile("^done"))
    same = page.locator("#steered").inner_text()
    assert same == page.locator("#unsteered").inner_text() and same.startswith("I think that")
    page.locator(".steer .strength-slider").fill("60")  # the slider drives the number
    assert page.locator(".steer .strength").input_value() == "60"
    page.click("#add-steer")
    page.locator(".steer .feature").nth(1).fill("5")
    page.locator(".steer .mode").nth(1).select_option("clamp")
    page.click("#generate")
    expect(page.locator("#status")).to_have_text("done")
    assert page.locator("#steered").inner_text() != page.locator("#unsteered").inner_text()
    shot(page, "04-steer")
    page.fill(".steer .strength >> nth=0", "5000")  # out of range: the server's message is shown
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "strength" in page.locator("#status").inner_text()
    assert page.ms_errors == [
        "Failed to load resource: the server responded with a status of 422 (Unprocessable Entity)"
    ]
    page.ms_errors.clear()


def test_map_zoom_pan_and_click_a_dot(page):
    page.goto("/map")
    page.wait_for_selector("#map[data-ready]")
    assert page.evaluate("window.msMap.n") == 64
    shot(page, "05-map")
    box = page.locator("#map").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)  # zoom in about the centre
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2 + 10, steps=4)
    page.mouse.up()
    # pick a dot that is still on the canvas after the zoom and pan, and click exactly on it
    target = page.evaluate(
        """() => { for (let i = 0; i < window.msMap.n; i++) { const p = window.msMap.screen(i);
             if (p[0] > 20 && p[1] > 20 && p[0] < 880 && p[1] < 580) return [i, p[0], p[1]]; } return null; }"""
    )
    assert target is not None
    i, x, y = target
    page.mouse.move(box["x"] + x, box["y"] + y)
    assert page.locator("#tip").inner_text().startswith("#")
    shot(page, "06-map-zoomed")
    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_url(re.compile(r"/feature/\d+$"))
    opened = int(page.url.rsplit("/", 1)[1])
    # the nearest dot to the click opens: the target, or one drawn at the same spot
    page.go_back()
    page.wait_for_selector("#map[data-ready]")
    assert opened == i or page.evaluate(
        f"(() => {{ const a = window.msMap.screen({i}), b = window.msMap.screen({opened}); "
        "return Math.hypot(a[0]-b[0], a[1]-b[1]) < 8; }})()"
    )


def test_model_views(page):
    page.goto("/attention?prompt=hello%20world&layer=1&heads=0")
    frame = page.frame_locator("iframe.view")
    frame.locator("h3").first.wait_for()
    assert frame.locator("h3").first.inner_text() == "L1H0"
    frame.locator(".ms-strip span").nth(5).hover()
    assert "attends to" in frame.locator(".ms-read").first.inner_text()
    shot(page, "07-attention")
    page.goto("/heads")
    page.frame_locator("iframe.view").locator("h3", has_text="induction").wait_for()
    shot(page, "08-heads")
    page.goto("/explain?prompt=The%20cat%20sat%20on%20the&answer=%20")
    page.frame_locator("iframe.view").locator("h2").first.wait_for()
    shot(page, "09-explain")
