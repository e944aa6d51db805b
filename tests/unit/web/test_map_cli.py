"""The UMAP map against umap-learn run directly; its cache; the serve / features steer / features map CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.cli.web_commands import parse_steer
from mechscope.features import FeatureDB, FeatureDBError
from mechscope.features.steer import FeatureSteer, FeatureSteerError
from mechscope.features.umap_map import MAP_FILE, feature_map, load_map
from mechscope.saes.formats.native import save

runner = CliRunner()


@pytest.fixture(scope="module")
def sae_dir(tiny, tmp_path_factory):
    return save(tiny[1], tmp_path_factory.mktemp("sae") / "sae")


@pytest.mark.filterwarnings("ignore:n_jobs value")
def test_map_is_umap_of_the_unit_decoder_rows(tiny):
    import umap

    model, sae, path = tiny
    with FeatureDB.open(path) as db:
        got = load_map(db)
    w = (sae.W_dec / sae.output_scale).detach().float().numpy()
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    want = umap.UMAP(
        n_components=2, n_neighbors=15, min_dist=0.1, metric="cosine", random_state=0
    ).fit_transform(w)
    np.testing.assert_allclose(np.c_[got.column("x"), got.column("y")], want, rtol=1e-4, atol=1e-4)
    assert got.column("id").to_pylist() == list(range(sae.cfg.d_sae))


def test_the_map_is_computed_once_and_refused_in_another_database(tiny, tmp_path):
    model, sae, path = tiny
    mtime = (path / MAP_FILE).stat().st_mtime_ns
    with FeatureDB.open(path) as db:
        feature_map(db, model, sae)
    assert (path / MAP_FILE).stat().st_mtime_ns == mtime  # cached, not recomputed
    copy = tmp_path / "db"
    shutil.copytree(path, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["source"]["sae_sha256"] = "0" * 64  # now "another SAE's" database holding this map
    (copy / "meta.json").write_text(json.dumps(meta))
    with FeatureDB.open(copy) as db, pytest.raises(FeatureDBError, match="other features"):
        load_map(db)
    assert pq.read_table(copy / MAP_FILE).num_rows == sae.cfg.d_sae


def test_parse_steer():
    assert parse_steer("12:8") == FeatureSteer(12, 8.0, "add")
    assert parse_steer("40:0:clamp") == FeatureSteer(40, 0.0, "clamp")
    for bad in ("12", "a:1", "1:x", "1:2:3:4", "1:2:mul", "1:inf"):
        with pytest.raises(FeatureSteerError):
            parse_steer(bad)


def test_cli_features_steer(tiny, sae_dir):
    model = tiny[0]
    r = runner.invoke(
        app,
        [
            "features",
            "steer",
            "tiny-llama",
            "I think that",
            "--sae",
            str(sae_dir),
            "-f",
            "3:0",
            "--max-new-tokens",
            "5",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["steered"] == out["unsteered"] == model.generate("I think that", max_new_tokens=5)
    r = runner.invoke(app, ["features", "steer", "tiny-llama", "hi", "--sae", str(sae_dir), "-f", "64:1"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["features", "steer", "tiny-llama", "hi", "--sae", str(sae_dir), "-f", "1:1:mul"])
    assert r.exit_code == 2 and "mode" in r.output


def test_cli_serve_refuses_an_exposed_bind_and_a_wrong_database(tiny, tmp_path):
    r = runner.invoke(app, ["serve", str(tiny[2]), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--token" in r.output
    r = runner.invoke(app, ["serve", str(tmp_path)])
    assert r.exit_code == 2 and "not a feature database" in r.output


def test_cli_features_map(tiny, sae_dir):
    r = runner.invoke(app, ["features", "map", str(tiny[2]), "--model", "tiny-llama", "--sae", str(sae_dir)])
    assert r.exit_code == 0, r.output
    assert "64 features mapped" in r.output
