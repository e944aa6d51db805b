"""The activation store on synthetic shards: round trips, checksums, atomicity, refusals, batches.

Row ``g`` of the synthetic store holds ``g`` in column 0 of hook ``a`` (exact in every dtype for
g < 256), so a batch says which rows it was drawn from.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.saes import store as store_mod
from mechscope.saes.store import (
    ActivationStore,
    CorruptStoreError,
    IncompatibleStoreError,
    StoreError,
    StoreWriter,
)

N_SHARDS, ROWS, L = 4, 24, 8  # 96 rows; every 8th (each context's first) is special


def _identity(dtype="float32", **over):
    return {"model": "m", "hooks": {"a": 3, "b": 2}, "dtype": dtype, "context_length": L, "seed": 0, **over}


def _shard(i: int, dtype: str):
    g = np.arange(i * ROWS, (i + 1) * ROWS)
    doc = np.where(g % L == 0, -1, g // L)
    index = np.stack([g % 250, doc, g % L, 3 * (g % L)], 1).astype(np.int32)
    acts = {"a": np.stack([g, g + 0.5, -g], 1), "b": np.stack([2 * g, g % 7], 1)}
    torch_dtype = store_mod.DTYPES[dtype][0]
    stored = {}
    for k, v in acts.items():
        t = torch.tensor(v, dtype=torch.float32).to(torch_dtype)
        stored[k] = t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    docs = {int(d): (f"doc{d}", 100, 7) for d in np.unique(doc) if d >= 0}
    return index, docs, stored, acts


def _build(root: Path, dtype="float32", n=N_SHARDS, finish=True) -> StoreWriter:
    w = StoreWriter.open(root, _identity(dtype), {"note": "test"})
    for i in range(n):
        index, docs, stored, _ = _shard(i, dtype)
        w.write_shard(i, index, docs, stored)
    if finish:
        w.finish()
    return w


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    _build(tmp_path / "s")
    return ActivationStore.open(tmp_path / "s")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_in_every_dtype(tmp_path, dtype):
    _build(tmp_path, dtype)
    s = ActivationStore.open(tmp_path)
    assert s.n_tokens == N_SHARDS * ROWS and s.n_shards == N_SHARDS and s.complete
    rows = np.array([95, 0, 30, 31, 47])
    want = np.concatenate([_shard(i, dtype)[3]["a"] for i in range(N_SHARDS)])[rows]
    expected = torch.tensor(want, dtype=torch.float32).to(s.dtype).float()  # rounded like the store
    assert torch.equal(s.read("a", rows), expected)
    shard = s.shard("a", 1)
    assert shard.dtype == s.dtype and shard.shape == (ROWS, 3)
    assert torch.equal(shard.float(), expected.new_tensor(_shard(1, dtype)[3]["a"]).to(s.dtype).float())


def test_manifest_checksums_are_the_files_sha256(store):
    for record in store.manifest["shards"]:
        for name, f in record["files"].items():
            data = (store.root / "shards" / f"{record['index']:05d}" / name).read_bytes()
            assert f == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert store.manifest["n_tokens"] == N_SHARDS * ROWS
    store.verify()


def test_a_flipped_byte_is_found_by_verify_and_by_batches(store):
    path = store.root / "shards" / "00002" / "a.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    s = ActivationStore.open(store.root)
    with pytest.raises(CorruptStoreError, match=r"00002/a.npy is corrupt \(SHA-256"):
        s.verify()
    with pytest.raises(CorruptStoreError, match="is corrupt"):
        list(ActivationStore.open(store.root).batches("a", 8))


def test_a_truncated_shard_is_found_on_read(store):
    path = store.root / "shards" / "00001" / "b.npy"
    path.write_bytes(path.read_bytes()[:-16])
    s = ActivationStore.open(store.root)
    with pytest.raises(CorruptStoreError, match=r"00001/b.npy is \d+ bytes, the manifest says"):
        s.read("b", [ROWS + 1])
    assert s.read("a", [ROWS + 1])[0, 0] == ROWS + 1  # the other hook is intact


def _failing(after: int, real=store_mod._write_file, match: str = ""):
    calls = [0]

    def write(path, chunks):
        if match in path.name:
            calls[0] += 1
            if calls[0] > after:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, chunks)

    return write


def test_disk_full_while_writing_a_shard_keeps_only_complete_shards(tmp_path, monkeypatch):
    w = _build(tmp_path, n=2, finish=False)
    before = (tmp_path / "manifest.json").read_bytes()
    monkeypatch.setattr(store_mod, "_write_file", _failing(2))  # index and documents, then the first hook
    index, docs, stored, _ = _shard(2, "float32")
    with pytest.raises(StoreError, match="disk full while writing shard 2.*run the same harvest again"):
        w.write_shard(2, index, docs, stored)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000", "00001"]  # no temporary left
    s = ActivationStore.open(tmp_path, allow_incomplete=True)
    assert s.n_shards == 2
    s.verify()


def test_disk_full_while_writing_the_manifest_leaves_the_old_one(tmp_path, monkeypatch):
    w = _build(tmp_path, n=1, finish=False)
    before = (tmp_path / "manifest.json").read_bytes()
    monkeypatch.setattr(store_mod, "_write_file", _failing(0, match="manifest"))
    index, docs, stored, _ = _shard(1, "float32")
    with pytest.raises(StoreError, match="disk full"):
        w.write_shard(1, index, docs, stored)
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))
    assert (
        ActivationStore.open(tmp_path, allow_incomplete=True).n_shards == 1
    )  # 00001 exists but is not listed
    monkeypatch.undo()
    StoreWriter.open(tmp_path, _identity(), {"note": "test"})  # reopening removes the unlisted shard
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000"]


def test_a_store_of_another_identity_is_refused_with_what_differs(store):
    with pytest.raises(
        IncompatibleStoreError, match=r"(?s)dtype: store has \"float32\", requested \"float16\""
    ):
        StoreWriter.open(store.root, _identity("float16"), {})
    with pytest.raises(IncompatibleStoreError, match=r"seed: store has 0, requested 1"):
        StoreWriter.open(store.root, _identity(seed=1), {})
    StoreWriter.open(store.root, _identity(), {"note": "test"})  # the same identity reopens


def test_refusals_on_open(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "unrelated.txt").write_text("hi")
    with pytest.raises(IncompatibleStoreError, match="not empty and holds no manifest.json"):
        StoreWriter.open(tmp_path / "x", _identity(), {})
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore.open(tmp_path / "x")
    _build(tmp_path / "y", n=1, finish=False)
    with pytest.raises(StoreError, match="did not finish.*run the same harvest again"):
        ActivationStore.open(tmp_path / "y")
    manifest = json.loads((tmp_path / "y" / "manifest.json").read_text())
    (tmp_path / "y" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IncompatibleStoreError, match="format 99"):
        ActivationStore.open(tmp_path / "y", allow_incomplete=True)


def test_check_names_the_mismatch(store):
    store.check(model_name="m", hook="a", d_in=3)
    with pytest.raises(IncompatibleStoreError, match="harvested from 'm', not 'other'"):
        store.check(model_name="other")
    with pytest.raises(IncompatibleStoreError, match=r"holds \['a', 'b'\], not 'c'"):
        store.check(hook="c")
    with pytest.raises(IncompatibleStoreError, match="a has width 3, not 4"):
        store.check(hook="a", d_in=4)
    with pytest.raises(KeyError, match="has no hook 'c'"):
        next(store.batches("c", 4))


def _rows(batch) -> list[int]:
    return batch[:, 0].long().tolist()


def test_batches_cover_each_text_row_once_per_epoch(store):
    text_rows = [g for g in range(N_SHARDS * ROWS) if g % L]
    assert store.n_rows() == len(text_rows) and store.n_rows(exclude_special=False) == N_SHARDS * ROWS
    seen = [r for b in store.batches("a", 12, seed=3, buffer_rows=16) for r in _rows(b)]
    assert sorted(seen) == text_rows and seen != text_rows  # 84 rows = 7 full batches
    every = [r for b in store.batches("a", 8, exclude_special=False) for r in _rows(b)]
    assert sorted(every) == list(range(N_SHARDS * ROWS))


def test_endless_batches_of_a_store_without_text_rows_are_refused(tmp_path):
    """epochs=None on a store of BOS/separator rows only used to loop forever without yielding."""
    w = StoreWriter.open(tmp_path / "s", _identity(), {})
    index, docs, stored, _ = _shard(0, "float32")
    index[:, 1] = -1  # every row special
    w.write_shard(0, index, {}, stored)
    w.finish()
    s = ActivationStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="exclude_special=False"):
        next(s.batches("a", 4, epochs=None))
    assert len(next(s.batches("a", 4, epochs=None, exclude_special=False))) == 4


def test_batches_hold_the_stored_rows_for_every_hook(store):
    for a, b in store.batches(["a", "b"], 10, seed=1):
        rows = _rows(a)
        assert torch.equal(a, store.read("a", rows)) and torch.equal(b, store.read("b", rows))
        assert b[:, 0].tolist() == [2.0 * r for r in rows]


def test_batches_are_seeded_and_resume_at_a_step(store):
    def run(**kw):
        return [_rows(b) for b in store.batches("a", 6, buffer_rows=32, epochs=2, **kw)]

    full = run(seed=7)
    assert full == run(seed=7) and full != run(seed=8)
    assert run(seed=7, start_step=5) == full[5:]
    first, second = sum(full[:14], []), sum(full[14:], [])
    assert len(full) == 2 * 84 // 6 and sorted(first) == sorted(second) and first != second  # reshuffled
    forever = store.batches("a", 6, seed=7, epochs=None, buffer_rows=32)
    assert [_rows(next(forever)) for _ in range(30)][:28] == full


def test_the_buffer_mixes_across_shards(store):
    big = next(store.batches("a", 32, buffer_rows=1 << 12))  # holds the whole store: a uniform permutation
    assert len({r // ROWS for r in _rows(big)}) == N_SHARDS
    small = next(store.batches("a", 4, buffer_rows=4))
    assert len({r // ROWS for r in _rows(small)}) == 1  # a tiny buffer stays within a shard


def test_rows_trace_back(store):
    assert store.tokens([0, 9, 95]).tolist() == [0, 9, 95]
    assert store.context_tokens(1).tolist() == list(range(8, 16))
    loc = store.locate(ROWS + 3)
    assert loc == (ROWS + 3, 3, 3, ROWS + 3, 3, "doc3", 3, 9)
    assert store.locate(16).source is None and store.locate(16).document == -1


def test_a_resumed_harvest_is_incomplete_until_it_finishes(tmp_path):
    _build(tmp_path / "s")  # a finished store...
    w = StoreWriter.open(tmp_path / "s", _identity(), {"note": "more tokens"})  # ...extended
    index, docs, stored, _ = _shard(N_SHARDS, "float32")
    w.write_shard(N_SHARDS, index, docs, stored)  # killed here, before finish()
    with pytest.raises(StoreError, match="did not finish"):
        ActivationStore.open(tmp_path / "s")
    assert ActivationStore.open(tmp_path / "s", allow_incomplete=True).n_shards == N_SHARDS + 1
    w.finish()
    assert ActivationStore.open(tmp_path / "s").complete
