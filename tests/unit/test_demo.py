"""``mechscope demo`` on tiny-llama: every artifact whole, numbers recomputed independently, re-runs reuse."""

from __future__ import annotations

import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mechscope as ms
import mechscope.saes.harvest  # noqa: F401  (loaded, so that it can be patched)
import mechscope.saes.train  # noqa: F401
from mechscope.cli.main import app
from mechscope.demo import STEPS, DemoConfig, DemoMismatchError, run_demo
from mechscope.features import FeatureDB
from mechscope.saes.formats import load_sae
from mechscope.saes.store import ActivationStore

# tiny-llama's tokenizer is byte-level: one-character answers, prompts of equal length.
TINY = dict(
    prompt="the cat sat on the mat",
    answer="t",
    wrong="s",
    corrupt="the cat sat on the hat",
    tokens=2048,
    heldout_tokens=512,
    context_length=32,
    expansion=4,
    k=8,
    train_tokens=4096,
    batch_size=256,
    top_n=6,
    eval_contexts=4,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    steps = []
    result = run_demo("tiny-llama", out, progress=steps.append, **TINY)
    return result, steps


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file()
    }


def _text_rows(store: ActivationStore, hook: str) -> torch.Tensor:
    rows = np.arange(store.n_tokens)
    keep = store.index_rows(rows)[:, 1] >= 0  # BOS / separators are left out, as in training
    return store.read(hook, rows[keep]).double()


def test_every_step_runs_once_in_order_and_reports(demo):
    result, steps = demo
    seen = [(s.name, s.status) for s in steps]
    load = [("load", "start"), ("load", "done")]  # inside the first step that needs the model
    assert seen == [("explain", "start"), *load, ("explain", "done")] + [
        (name, status) for name in STEPS[1:] for status in ("start", "done")
    ]
    assert result.reused == [] and [s.number for s in steps if s.status == "done"] == [0, 1, 2, 3, 4, 5, 6]
    assert set(result.seconds) == {"load", *STEPS, "total"}
    assert result.layer == 1 and result.hook == "blocks.1.hook_resid_post"  # tiny-llama: 2 layers, middle


def test_artifacts_are_whole(demo):
    result, _ = demo
    model = ms.load_model("tiny-llama")
    html = result.explain_html.read_text()
    assert html.startswith("<!doctype html>") and html.rstrip().endswith("</html>") and "cat sat" in html
    for path, n in ((result.store, TINY["tokens"]), (result.heldout_store, TINY["heldout_tokens"])):
        store = ActivationStore.open(path)
        store.verify()  # every shard's size and SHA-256
        assert store.complete and store.n_tokens == n and list(store.hooks) == [result.hook]
    sae = load_sae(result.sae_dir, model=model)
    assert (sae.cfg.kind, sae.cfg.k, sae.cfg.d_sae) == ("topk", 8, 4 * model.cfg.d_model)
    db = FeatureDB.open(result.features_db, model=model, sae=sae)
    # Every context starts with BOS, which is not text: the database counts the other tokens.
    text = int((ActivationStore.open(result.store).index_rows(np.arange(TINY["tokens"]))[:, 1] >= 0).sum())
    assert text == TINY["tokens"] - TINY["tokens"] // TINY["context_length"]
    assert db.n_features == sae.cfg.d_sae and db.meta["n_tokens"] == text
    pages = result.features["pages"]
    assert len(pages) == TINY["top_n"]
    index = result.dashboards_index.read_text()
    for i in pages:
        assert (
            result.dashboards_index.parent / f"feature-{i}.html"
        ).is_file() and f"feature-{i}.html" in index
    recorded = json.loads((result.out / "demo.json").read_text())
    assert set(recorded["steps"]) == set(STEPS) - {"index"}
    assert recorded["config"] == asdict(DemoConfig(**TINY))


