"""Harvesting on tiny models: stored rows equal run_with_cache, early exit, resume after SIGKILL and
a full disk, refusals before any work, the index back to the text, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import mechscope as ms
from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import Corpus, CorpusError, pydoc_corpus
from mechscope.models.errors import ContextTooLongError, UnknownHookError
from mechscope.saes import store as store_mod
from mechscope.saes.harvest import HarvestConfig, harvest, plan_hooks
from mechscope.saes.store import ActivationStore, IncompatibleStoreError, StoreError


def small_corpus() -> Corpus:
    """The first 12 ASCII pydoc topics (byte tokens on the tiny models: one per character)."""
    docs = [d for d in pydoc_corpus() if d.text.isascii()][:12]
    return Corpus.from_documents(docs, {"kind": "test", "name": "pydoc12"})


def config(hooks=("blocks.0.hook_resid_post",), **kw) -> HarvestConfig:
    ctx = kw.pop("contexts", ContextConfig(context_length=32, seed=1))
    return HarvestConfig(
        hooks=tuple(hooks),
        n_tokens=kw.pop("n_tokens", 1600),
        contexts=ctx,
        **{"batch_size": 4, "shard_tokens": 256, **kw},
    )


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return small_corpus()


def _hooks(model: ms.HookedModel) -> list[str]:
    hooks = ["hook_embed", "blocks.0.attn.hook_q", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    return hooks + (["blocks.0.mlp.hook_post"] if model.cfg.has_mlp else [])


def _check_against_run_with_cache(model: ms.HookedModel, store: ActivationStore, hooks: list[str]) -> None:
    for i in range(store.n_shards):
        first = store.manifest["shards"][i]["first_context"]
        n_ctx = store.manifest["shards"][i]["contexts"]
        ids = torch.stack([store.context_tokens(first + c) for c in range(n_ctx)])
        # The reference: plain run_with_cache of the whole model (no early exit), the same batches.
        refs = [model.run_with_cache(ids[b : b + 4], hooks)[1] for b in range(0, n_ctx, 4)]
        for h in hooks:
            ref = torch.cat([r[h].flatten(0, 1).flatten(1) for r in refs]).to(store.dtype)
            assert store.hooks[h] == ref.shape[1]
            assert torch.equal(store.shard(h, i), ref), (h, i)


def test_stored_rows_equal_run_with_cache(tiny, corpus, tmp_path):
    hooks = _hooks(tiny)
    store = harvest(tiny, corpus, tmp_path, config(hooks, n_tokens=300))
    assert store.n_tokens == 9 * 32 and store.n_shards == 2 and list(store.hooks) == hooks
    _check_against_run_with_cache(tiny, store, hooks)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_rows_are_the_rounded_reference(llama, corpus, tmp_path, dtype):
    hooks = _hooks(llama)
    store = harvest(llama, corpus, tmp_path, config(hooks, n_tokens=300, dtype=dtype))
    assert store.shard(hooks[0], 0).dtype == getattr(torch, dtype)
    _check_against_run_with_cache(llama, store, hooks)


def test_the_forward_stops_after_the_deepest_hook(llama, corpus, tmp_path):
    ran = []  # forward (post) hooks fire only when a module's forward has run to its end
    handles = [
        llama.layer(0).register_forward_hook(lambda *a: ran.append("block0")),
        llama.layer(1).register_forward_hook(lambda *a: ran.append("block1")),
        llama.module(llama.adapter.unembed).register_forward_hook(lambda *a: ran.append("unembed")),
    ]
    try:
        harvest(llama, corpus, tmp_path, config(["blocks.0.hook_mlp_out", "hook_embed"]))
    finally:
        for h in handles:
            h.remove()
    assert set(ran) == {"block0"}
    assert plan_hooks(llama, ["blocks.1.hook_resid_post"]).stop_at_layer == 2
    assert plan_hooks(llama, ["hook_embed"]).stop_at_layer == 0
    assert plan_hooks(llama, ["blocks.0.hook_resid_pre", "ln_final.hook_normalized"]).stop_at_layer is None


def test_bad_requests_fail_before_any_work(llama, corpus, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(UnknownHookError, match="blocks.0.hook_resid_pots"):
        harvest(llama, corpus, out, config(["blocks.0.hook_resid_pots"]))
    with pytest.raises(ValueError, match="not one vector per token; harvest attn.hook_z"):
        harvest(llama, corpus, out, config(["blocks.0.attn.hook_pattern"]))
    with pytest.raises(ContextTooLongError, match="context window of 128"):
        harvest(llama, corpus, out, config(contexts=ContextConfig(context_length=256), n_tokens=1000))
    for empty in ([], ["", "too short"]):
        with pytest.raises(CorpusError, match="yields no context of 32 tokens: it is empty or too short"):
            harvest(llama, Corpus.from_texts(empty), out, config())
    assert not out.exists()
    with pytest.raises(ValueError, match="hooks is empty"):
        HarvestConfig(hooks=())
    with pytest.raises(ValueError, match="dtype must be one of"):
        config(dtype="int8")
    with pytest.raises(ValueError, match="less than one context"):
        config(n_tokens=10)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hooks": ["blocks.1.hook_resid_post"]}, "hooks"),
        ({"dtype": "float16"}, "dtype"),
        ({"contexts": ContextConfig(context_length=16, seed=1)}, "context_length"),
        ({"contexts": ContextConfig(context_length=32, seed=2)}, "seed"),
        ({"shard_tokens": 512}, "shard_contexts"),
        ({"corpus": "other"}, "corpus"),
        ({"model": "tiny-gpt2"}, "model"),
    ],
)
def test_a_store_built_differently_is_refused(llama, corpus, tmp_path, change, field):
    harvest(llama, corpus, tmp_path, config(n_tokens=300))
    change = dict(change)
    model = ms.load_model(change.pop("model")) if "model" in change else llama
    text = Corpus.from_texts(["another corpus " * 200]) if change.pop("corpus", None) else corpus
    with pytest.raises(IncompatibleStoreError, match=rf"built differently(?s:.*)\n  {field}: store has"):
        harvest(model, text, tmp_path, config(n_tokens=300, **change))


def test_the_index_maps_rows_back_to_the_text(llama, corpus, tmp_path):
    store = harvest(llama, corpus, tmp_path, config(n_tokens=1000))
    docs = list(corpus)
    rng = np.random.default_rng(0)
    for row in rng.choice(store.n_tokens, 60, replace=False).tolist():
        loc = store.locate(row)
        token = store.tokens([row]).item()
        if loc.document == -1:
            assert token == store.identity["separator"]
            continue
        doc = docs[loc.document]
        assert loc.source == doc.source
        assert doc.text[loc.char_offset] == llama.tokenizer.decode([token])  # byte tokens on ASCII text
        assert list(doc.text.encode())[loc.token_offset] == token
        before, tok, after = store.snippet(row, before=5, after=3)
        assert tok == doc.text[loc.char_offset]
        assert doc.text[: loc.char_offset].endswith(before.split(llama.tokenizer.eos_token)[-1])


def test_more_tokens_extend_the_store_exactly(llama, corpus, tmp_path):
    harvest(llama, corpus, tmp_path / "grown", config(n_tokens=600))  # last shard partial
    harvest(llama, corpus, tmp_path / "grown", config(n_tokens=1600))
    harvest(llama, corpus, tmp_path / "fresh", config(n_tokens=1600))
    assert snapshot(tmp_path / "grown") == snapshot(tmp_path / "fresh")
    short = harvest(llama, Corpus.from_texts(["x" * 100]), tmp_path / "short", config(n_tokens=1000))
    assert short.complete and short.n_tokens == 96  # the corpus ran out: 3 contexts


def test_disk_full_stops_cleanly_and_resumes_identically(llama, corpus, tmp_path, monkeypatch):
    real, calls = store_mod._write_file, [0]

    def write(path, chunks):
        calls[0] += 1
        if calls[0] == 13:  # in the middle of a shard, after some shards are complete
            raise OSError(28, "No space left on device")
        return real(path, chunks)

    monkeypatch.setattr(store_mod, "_write_file", write)
    with pytest.raises(StoreError, match="disk full"):
        harvest(llama, corpus, tmp_path / "full", config())
    partial = ActivationStore.open(tmp_path / "full", allow_incomplete=True)
    assert 0 < partial.n_shards < 7 and not partial.complete
    partial.verify()
    assert not [p for p in (tmp_path / "full").rglob("*tmp*")]
    monkeypatch.undo()
    harvest(llama, corpus, tmp_path / "full", config())
    harvest(llama, corpus, tmp_path / "clean", config())
    assert snapshot(tmp_path / "full") == snapshot(tmp_path / "clean")


def test_verify_existing_recomputes_a_corrupt_shard(llama, corpus, tmp_path):
    harvest(llama, corpus, tmp_path / "s", config())
    clean = snapshot(tmp_path / "s")
    path = tmp_path / "s" / "shards" / "00003" / "blocks.0.hook_resid_post.npy"
    data = bytearray(path.read_bytes())
    data[200] ^= 1
    path.write_bytes(bytes(data))
    harvest(llama, corpus, tmp_path / "s", config(), verify_existing=True)
    assert snapshot(tmp_path / "s") == clean


def test_progress_reports_every_batch_and_skips_on_resume(llama, corpus, tmp_path):
    seen = []
    harvest(llama, corpus, tmp_path, config(), progress=seen.append)
    done = [p.tokens_done for p in seen]
    assert done == sorted(done) and done[-1] == 1600 // 32 * 32 and not any(p.skipped for p in seen)
    assert len(seen) == sum(-(-s["contexts"] // 4) for s in ActivationStore.open(tmp_path).manifest["shards"])
    again = []
    harvest(llama, corpus, tmp_path, config(), progress=again.append)
    assert all(p.skipped for p in again) and again[-1].tokens_done == done[-1]


CHILD = """
import sys, torch
torch.set_num_threads(1)
import mechscope as ms
sys.path.insert(0, {tests!r})
from test_harvest import config, small_corpus
from mechscope.saes.harvest import harvest
model = ms.load_model("tiny-llama")
harvest(model, small_corpus(), sys.argv[1], config(N_HOOKS, n_tokens=N_TOKENS, dtype="float16"),
        progress=lambda p: print(p.tokens_done, flush=True))
