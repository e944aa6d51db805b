"""SAE training: the sparse TopK kernels equal the dense maths, schedules, dead latents, metrics that move
the right way, resume after a kill identical to an unbroken run, streaming sources, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mechscope as ms
from mechscope.data.contexts import ContextConfig
from mechscope.data.corpus import Corpus, pydoc_corpus
from mechscope.saes.arch import make_sae
from mechscope.saes.formats import load_sae
from mechscope.saes.harvest import HarvestConfig, harvest
from mechscope.saes.sae import SAEConfig
from mechscope.saes.sources import StoreSource, StreamSource, TensorSource
from mechscope.saes.train import ResumeMismatchError, TrainConfig, Trainer, train_sae


def sparse_data(
    n: int = 8192, d: int = 16, features: int = 48, p: float = 0.06, seed: int = 0
) -> torch.Tensor:
    """Rows that are sparse sums of ``features`` unit directions: what an SAE should recover."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(features, d, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    coef = (torch.rand(n, features, generator=g) < p) * torch.rand(n, features, generator=g)
    return coef @ dirs + 0.3


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sparse_topk_step_equals_dense_maths():
    cfg = SAEConfig(d_in=16, d_sae=64, kind="topk", k=4, k_aux=8, dtype="float64")
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
        sae.input_scale.fill_(1.7)
        sae.output_scale.fill_(1.7)
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.3
    runs = []
    for training in (True, False):  # True: the sparse kernels; False: the dense reference
        sae.train(training)
        sae.zero_grad()
        out = sae(x, dead_mask=dead)
        sae.total_loss(out.losses).backward()
        runs.append((out, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (sparse, g_sparse), (dense, g_dense) = runs
    assert float(dense.losses["aux"].detach()) > 0
    for name in dense.losses:
        torch.testing.assert_close(sparse.losses[name], dense.losses[name], rtol=1e-12, atol=1e-12)
    assert sparse.acts.is_sparse
    torch.testing.assert_close(sparse.acts.to_dense(), dense.acts.detach())
    torch.testing.assert_close(sparse.recon, dense.recon, rtol=1e-12, atol=1e-12)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], rtol=1e-10, atol=1e-12)


def test_sparse_kernels_by_device_and_width_or_forced():
    from mechscope.saes.arch.sparse import CUDA_MIN_D_SAE, use_sparse

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (
        use_sparse(cpu, 64) and use_sparse(cuda, CUDA_MIN_D_SAE) and not use_sparse(cuda, CUDA_MIN_D_SAE - 1)
    )
    sae = make_sae(SAEConfig(d_in=16, d_sae=64, kind="topk", k=4)).train()
    x = torch.randn(8, 16)
    assert sae(x).acts.is_sparse  # the CPU default
    sae.sparse_kernels = False
    dense = sae(x)
    assert not dense.acts.is_sparse
    sae.sparse_kernels = True
    torch.testing.assert_close(sae(x).recon, dense.recon)


def test_schedules():
    cfg = TrainConfig(n_tokens=1000, batch_size=10, lr=1.0, lr_warmup=0.1, lr_decay=0.2, sparsity_warmup=0.5)
    assert cfg.steps == 100
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(50) == 1.0
    assert cfg.lr_at(80) == pytest.approx(1.0) and cfg.lr_at(99) == pytest.approx(0.05)
    assert cfg.sparsity_at(0) == pytest.approx(0.02) and cfg.sparsity_at(49) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        TrainConfig(lr_warmup=1.5)
    with pytest.raises(ValueError, match="less than one batch"):
        TrainConfig(n_tokens=10, batch_size=100)


@pytest.mark.parametrize(
    "kind, kw", [("topk", {"k": 4}), ("relu", {"l1_coefficient": 0.5}), ("jumprelu", {})]
)
def test_training_reduces_fvu_and_reaches_sparsity(tmp_path, kind, kw):
    x = sparse_data()
    sae = train_sae(
        TensorSource(x),
        SAEConfig(d_in=16, d_sae=96, kind=kind, **kw),
        TrainConfig(n_tokens=150_000, batch_size=256, lr=3e-3, log_every=20, dead_tokens=50_000),
        tmp_path,
    )
    rows = metrics(tmp_path)
    assert rows[-1]["step"] == 150_000 // 256
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"], (rows[0]["fvu"], rows[-1]["fvu"])
    assert rows[-1]["fvu"] < 0.3
    if kind == "topk":
        assert rows[-1]["l0"] <= 4
    assert rows[-1]["l0"] < 16  # far sparser than the input's 16 dimensions
    loaded = load_sae(tmp_path / "sae")
    torch.testing.assert_close(loaded.encode(x[:8]), sae.encode(x[:8]))


