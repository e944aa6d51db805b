"""The on-disk activation store: fixed-size shards, a JSON manifest, memory-mapped reads.

A store directory holds::

    manifest.json                  identity, token counts, one record per complete shard
    tokenizer/                     the model's tokenizer, so rows can be decoded without the model
    shards/00000/index.npy         int32 [rows, 4]: token, document, token_offset, char_offset
    shards/00000/documents.json    {document id: [source, n_chars, n_tokens]} for the shard's documents
    shards/00000/<hook>.npy        [rows, d_in] activations (bfloat16 stored as raw uint16)

Rows are tokens: row ``r`` is position ``r % context_length`` of context ``r // context_length``.
``d_in`` is a hook's width, what an SAE reads: ``d_model`` for the residual stream, ``d_mlp``
for ``mlp.hook_post``, ``n_heads * d_head`` for ``attn.hook_z`` (heads flattened).
Every shard holds ``shard_contexts`` contexts except possibly the last.

**Identity.** The manifest's ``identity`` (model name and weight fingerprint, hooks with their
widths, dtype, context length and packing, corpus description, seed, shard size) must equal the
harvest's, or the store is refused with a message listing what differs: activations of two
models, hooks or corpora are never mixed.

**Atomic writes.** A shard is written into a temporary directory, every file fsynced, then the
directory is renamed into place, and only then is the manifest (itself written to a temporary
file, fsynced and renamed) updated to list it. A shard not listed in the manifest does not
exist for readers, and is recomputed by the next harvest, so a kill at any moment or a full disk
never leaves anything half-written that looks complete.

**Reads.** ``.npy`` files are memory-mapped (``numpy.load(mmap_mode="c")``); sizes are checked on
every open and SHA-256 checksums by :meth:`ActivationStore.verify` and on the first read of each
shard by :meth:`ActivationStore.batches`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.models.errors import MechscopeError

FORMAT_VERSION = 1
DTYPES: dict[str, tuple[torch.dtype, type]] = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),  # numpy has no bfloat16: raw bits, reinterpreted on read
}
MANIFEST = "manifest.json"
_OPEN_MAPS = 64


class StoreError(MechscopeError, OSError):
    """The store could not be written (disk full, permissions) or read."""


class IncompatibleStoreError(MechscopeError, ValueError):
    """A store built for another model, hook, dtype, context length, corpus or seed."""


class CorruptStoreError(MechscopeError, ValueError):
    """A shard whose size, shape or checksum is not the manifest's."""


# ---------------------------------------------------------------------------- low-level IO
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, chunks: Sequence[bytes | memoryview]) -> dict[str, Any]:
    """Write and fsync; the record (SHA-256 and size) is computed from the bytes in memory."""
    h, size = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
            h.update(c)
            size += memoryview(c).nbytes
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": h.hexdigest(), "bytes": size}


def _npy_chunks(arr: np.ndarray) -> list[bytes | memoryview]:
    arr = np.ascontiguousarray(arr)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    return [header.getvalue(), memoryview(arr).cast("B")]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, [(json.dumps(data, indent=1) + "\n").encode()])
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(e, f"writing {path}") from e


def _disk_error(e: OSError, doing: str) -> OSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(
            f"disk full while {doing}: nothing partial was kept, and every shard the manifest lists is "
            "complete; free some space and run the same harvest again to resume"
        )
    return e


def shard_name(i: int) -> str:
    return f"{i:05d}"


def identity_differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """One line per identity field that differs."""
    out = []
    for key in sorted(set(have) | set(want)):
        if have.get(key) != want.get(key):
            out.append(
                f"{key}: store has {json.dumps(have.get(key))[:300]}, requested {json.dumps(want.get(key))[:300]}"
            )
    return out