print("done", flush=True)
"""
N_TOKENS = 24_000


def test_kill_at_any_moment_then_rerun_gives_the_uninterrupted_store(llama, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
    script = tmp_path / "child.py"
    code = textwrap.dedent(CHILD).format(tests=str(Path(__file__).parent))
    script.write_text(code.replace("N_HOOKS", repr(hooks)).replace("N_TOKENS", str(N_TOKENS)))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "s")], stdout=subprocess.PIPE, text=True, env=env
    )
    for line in child.stdout:  # kill mid-way, wherever the child happens to be
        if line.strip() != "done" and int(line) >= N_TOKENS * 0.4:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    assert child.returncode == -signal.SIGKILL
    killed = ActivationStore.open(tmp_path / "s", allow_incomplete=True)
    assert not killed.complete and killed.n_shards < N_TOKENS // 256
    killed.verify()  # whatever the manifest lists is whole
    rerun = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True, env=env
    )
    assert rerun.returncode == 0, rerun.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        harvest(llama, small_corpus(), tmp_path / "u", config(hooks, n_tokens=N_TOKENS, dtype="float16"))
    finally:
        torch.set_num_threads(threads)
    assert snapshot(tmp_path / "s") == snapshot(tmp_path / "u")


def test_cli_harvest_json_and_errors(tmp_path):
    from mechscope.cli.main import _friendly
    from mechscope.cli.sae_commands import register

    app = typer.Typer()
    register(app, _friendly)
    app.command("noop")(lambda: None)  # a second command keeps `harvest` a subcommand
    (tmp_path / "c.txt").write_text("".join(d.text for d in small_corpus()))
    args = ["harvest", "tiny-llama", str(tmp_path / "s"), "--hook", "blocks.1.hook_resid_post", "--corpus"]
    args += [
        str(tmp_path / "c.txt"),
        "--tokens",
        "2000",
        "--context-length",
        "64",
        "--dtype",
        "float16",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    store = ActivationStore.open(tmp_path / "s")
    assert out["tokens"] == store.n_tokens == 1984 and out["tokens_harvested_now"] == 1984
    assert out["hooks"] == {"blocks.1.hook_resid_post": 64} and store.identity["dtype"] == "float16"
    assert out["bytes"] == sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
    bad = CliRunner().invoke(app, args[:3] + ["--hook", "blocks.9.hook_resid_post"])
    assert bad.exit_code == 2 and "unknown hook point 'blocks.9.hook_resid_post'" in bad.output