def test_dead_latents_tracked_and_fed_to_auxk(tmp_path):
    x = sparse_data()
    sae = make_sae(SAEConfig(d_in=16, d_sae=64, kind="topk", k=2))
    with torch.no_grad():  # latents 0..7 can never win the top k: dead from the start
        sae.b_enc[:8] = -1e3
    trainer = Trainer(
        sae, TensorSource(x), TrainConfig(n_tokens=4096, batch_size=256, dead_tokens=512), tmp_path
    )
    seen = []
    orig = sae.forward

    def spy(*a, dead_mask=None, **k):
        seen.append(dead_mask.clone())
        return orig(*a, dead_mask=dead_mask, **k)

    sae.forward = spy
    trainer.fit()
    assert not seen[0].any() and not seen[1].any()  # 0 and 256 tokens without firing: not yet dead
    assert seen[2][:8].all()  # 512 tokens: dead
    assert trainer.since_fired[:8].min() >= 4096 - 256


def _train(run: Path, source, stop_at: int | None = None, **kw) -> torch.nn.Module:
    cfg = TrainConfig(
        n_tokens=64 * 40,
        batch_size=64,
        lr=1e-2,
        log_every=3,
        checkpoint_every=7,
        dead_tokens=256,
        init_tokens=512,
        **kw,
    )
    sae = make_sae(SAEConfig(d_in=source.widths[0], d_sae=32, kind="topk", k=3, seed=5))

    def progress(p):
        if stop_at is not None and p.step == stop_at:
            raise KeyboardInterrupt

    return Trainer(sae, source, cfg, run).fit(progress)


def test_resume_after_kill_is_identical(tmp_path):
    source = TensorSource(sparse_data(n=1000))
    whole = _train(tmp_path / "whole", source)
    with pytest.raises(KeyboardInterrupt):  # killed at step 17: the last checkpoint is step 14
        _train(tmp_path / "broken", source, stop_at=17)
    assert json.loads((tmp_path / "broken/checkpoint/state.json").read_text())["step"] == 14
    assert metrics(tmp_path / "broken")[-1]["step"] > 14  # log lines past the checkpoint, to be cut
    resumed = _train(tmp_path / "broken", source)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert metrics(tmp_path / "whole") == metrics(tmp_path / "broken")


def test_a_moved_store_and_run_still_resume(llama, tmp_path):
    hook = "blocks.1.hook_resid_post"
    ctx = ContextConfig(context_length=32, seed=3)
    harvest(
        llama, _corpus(), tmp_path / "a/acts", HarvestConfig(hooks=(hook,), n_tokens=32 * 40, contexts=ctx)
    )
    whole = _train(tmp_path / "whole", StoreSource(tmp_path / "a/acts"))
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "a/run", StoreSource(tmp_path / "a/acts"), stop_at=17)
    (tmp_path / "a").rename(tmp_path / "b")  # the whole experiment directory moves
    resumed = _train(tmp_path / "b/run", StoreSource(tmp_path / "b/acts"))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_another_run(tmp_path):
    source = TensorSource(sparse_data(n=1000))
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, source, stop_at=8)
    with pytest.raises(ResumeMismatchError, match="different train"):
        _train(tmp_path, source, seed=1)


def test_width_mismatch_is_refused(tmp_path):
    sae = make_sae(SAEConfig(d_in=8, d_sae=16, kind="topk", k=2))
    with pytest.raises(ValueError, match="8 -> 8 wide but .* rows of 16"):
        Trainer(
            sae,
            TensorSource(sparse_data(n=64), hook="h"),
            TrainConfig(batch_size=8, init_tokens=32),
            tmp_path,
        )


@pytest.fixture(scope="module")
def llama() -> ms.HookedModel:
    return ms.load_model("tiny-llama")


def _corpus() -> Corpus:
    docs = [d for d in pydoc_corpus() if d.text.isascii()][:12]
    return Corpus.from_documents(docs, {"kind": "test", "name": "pydoc12"})