# ---------------------------------------------------------------------------- writing
class StoreWriter:
    """Adds complete shards to a store, atomically (see the module docstring); used by harvesting."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest

    @classmethod
    def open(
        cls, root: str | Path, identity: dict[str, Any], info: dict[str, Any], tokenizer=None
    ) -> StoreWriter:
        """Create the store, or reopen it to resume; refuses a store whose identity differs."""
        root = Path(root)
        path = root / MANIFEST
        if path.exists():
            manifest = json.loads(path.read_text())
            diff = identity_differences(manifest.get("identity", {}), identity)
            if diff:
                raise IncompatibleStoreError(
                    f"the store at {root} was built differently; use another directory (or delete this one):\n  "
                    + "\n  ".join(diff)
                )
            # A harvest under way is unfinished until finish(): a kill while extending a finished
            # store must not leave it marked complete with fewer tokens than asked for.
            manifest.update(info, complete=False)
        else:
            if root.exists() and any(root.iterdir()):
                raise IncompatibleStoreError(
                    f"{root} is not empty and holds no {MANIFEST}: not an activation store; choose an empty directory"
                )
            manifest = {
                "format_version": FORMAT_VERSION,
                "identity": identity,
                **info,
                "complete": False,
                "shards": [],
            }
        writer = cls(root, manifest)
        try:
            (root / "shards").mkdir(parents=True, exist_ok=True)
            writer._clean()
            if tokenizer is not None and not (root / "tokenizer").exists():
                tmp = root / f".tokenizer.tmp-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tokenizer.save_pretrained(tmp)
                os.replace(tmp, root / "tokenizer")
            writer._save()
        except OSError as e:
            raise _disk_error(e, f"creating the store at {root}") from e
        return writer

    def _clean(self) -> None:
        """Remove temporaries and shards the manifest does not list (a kill left them)."""
        listed = {shard_name(s["index"]) for s in self.manifest["shards"]}
        stale = [d for d in (self.root / "shards").iterdir() if d.name not in listed]
        for path in stale + list(self.root.glob(".*.tmp-*")):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _save(self) -> None:
        self.manifest["shards"].sort(key=lambda s: s["index"])
        self.manifest["n_tokens"] = sum(s["rows"] for s in self.manifest["shards"])
        _write_json_atomic(self.root / MANIFEST, self.manifest)

    @property
    def shards(self) -> dict[int, dict[str, Any]]:
        """Complete shards by index."""
        return {s["index"]: s for s in self.manifest["shards"]}

    def drop(self, i: int) -> None:
        """Unlist shard ``i`` (before it is recomputed: a replaced file is never listed with an old checksum)."""
        self.manifest["shards"] = [s for s in self.manifest["shards"] if s["index"] != i]
        self.manifest["complete"] = False
        self._save()

    def write_shard(
        self,
        i: int,
        index: Int[np.ndarray, "rows field"],
        documents: dict[int, Any],
        acts: dict[str, np.ndarray],
        **extra: Any,
    ) -> None:
        """Write shard ``i`` (index, document table, one array per hook) and list it in the manifest."""
        self.add([self.write_files(i, index, documents, acts, **extra)])

    def write_files(
        self,
        i: int,
        index: Int[np.ndarray, "rows field"],
        documents: dict[int, Any],
        acts: dict[str, np.ndarray],
        **extra: Any,
    ) -> dict[str, Any]:
        """Write shard ``i``'s directory atomically and return its manifest record, *unlisted*: until
        :meth:`add` lists it, the shard does not exist (a data-parallel harvest writes on every process
        and lists on one)."""
        final = self.root / "shards" / shard_name(i)
        tmp = self.root / "shards" / f".tmp-{shard_name(i)}-{os.getpid()}"
        try:
            tmp.mkdir()
            files = {"index.npy": _write_file(tmp / "index.npy", _npy_chunks(index))}
            doc_json = json.dumps({str(k): list(v) for k, v in sorted(documents.items())}).encode()
            files["documents.json"] = _write_file(tmp / "documents.json", [doc_json])
            for hook, arr in acts.items():
                files[f"{hook}.npy"] = _write_file(tmp / f"{hook}.npy", _npy_chunks(arr))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_error(e, f"writing shard {i}") from e
        return {"index": i, "rows": len(index), **extra, "files": files}

    def add(self, records: list[dict[str, Any]]) -> None:
        """List shards written by :meth:`write_files` (replacing older records of the same index)."""
        if not records:
            return
        before = self.manifest["shards"]
        new = {r["index"] for r in records}
        self.manifest["shards"] = [s for s in before if s["index"] not in new] + list(records)
        try:
            self._save()
        except OSError:
            self.manifest["shards"] = before  # the directories stay unlisted, so they do not exist
            raise

    def finish(self, **info: Any) -> None:
        """Mark the store complete."""
        self.manifest.update(info, complete=True)
        self._save()


# ---------------------------------------------------------------------------- reading
class RowLocation(NamedTuple):
    """Where one activation row comes from."""

    row: int
    context: int
    """Context number in the store (``row // context_length``)."""
    pos: int
    """Position in the context."""
    token: int
    document: int
    """Document ordinal in the corpus; -1 for BOS and separators."""
    source: str | None
    """The document's source label (``hamlet_gut.txt``, ``data.jsonl:17``)."""
    token_offset: int
    """The token's position among its document's tokens."""
    char_offset: int
    """Where the token starts in the document's text."""


class ActivationStore:
    """A harvested store, opened for reading (see the module docstring)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.identity: dict[str, Any] = manifest["identity"]
        self._records = manifest["shards"]
        if [s["index"] for s in self._records] != list(range(len(self._records))):
            raise CorruptStoreError(
                f"{root / MANIFEST} lists shards with gaps; re-run the harvest to fill them"
            )
        self._starts = np.cumsum([0] + [s["rows"] for s in self._records])
        self._verified: set[tuple[int, str]] = set()
        self._maps: OrderedDict[tuple[int, str], np.ndarray] = OrderedDict()
        self._tokenizer = None

    @classmethod
    def open(cls, path: str | Path, *, allow_incomplete: bool = False) -> ActivationStore:
        """Open a store; an unfinished harvest is an error unless ``allow_incomplete``."""
        root = Path(path)
        if not (root / MANIFEST).exists():
            raise FileNotFoundError(
                f"{root} is not an activation store (no {MANIFEST}); run `mechscope harvest` first"
            )
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise IncompatibleStoreError(
                f"{root} has store format {manifest.get('format_version')}, this mechscope reads {FORMAT_VERSION}"
            )
        if not manifest["complete"] and not allow_incomplete:
            raise StoreError(
                f"the harvest into {root} did not finish ({manifest['n_tokens']} tokens in "
                f"{len(manifest['shards'])} shards); run the same harvest again to complete it, "
                "or open with allow_incomplete=True"
            )
        return cls(root, manifest)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.root)!r}, {self.identity['model']}, {list(self.hooks)}, {self.n_tokens} tokens)"

    # -- facts
    @property
    def hooks(self) -> dict[str, int]:
        """Hook name -> activation width."""
        return dict(self.identity["hooks"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.identity["dtype"]][0]

    @property
    def context_length(self) -> int:
        return self.identity["context_length"]

    @property
    def n_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def n_shards(self) -> int:
        return len(self._records)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def check(
        self, *, model_name: str | None = None, hook: str | None = None, d_in: int | None = None
    ) -> None:
        """Raise :class:`IncompatibleStoreError` unless the store holds ``hook`` of ``model_name`` at width ``d_in``.

        A trainer calls this before any work, so an SAE never trains on another model's or hook's rows.
        """
        problems = []
        if model_name is not None and model_name != self.identity["model"]:
            problems.append(f"it was harvested from {self.identity['model']!r}, not {model_name!r}")
        if hook is not None and hook not in self.hooks:
            problems.append(f"it holds {sorted(self.hooks)}, not {hook!r}")
        elif hook is not None and d_in is not None and self.hooks[hook] != d_in:
            problems.append(f"{hook} has width {self.hooks[hook]}, not {d_in}")
        if problems:
            raise IncompatibleStoreError(f"store {self.root} does not fit: " + "; ".join(problems))

    # -- shards
    def _path(self, i: int, name: str) -> Path:
        return self.root / "shards" / shard_name(i) / name

    def _verify_file(self, i: int, name: str) -> None:
        if (i, name) in self._verified:
            return
        self._check_size(i, name)
        record, path = self._records[i]["files"][name], self._path(i, name)
        found = _sha256(path)
        if found != record["sha256"]:
            raise CorruptStoreError(
                f"{path} is corrupt (SHA-256 {found[:12]}..., manifest {record['sha256'][:12]}...); "
                f"delete {path.parent} and its entry in {MANIFEST}, or the whole store, and harvest again"
            )
        self._verified.add((i, name))

    def _check_size(self, i: int, name: str) -> None:
        path, record = self._path(i, name), self._records[i]["files"].get(name)
        if record is None:
            raise KeyError(f"shard {i} has no {name}")
        size = path.stat().st_size if path.exists() else None
        if size != record["bytes"]:
            raise CorruptStoreError(
                f"{path} is {'missing' if size is None else f'{size} bytes'}, the manifest says {record['bytes']}; "
                "the store is damaged: harvest again into a fresh directory"
            )

    def _array(self, i: int, name: str, verify: bool = False) -> np.ndarray:
        if verify:
            self._verify_file(i, name)
        key = (i, name)
        if key not in self._maps:
            self._check_size(i, name)
            self._maps[key] = np.load(self._path(i, name), mmap_mode="c")
            if len(self._maps) > _OPEN_MAPS:  # bound the open mappings on stores of thousands of shards
                self._maps.popitem(last=False)
        self._maps.move_to_end(key)
        return self._maps[key]

    def index(self, i: int) -> Int[np.ndarray, "rows field"]:
        """Shard ``i``'s index rows (memory-mapped)."""
        return self._array(i, "index.npy")

    def shard(self, hook: str, i: int) -> Float[Tensor, "rows d_in"]:
        """Shard ``i`` of ``hook``, memory-mapped, in the stored dtype."""
        self._hook(hook)
        arr = self._array(i, f"{hook}.npy")
        if arr.shape != (self._records[i]["rows"], self.hooks[hook]):
            raise CorruptStoreError(
                f"{self._path(i, hook + '.npy')} has shape {arr.shape}, expected "
                f"{(self._records[i]['rows'], self.hooks[hook])}"
            )
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.identity["dtype"] == "bfloat16" else t

    def _hook(self, hook: str) -> None:
        if hook not in self.hooks:
            raise KeyError(f"store {self.root} has no hook {hook!r}; it holds {sorted(self.hooks)}")

    def verify(self) -> None:
        """Check every listed file's size and SHA-256; raise :class:`CorruptStoreError` on the first mismatch."""
        for i, record in enumerate(self._records):
            for name in record["files"]:
                self._verify_file(i, name)

    def _split(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, positions in ``rows``, sorted local rows) for every shard that ``rows`` touch."""
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise IndexError(f"rows must be in [0, {self.n_tokens}), got {rows.min()}..{rows.max()}")
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            local = rows[where] - self._starts[s]
            order = np.argsort(local, kind="stable")
            yield int(s), where[order], local[order]

    def read(
        self,
        hook: str,
        rows: Sequence[int] | np.ndarray,
        *,
        dtype: torch.dtype = torch.float32,
        verify: bool = False,
    ) -> Float[Tensor, "n d_in"]:
        """Rows (global row numbers, any order) of ``hook``, gathered from the memory-mapped shards."""
        self._hook(hook)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.hooks[hook]), dtype=DTYPES[self.identity["dtype"]][1])
        for s, where, local in self._split(rows):
            out[where] = self._array(s, f"{hook}.npy", verify)[local]
        t = torch.from_numpy(out)
        return (t.view(torch.bfloat16) if self.identity["dtype"] == "bfloat16" else t).to(dtype)

    # -- tracing rows back to text
    def index_rows(self, rows: Sequence[int] | np.ndarray) -> Int[np.ndarray, "n field"]:
        """Index rows (token, document, token_offset, char_offset) of global rows."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), 4), dtype=np.int32)
        for s, where, local in self._split(rows):
            out[where] = self.index(s)[local]
        return out

    def tokens(self, rows: Sequence[int] | np.ndarray) -> Int[Tensor, " n"]:
        """Token ids of global rows."""
        return torch.from_numpy(self.index_rows(rows)[:, 0].astype(np.int64))

    def context_tokens(self, context: int) -> Int[Tensor, " pos"]:
        """The token ids of context ``context``."""
        start = context * self.context_length
        return self.tokens(np.arange(start, start + self.context_length))

    def _documents(self, shard: int) -> dict[str, list]:
        self._check_size(shard, "documents.json")
        return json.loads(self._path(shard, "documents.json").read_text())

    def locate(self, row: int) -> RowLocation:
        """Where row ``row`` comes from: context, position, token, document and offsets."""
        token, doc, tok_off, char_off = (int(v) for v in self.index_rows([row])[0])
        shard = int(np.searchsorted(self._starts, row, side="right") - 1)
        source = self._documents(shard)[str(doc)][0] if doc >= 0 else None
        L = self.context_length
        return RowLocation(row, row // L, row % L, token, doc, source, tok_off, char_off)

    @property
    def tokenizer(self):
        """The model's tokenizer, saved with the store."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.root / "tokenizer")
        return self._tokenizer

    def snippet(self, row: int, *, before: int = 24, after: int = 8) -> tuple[str, str, str]:
        """The text around row ``row`` within its context: (text before, the token, text after)."""
        L = self.context_length
        ids = self.context_tokens(row // L).tolist()
        pos = row % L
        dec = self.tokenizer.decode
        return (
            dec(ids[max(0, pos - before) : pos]),
            dec(ids[pos : pos + 1]),
            dec(ids[pos + 1 : pos + 1 + after]),
        )

    # -- training batches
    def _allowed(self, i: int, exclude_special: bool, verify: bool = False) -> np.ndarray:
        start = int(self._starts[i])
        if not exclude_special:
            return np.arange(start, int(self._starts[i + 1]), dtype=np.int64)
        return start + np.nonzero(self._array(i, "index.npy", verify)[:, 1] >= 0)[0].astype(np.int64)

    def n_rows(self, *, exclude_special: bool = True) -> int:
        """Rows that :meth:`batches` draws from (all tokens, or all but BOS/separators)."""
        return sum(len(self._allowed(i, exclude_special)) for i in range(self.n_shards))

    def row_order(
        self,
        *,
        seed: int = 0,
        epochs: int | None = 1,
        buffer_rows: int = 1 << 18,
        exclude_special: bool = True,
        verify: bool = False,
    ) -> Iterator[Int[np.ndarray, " chunk"]]:
        """The shuffled stream of global row numbers behind :meth:`batches`, in chunks.

        Per epoch ``e`` a generator seeded with ``(seed, e)`` permutes the shard order; rows then
        flow through a buffer of ``buffer_rows`` that is permuted whenever it fills and emits all
        but half of itself, so each row lands at a random place within about ``buffer_rows`` of
        where it entered (a buffer as large as the store gives a uniform permutation). Only row
        numbers are computed here, so skipping ahead to resume costs no activation reads.
        """
        if buffer_rows < 2:
            raise ValueError(f"buffer_rows must be at least 2, got {buffer_rows}")
        if epochs is None and self.n_rows(exclude_special=exclude_special) == 0:
            # Else the endless loop below would never yield.
            but = (
                " but BOS/separator tokens; pass exclude_special=False to use them" if exclude_special else ""
            )
            raise StoreError(f"the store at {self.root} has no rows to draw from{but}")
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            keep = buffer_rows // 2
            buf = np.empty(0, dtype=np.int64)
            for s in rng.permutation(self.n_shards):
                ids = self._allowed(int(s), exclude_special, verify)
                for k in range(0, len(ids), keep):
                    buf = np.concatenate([buf, ids[k : k + keep]])
                    if len(buf) >= buffer_rows:
                        buf = buf[rng.permutation(len(buf))]
                        yield buf[: len(buf) - keep]
                        buf = buf[len(buf) - keep :]
            yield buf[rng.permutation(len(buf))]
            epoch += 1

    def batches(
        self,
        hook: str | Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        epochs: int | None = 1,
        buffer_rows: int = 1 << 18,
        exclude_special: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        verify: bool = True,
    ) -> Iterator[Float[Tensor, "batch d_in"] | tuple[Float[Tensor, "batch d_in"], ...]]:
        """Shuffled training batches read from the memory-mapped shards.

        Args:
            hook: one hook, or several read at the same rows (a tuple per batch, e.g. for transcoders).
            batch_size: rows per batch; a last partial batch is dropped, so every batch is full.
            seed: the shuffle's seed (see :meth:`row_order`); the same seed gives the same batches.
            start_step: skip this many batches, to resume training at that step.
            epochs: passes over the store (None: forever, a new order each pass).
            buffer_rows: the shuffle buffer's size in rows.
            exclude_special: leave out BOS and separator rows, whose activations are outliers
                (attention sinks) rather than text.
            verify: check each shard's SHA-256 on its first read.
        """
        hooks = [hook] if isinstance(hook, str) else list(hook)
        for h in hooks:
            self._hook(h)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        skip = start_step * batch_size
        flat, at = np.empty(0, dtype=np.int64), 0
        order = self.row_order(
            seed=seed, epochs=epochs, buffer_rows=buffer_rows, exclude_special=exclude_special, verify=verify
        )
        for chunk in order:
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            flat, at = np.concatenate([flat[at:], chunk]), 0
            while len(flat) - at >= batch_size:
                rows, at = flat[at : at + batch_size], at + batch_size
                out = tuple(self.read(h, rows, dtype=dtype, verify=verify).to(device) for h in hooks)
                yield out[0] if isinstance(hook, str) else out
