"""Dashboards: self-contained pages whose every shaded token, bar and link comes from the record; the
``mechscope features`` commands end to end on a tiny model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

import mechscope as ms
from mechscope.cli.main import app
from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import pydoc_corpus
from mechscope.features import FeatureDB, UnknownFeatureError, write_database
from mechscope.features.records import Example, FeatureRecord, Neighbour, TokenEffect
from mechscope.viz.dashboard import render_feature_html, render_histogram_svg, write_dashboards
from tests.unit.features.test_db import meta, synthetic_tables


def example(kind="top", interval=None, value=2.0, strs=("a", "<script>", "b\n")) -> Example:
    acts = [0.5, value, 0.0]
    return Example(
        kind, interval, 0, value, 7, 11, 10, [1, 2, 3], list(strs), acts, 4, "doc<4>.txt", 100, 420
    )


def record(**kw) -> FeatureRecord:
    base = dict(
        id=3,
        density=0.0125,
        n_firing=125,
        mean=0.01,
        mean_firing=0.8,
        max=2.0,
        histogram=[0, 0, 5, 0, 7, 0],
        hist_edges=[0.01, 0.1, 1.0, 10.0, 100.0],
        explanation="angle <brackets> & things",
        score=None,
        top=[example()],
        quantiles=[[example("quantile", 0, 0.4)], []],
        promoted=[TokenEffect(5, " the", 1.5)],
        suppressed=[TokenEffect(6, "<b>", -0.75)],
        neighbours=[Neighbour(9, 0.5, "nine"), Neighbour(12, 0.25, None)],
        title="tiny · blocks.0.hook_resid_post · 16 topk SAE latents",
    )
    return FeatureRecord(**{**base, **kw})


def test_page_is_self_contained_and_escapes_text():
    page = render_feature_html(record())
    assert page.startswith("<!doctype html>")
    for remote in ("http://", "https://", "<script", " src=", "<link"):
        assert remote not in page
    assert "&lt;script&gt;" in page and "angle &lt;brackets&gt; &amp; things" in page
    assert "doc&lt;4&gt;.txt" in page and "&lt;b&gt;" in page


def test_tokens_are_shaded_by_activation_with_values_on_hover():
    page = render_feature_html(record())
    spans = re.findall(r"<span( class='max')? style='([^']*)' title='([^']*)'>", page)
    top_spans = spans[:3]
    assert [t for _, _, t in top_spans] == [
        "&#x27;a&#x27;: 0.5",
        "&#x27;&lt;script&gt;&#x27;: 2",
        "&#x27;b\\n&#x27;: 0",
    ]
    assert [bool(m) for m, _, _ in top_spans] == [False, True, False]  # the max token is outlined
    alphas = [
        float(re.search(r"rgba\(255,120,0,([0-9.]+)\)", s).group(1)) if s else 0.0 for _, s, _ in top_spans
    ]
    assert alphas == pytest.approx([0.25 * 0.85, 0.85, 0.0], abs=1e-3)  # activation / max x full alpha


def test_histogram_draws_the_nonempty_span_of_bins():
    svg = render_histogram_svg([0, 0, 5, 0, 7, 0], [0.01, 0.1, 1.0, 10.0, 100.0])
    bars = re.findall(r"<rect [^>]*height='([0-9.]+)'[^>]*><title>([^<]*)</title>", svg)
    assert [t for _, t in bars] == ["[0.1, 1): 5", "[1, 10): 0", "[10, 100): 7"]
    assert float(bars[2][0]) > float(bars[0][0]) > float(bars[1][0]) == 0.0
    assert "never fires" in render_histogram_svg([0] * 6, [0.01, 0.1, 1.0, 10.0, 100.0])
    with pytest.raises(ValueError, match="need 5 edges"):
        render_histogram_svg([0] * 6, [1.0])


def test_neighbours_link_with_the_given_url_maker_and_notebook_fragment():
    page = render_feature_html(record(), link=lambda i: f"/feature/{i}")
    assert "href='/feature/9'>#9</a>" in page and "href='/feature/12'>#12</a>" in page
    fragment = record()._repr_html_()
    assert fragment.startswith("<style>") and "<html" not in fragment and "Feature #3" in fragment
    assert "interval 1: activation in [1, 2)" in fragment and "interval 0: activation in [0, 1)" in fragment


def test_write_dashboards_writes_index_and_pages(tmp_path):
    write_database(
        tmp_path / "db", synthetic_tables(np.random.default_rng(0), 20), {**meta(), "n_features": 20}
    )
    db = FeatureDB.open(tmp_path / "db")
    with pytest.raises(UnknownFeatureError):
        write_dashboards(db, tmp_path / "out", [1, 20])
    assert not (tmp_path / "out").exists()
    seen = []
    index = write_dashboards(db, tmp_path / "out", [4, 1], progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "feature-1.html",
        "feature-4.html",
        "index.html",
    ]
    html = index.read_text()
    assert re.findall(r"href='(feature-\d+.html)'", html) == [
        "feature-4.html",
        "feature-1.html",
    ]  # given order
    cells = re.findall(r"<td>([0-9.]+)%</td>", html)  # each row's density, from the database
    assert cells == [f"{100 * r.density:.3f}" for r in (db.feature(4), db.feature(1))]
    page = (tmp_path / "out" / "feature-4.html").read_text()
    assert page == render_feature_html(
        db.feature(4), link=lambda j: f"feature-{j}.html" if j in (1, 4) else None
    )
    # Every link of every page leads to a page that was written (neighbours beyond them are plain ids).
    neighbours = {n.id for i in (1, 4) for n in db.feature(i).neighbours}
    assert neighbours - {1, 4}, "no unwritten neighbour: the check below would be vacuous"
    for p in (tmp_path / "out").iterdir():
        for href in re.findall(r"href='([^']+)'", p.read_text()):
            assert (tmp_path / "out" / href).exists(), (p.name, href)


def test_cli_build_show_list_dashboards(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(d.text for d in pydoc_corpus() if d.text.isascii())[:6000])
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["features", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    out = str(tmp_path / "db")
    built = run(
        "build",
        "tiny-llama",
        "--neurons",
        "0",
        "--out",
        out,
        "--corpus",
        str(text),
        "--n-tokens",
        "640",
        "--context-length",
        "32",
        "--top-k",
        "4",
        "--json",
    )
    assert (
        built["features"] == 128
        and built["tokens"] == 640
        and built["source"] == "neurons at blocks.0.mlp.hook_post"
    )
    shown = run("show", out, "7", "--json", "--html", str(tmp_path / "f7.html"))
    db = FeatureDB.open(out)
    assert shown == json.loads(json.dumps(db.feature(7).to_dict()))
    assert len(shown["top"]) <= 4 and (tmp_path / "f7.html").read_text() == db.feature(7).to_html()
    listed = run("list", out, "--order-by", "density", "--limit", "3", "--json")
    assert [r["id"] for r in listed] == [
        r.id for r in db.features(order_by="density", descending=True, limit=3)
    ]
    pages = run("dashboards", out, "--out", str(tmp_path / "dash"), "--feature", "2", "--json")
    assert pages["pages"] == 1 and (tmp_path / "dash" / "feature-2.html").is_file()
    top = run("dashboards", out, "--out", str(tmp_path / "top"), "--top", "3", "--order-by", "max", "--json")
    want = db.sql("SELECT id FROM features WHERE n_firing > 0 ORDER BY max DESC, id LIMIT 3").column("id")
    pages = re.findall(r"href='feature-(\d+).html'", (tmp_path / "top" / "index.html").read_text())
    assert top["pages"] == 3 and [int(p) for p in pages] == want.to_pylist()
    bad = runner.invoke(app, ["features", "show", out, "128"])
    assert bad.exit_code == 2 and "feature 128 does not exist" in bad.output
    from mechscope.saes.harvest import HarvestConfig, harvest

    model = ms.load_model("tiny-llama")
    contexts = ContextConfig(context_length=32)
    harvest(
        model,
        str(text),
        tmp_path / "store",
        HarvestConfig(hooks=("blocks.0.mlp.hook_post",), n_tokens=640, contexts=contexts, batch_size=8),
    )
    from_store = run(
        "build",
        "tiny-llama",
        "--neurons",
        "0",
        "--out",
        str(tmp_path / "db2"),
        "--store",
        str(tmp_path / "store"),
        "--top-k",
        "4",
        "--json",
    )
    assert from_store["tokens"] == 640 and from_store["never_firing"] == built["never_firing"]
    assert FeatureDB.open(tmp_path / "db2").sql("SELECT * FROM examples ORDER BY ALL") == db.sql(
        "SELECT * FROM examples ORDER BY ALL"
    )  # the same contexts, read instead of computed
    both = runner.invoke(app, ["features", "build", "tiny-llama", "--out", out])
    assert both.exit_code == 2 and "exactly one of --sae PATH" in both.output