def test_stream_source_resumes_without_recomputing_and_matches_the_store(llama, tmp_path):
    hook = "blocks.0.hook_resid_post"
    ctx = ContextConfig(context_length=32, seed=3)
    stream = StreamSource(llama, _corpus(), hook, contexts=ctx, block_contexts=4, batch_contexts=2)
    it = stream.batches(48, seed=0)
    first = [next(it) for _ in range(9)]
    calls = []
    orig = stream._rows
    stream._rows = lambda index: calls.append(1) or orig(index)
    later = [next(stream.batches(48, seed=0, start_step=s)) for s in (0, 5, 8)]
    for s, b in zip((0, 5, 8), later, strict=True):
        torch.testing.assert_close(b, first[s])
    assert len(calls) <= 4  # one partial block per resume (a batch may straddle two blocks)
    # every streamed row is a row the harvest stores for the same contexts
    store = harvest(
        llama, _corpus(), tmp_path / "s", HarvestConfig(hooks=(hook,), n_tokens=32 * 12, contexts=ctx)
    )
    stored = StoreSource(store).store.read(hook, list(range(store.n_tokens)))
    rows = torch.cat(first[:3])
    dist = torch.cdist(rows, stored, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float((dist / rows.norm(dim=-1)).max()) < 1e-5


def test_store_and_stream_sources_train(llama, tmp_path):
    hook = "blocks.1.hook_resid_post"
    ctx = ContextConfig(context_length=32, seed=3)
    store = harvest(
        llama, _corpus(), tmp_path / "s", HarvestConfig(hooks=(hook,), n_tokens=32 * 20, contexts=ctx)
    )
    d = store.hooks[hook]
    cfg = TrainConfig(n_tokens=64 * 30, batch_size=64, lr=5e-3, log_every=5, init_tokens=256)
    for name, src in [
        ("store", StoreSource(store)),
        ("stream", StreamSource(llama, _corpus(), hook, contexts=ctx, block_contexts=8)),
    ]:
        train_sae(src, SAEConfig(d_in=d, d_sae=4 * d, kind="topk", k=4, hook_name=hook), cfg, tmp_path / name)
        rows = metrics(tmp_path / name)
        assert rows[-1]["fvu"] < rows[0]["fvu"], name
    assert json.loads((tmp_path / "stream/run.json").read_text())["source"]["source"] == "stream"


def _torn(run):
    (run / "checkpoint").rename(run / "checkpoint.old")  # killed after moving the old one away...
    (run / "checkpoint.tmp").mkdir()  # ...with a half-written new one beside it
    (run / "checkpoint.tmp" / "sae_weights.safetensors").write_bytes(b"torn")


def _old_left(run):  # killed after the new one was renamed into place, before the old one was deleted
    shutil.copytree(run / "checkpoint", run / "checkpoint.old")


@pytest.mark.parametrize("kill", [_torn, _old_left])
def test_resume_survives_a_kill_while_checkpointing(tmp_path, kill):
    source = TensorSource(sparse_data(n=1000))
    whole = _train(tmp_path / "whole", source)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "broken", source, stop_at=17)
    run = tmp_path / "broken"
    kill(run)
    resumed = _train(run, source)  # its next checkpoints must not trip over what the kill left
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not (run / "checkpoint.old").exists()


def test_cli_train_and_eval(llama, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mechscope.cli.main import _friendly
    from mechscope.cli.sae_commands import register

    app = typer.Typer()
    register(app, _friendly)
    hook = "blocks.1.hook_resid_post"
    ctx = ContextConfig(context_length=32, seed=3)
    harvest(llama, _corpus(), tmp_path / "s", HarvestConfig(hooks=(hook,), n_tokens=32 * 20, contexts=ctx))
    args = [
        "train-sae",
        str(tmp_path / "run"),
        "--store",
        str(tmp_path / "s"),
        "--k",
        "4",
        "--expansion",
        "2",
    ]
    args += ["--tokens", "1280", "--batch-size", "64", "--log-every", "5", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["step"] == 20 and out["l0"] <= 4
    assert out["fvu"] == metrics(tmp_path / "run")[-1]["fvu"]
    args = ["eval-sae", str(tmp_path / "run/sae"), "--store", str(tmp_path / "s"), "--tokens", "256"]
    args += ["--model", "tiny-llama", "--contexts", "4", "--html", str(tmp_path / "d.html"), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["reconstruction"]["n_tokens"] == 256 and ev["reconstruction"]["l0"] <= 4
    assert ev["downstream"]["n_tokens"] == 4 * 31
    assert "<svg" in (tmp_path / "d.html").read_text()
    bad = CliRunner().invoke(
        app, ["train-sae", str(tmp_path / "r2"), "--store", str(tmp_path / "s"), "--model", "x"]
    )
    assert bad.exit_code == 2 and "exactly one of --store" in bad.output