def test_landing_page_links_resolve_and_shows_the_numbers(demo):
    result, _ = demo
    page = result.index_html.read_text()
    links = re.findall(r"href='([^']+)'", page)
    assert "explain.html" in links and "features/dashboards/index.html" in links
    assert all((result.out / link).is_file() for link in links)
    ev = result.evaluation
    assert f"{ev['heldout']['fvu']:.4f}" in page and f"{ev['train']['dead_fraction']:.2%}" in page
    assert f"{ev['downstream']['ce_loss_recovered']:.2%}" in page
    assert "<script" not in page and not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # self-contained


def test_evaluation_equals_plain_torch(demo):
    result, _ = demo
    model = ms.load_model("tiny-llama")
    sae = load_sae(result.sae_dir, model=model)
    for key, path in (("heldout", result.heldout_store), ("train", result.store)):
        x = _text_rows(ActivationStore.open(path), result.hook)
        with torch.no_grad():
            codes = sae.encode(x.float())
            recon = sae.decode(codes).double()
        got = result.evaluation[key]
        assert got["n_tokens"] == len(x)
        assert got["fvu"] == pytest.approx(
            float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-6
        )
        assert got["l0"] == pytest.approx(float((codes > 0).sum(-1).double().mean()), rel=1e-9)
        dead = float(((codes > 0).sum(0) == 0).double().mean())
        assert got["dead_fraction"] == pytest.approx(dead)
    held = ActivationStore.open(result.heldout_store)
    # CE with the SAE spliced in, by hand: replace the hook's output with the reconstruction, except at
    # the special tokens (BOS), which the SAE was not trained on.
    tokens = torch.stack([held.context_tokens(c) for c in range(TINY["eval_contexts"])])
    bos = (tokens == model.tokenizer.bos_token_id)[..., None]
    assert bos[:, 0].all()

    def ce(logits):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].double().flatten(0, 1), tokens[:, 1:].flatten()
        )

    with torch.no_grad():
        clean = ce(model(tokens))
        with model.hooks({result.hook: lambda a, hook: torch.where(bos, a, sae.decode(sae.encode(a)))}):
            spliced = ce(model(tokens))
    down = result.evaluation["downstream"]
    assert down["ce_loss_clean"] == pytest.approx(float(clean), rel=1e-5)
    assert down["ce_loss_sae"] == pytest.approx(float(spliced), rel=1e-5)


def test_rerun_reuses_everything_without_loading_the_model(demo, tmp_path, monkeypatch):
    result, _ = demo
    out = tmp_path / "copy"
    shutil.copytree(result.out, out)
    before = _files(out)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded although every step is done")

    monkeypatch.setattr(ms, "load_model", no_load)
    steps = []
    again = run_demo("tiny-llama", out, progress=steps.append, **TINY)
    assert again.reused == list(STEPS[:-1])
    assert {s.name for s in steps if s.status == "done"} == {"index"}
    after = _files(out)
    assert {k: v for k, v in after.items() if k != "index.html"} == {
        k: v for k, v in before.items() if k != "index.html"
    }
    assert again.evaluation == result.evaluation and again.features == result.features


def test_a_demo_made_by_an_earlier_version_is_refused_not_reused(demo, tmp_path):
    result, _ = demo
    out = tmp_path / "copy"
    shutil.copytree(result.out, out)
    record = json.loads((out / "demo.json").read_text())
    (out / "demo.json").write_text(json.dumps({**record, "version": record["version"] - 1}))
    with pytest.raises(DemoMismatchError, match="another version"):
        run_demo("tiny-llama", out, **TINY)


def test_a_lost_step_is_redone_alone_and_equals_the_first_run(demo, tmp_path, monkeypatch):
    result, _ = demo
    out = tmp_path / "copy"
    shutil.copytree(result.out, out)
    shutil.rmtree(out / "features")

    def refuse(*a, **k):
        raise AssertionError("a finished step ran again")

    # The modules themselves (mechscope.saes re-exports functions under the same names).
    monkeypatch.setattr(sys.modules["mechscope.saes.harvest"], "harvest", refuse)
    monkeypatch.setattr(sys.modules["mechscope.saes.train"], "train_sae", refuse)
    again = run_demo("tiny-llama", out, **TINY)
    assert again.reused == ["explain", "harvest", "train", "evaluate"]
    assert again.features["pages"] == result.features["pages"]
    a = FeatureDB.open(result.features_db).sql("SELECT * FROM features ORDER BY id")
    b = FeatureDB.open(again.features_db).sql("SELECT * FROM features ORDER BY id")
    assert a.equals(b)


