"""The database layer on its own: a synthetic 100k-feature database written straight to the documented
schema, point lookups that read one row group (timed), paging, filters, explanations, plain SQL."""

from __future__ import annotations

import json
import re
import statistics
import time

import numpy as np
import pyarrow as pa
import pytest

from mechscope.features import SCHEMAS, FeatureDB, FeatureDBError, UnknownFeatureError, write_database
from mechscope.features.tables import FORMAT_VERSION, META_FILE

F, PER, W, V = 100_000, 3, 24, 500  # features, examples per feature, tokens per window, vocabulary


def _lists(values: np.ndarray, width: int, dtype) -> pa.Array:
    offsets = pa.array(np.arange(0, values.size + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), dtype))


def synthetic_tables(rng: np.random.Generator, F: int = F) -> dict[str, pa.Table]:
    ids = np.arange(F)
    density = rng.uniform(0, 0.1, F)
    n_ex = F * PER
    feature = np.repeat(ids, PER)
    tokens = rng.integers(0, V, (n_ex, W))
    acts = rng.random((n_ex, W), dtype=np.float32)
    return {
        "features": pa.table(
            {
                "id": ids,
                "density": density,
                "n_firing": (density * 1e6).astype(np.int64),
                "mean": density * 0.5,
                "mean_firing": np.full(F, 0.5),
                "max": acts.reshape(F, -1).max(1),
                "histogram": _lists(rng.integers(0, 100, (F, 66)), 66, pa.int64()),
                "explanation": [f"feature {i} about {'cats' if i % 1000 == 0 else 'dogs'}" for i in ids],
                "score": rng.random(F),
            }
        ),
        "examples": pa.table(
            {
                "feature": feature,
                "kind": np.where(np.arange(n_ex) % PER == 0, "top", "quantile"),
                "interval": pa.array(np.arange(n_ex) % PER - 1, mask=np.arange(n_ex) % PER == 0),
                "rank": np.zeros(n_ex, dtype=np.int32),
                "value": acts.max(1),
                "context": rng.integers(0, 10**6, n_ex),
                "position": np.full(n_ex, 20),
                "window_start": np.zeros(n_ex, dtype=np.int32),
                "tokens": _lists(tokens, W, pa.int32()),
                "activations": _lists(acts, W, pa.float32()),
                "document": np.zeros(n_ex, dtype=np.int32),
                "source": ["synthetic"] * n_ex,
                "token_offset": np.zeros(n_ex, dtype=np.int32),
                "char_offset": np.zeros(n_ex, dtype=np.int32),
            }
        ),
        "logits": pa.table(
            {
                "feature": np.repeat(ids, 4),
                "kind": np.tile(["promoted", "promoted", "suppressed", "suppressed"], F),
                "rank": np.tile([0, 1, 0, 1], F),
                "token": rng.integers(0, V, 4 * F),
                "token_str": ["t"] * (4 * F),
                "value": rng.standard_normal(4 * F).astype(np.float32),
            }
        ),
        "neighbours": pa.table(
            {
                "feature": np.repeat(ids, 3),
                "rank": np.tile([0, 1, 2], F),
                "neighbour": rng.integers(0, F, 3 * F),
                "cosine": rng.random(3 * F, dtype=np.float32),
            }
        ),
        "vocab": pa.table({"token": np.arange(V), "str": [f"<{i}>" for i in range(V)]}),
    }


def meta() -> dict:
    return {
        "model": "synthetic",
        "model_fingerprint": "0" * 64,
        "source": {"kind": "sae", "hook": "blocks.0.hook_resid_post", "n_features": F, "sae_kind": "topk"},
        "config": {"n_quantiles": PER - 1},
        "n_features": F,
        "n_tokens": 10**6,
        "hist_edges": list(np.logspace(-4, 4, 65)),
    }


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> FeatureDB:
    root = tmp_path_factory.mktemp("big")
    write_database(root, synthetic_tables(np.random.default_rng(0)), meta())
    return FeatureDB.open(root)


def test_point_lookups_read_one_row_group(big):
    """``feature(i)`` must not scan the tables: it is timed against a query that reads all of ``examples``."""
    ids = np.random.default_rng(1).integers(0, F, 25).tolist()
    big.feature(0)  # warm: vocab, parquet footers
    times = []
    for i in ids:
        t = time.perf_counter()
        rec = big.feature(i)
        times.append(time.perf_counter() - t)
        assert rec.id == i and len(rec.top) == 1 and sum(map(len, rec.quantiles)) == PER - 1
        assert rec.top[0].strs == [f"<{t}>" for t in rec.top[0].tokens]
    t = time.perf_counter()
    big.sql("SELECT sum(list_sum(activations)) FROM examples")
    scan = time.perf_counter() - t
    lookup = statistics.median(times)
    assert lookup < 0.25 and lookup < scan / 3