def test_a_redone_training_redoes_what_is_made_from_it(demo, tmp_path, monkeypatch):
    result, _ = demo
    out = tmp_path / "own"  # not a copy: the SAE run records the store's path, so it must not move
    first = run_demo("tiny-llama", out, **TINY)
    shutil.rmtree(out / "sae" / "sae")  # the trained SAE lost; its run's last checkpoint is still there

    def refuse(*a, **k):
        raise AssertionError("the finished harvest ran again")

    monkeypatch.setattr(sys.modules["mechscope.saes.harvest"], "harvest", refuse)
    again = run_demo("tiny-llama", out, **TINY)
    assert again.reused == ["explain", "harvest"]  # evaluate and features are made from the SAE: redone

    def numbers(d):
        return {k: v for k, v in d.items() if k != "seconds"}

    assert numbers(again.evaluation) == numbers(first.evaluation)  # resumed from the final checkpoint
    assert numbers(again.features) == numbers(first.features) and numbers(first.train) == numbers(
        result.train
    )


def test_other_settings_in_the_same_directory_are_refused(demo):
    result, _ = demo
    with pytest.raises(DemoMismatchError, match=r"k \(8 there, 16 now\)"):
        run_demo("tiny-llama", result.out, **{**TINY, "k": 16})
    with pytest.raises(DemoMismatchError, match="model"):
        run_demo("tiny-gpt2", result.out, **TINY)


def test_a_layer_the_model_lacks_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"layer must be in 0 \.\. 1"):
        run_demo("tiny-llama", tmp_path / "bad", **{**TINY, "layer": 2})
    assert not (tmp_path / "bad" / "explain.html").exists()


def test_cli_json(tmp_path):
    out = tmp_path / "cli"
    args = [
        "demo",
        "tiny-llama",
        "--out",
        str(out),
        "--tokens",
        "2048",
        "--train-tokens",
        "2048",
        "--top-n",
        "3",
    ]
    args += [
        "--prompt",
        TINY["prompt"],
        "--answer",
        "t",
        "--wrong",
        "s",
        "--corrupt",
        TINY["corrupt"],
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert Path(data["index_html"]).is_file() and len(data["features"]["pages"]) == 3
    assert data["train"]["d_sae"] == 8 * 64 and data["layer"] == 1
    bad = CliRunner().invoke(app, [*args[:-1], "--k", "4"])  # same dir, other settings: a clean error
    assert bad.exit_code == 2 and "another k" in bad.output


def test_cli_serve_serves_the_demo_database(tmp_path, monkeypatch):
    """--serve hands the finished demo's database, model and SAE to the web app (uvicorn not started)."""
    import uvicorn
    from fastapi.testclient import TestClient

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda a, **kw: served.update(app=a, **kw))
    args = ["demo", "tiny-llama", "--out", str(tmp_path / "d"), "--tokens", "2048", "--train-tokens", "2048"]
    args += ["--top-n", "2", "--prompt", TINY["prompt"], "--answer", "t", "--wrong", "s"]
    result = CliRunner().invoke(app, [*args, "--corrupt", TINY["corrupt"], "--serve", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert served["port"] == 8123 and served["host"] == "127.0.0.1"
    web = TestClient(served["app"], base_url="http://127.0.0.1")
    assert web.get("/api/info").json()["live"]  # the model and the SAE were handed over
    search = web.get("/api/search", params={"text": "the cat sat"})
    assert search.status_code == 200, search.text