def test_row_groups_are_sorted_by_feature(big):
    import pyarrow.parquet as pq

    md = pq.ParquetFile(big.path / "examples.parquet").metadata
    assert md.num_row_groups > 100
    stats = [md.row_group(g).column(0).statistics for g in range(md.num_row_groups)]
    assert all(a.max <= b.min for a, b in zip(stats, stats[1:], strict=False))


def test_paging_filters_and_ordering(big):
    page = big.features(order_by="density", descending=True, min_density=0.05, limit=10, offset=5)
    densities = [r.density for r in page]
    assert len(page) == 10 and densities == sorted(densities, reverse=True) and min(densities) >= 0.05
    want = big.sql(
        "SELECT id FROM features WHERE density >= 0.05 ORDER BY density DESC, id LIMIT 10 OFFSET 5"
    )
    assert [r.id for r in page] == want.column("id").to_pylist()
    assert (
        big.count(min_density=0.05, max_density=0.06)
        == big.sql("SELECT count(*) AS n FROM features WHERE density BETWEEN 0.05 AND 0.06")
        .column("n")[0]
        .as_py()
    )
    assert [r.id for r in big.features(limit=3)] == [0, 1, 2]


def test_search_explanations(big):
    hits = big.search_explanations("CATS about", limit=1000)
    assert len(hits) == F // 1000 and all("cats" in h.explanation for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert big.search_explanations("100%_") == []  # LIKE wildcards are literal
    assert big.search_explanations("   ") == []


def test_plain_sql_sees_the_documented_schema(big):
    for name, schema in SCHEMAS.items():
        cols = big.sql(f"DESCRIBE {name}").column("column_name").to_pylist()
        assert cols == schema.names, name
    top = big.sql(
        "SELECT e.feature, v.str FROM examples e, vocab v WHERE e.feature = 7 AND e.kind = 'top' "
        "AND v.token = e.tokens[1]"
    ).to_pylist()
    assert top == [{"feature": 7, "str": big.feature(7).top[0].strs[0]}]


def test_explanations_can_be_set(tmp_path):
    rng = np.random.default_rng(2)
    write_database(tmp_path, synthetic_tables(rng, 50), {**meta(), "n_features": 50})
    db = FeatureDB.open(tmp_path)
    db.set_explanations({3: "the word 'cat' in 50% of_cases"}, scores={3: 0.9})
    rec = db.feature(3)
    assert rec.explanation == "the word 'cat' in 50% of_cases" and rec.score == 0.9
    assert [h.id for h in db.search_explanations("50% of_")] == [3]
    with pytest.raises(UnknownFeatureError):
        db.set_explanations({50: "x"})


def test_broken_databases_are_refused(tmp_path, big):
    write_database(tmp_path, synthetic_tables(np.random.default_rng(3), 10), {**meta(), "n_features": 10})
    meta_file = tmp_path / META_FILE
    data = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**data, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(FeatureDBError, match="upgrade mechscope"):
        FeatureDB.open(tmp_path)
    meta_file.write_text(json.dumps(data))
    (tmp_path / "logits.parquet").unlink()
    with pytest.raises(FeatureDBError, match="lacks logits.parquet"):
        FeatureDB.open(tmp_path)
    with pytest.raises(ValueError, match="needs columns"):
        bad = {**synthetic_tables(np.random.default_rng(4), 10), "vocab": pa.table({"token": [1]})}
        write_database(tmp_path, bad, meta())


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        ("features.parquet", "features.parquet is damaged"),
        ("examples.parquet", "examples.parquet is damaged"),
        ("vocab.parquet", "vocab.parquet"),
        ("meta-list", "not a JSON object"),
        ("meta-no-n_features", "has no n_features"),
        ("meta-more-features", "has 10 rows, but"),
    ],
)
def test_damaged_databases_are_refused_naming_the_damage(tmp_path, damage, words):
    """A table cut short (an interrupted copy) or a meta.json that does not match the tables is a
    FeatureDBError when opened, never a pyarrow / DuckDB / KeyError later."""
    write_database(tmp_path, synthetic_tables(np.random.default_rng(5), 10), {**meta(), "n_features": 10})
    meta_file = tmp_path / META_FILE
    data = json.loads(meta_file.read_text())
    if damage.endswith(".parquet"):
        path = tmp_path / damage
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "meta-list":
        meta_file.write_text("[]")
    elif damage == "meta-no-n_features":
        meta_file.write_text(json.dumps({k: v for k, v in data.items() if k != "n_features"}))
    else:
        meta_file.write_text(json.dumps({**data, "n_features": 12}))
    with pytest.raises(FeatureDBError, match=re.escape(words)):
        FeatureDB.open(tmp_path)
