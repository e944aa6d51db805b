"""The on-disk form of a feature database: five Parquet tables and ``meta.json`` in one directory.

The schema (also in ``docs/features.md``)::

    features    id int32, density float64, n_firing int64, mean float64, mean_firing float64,
                max float32, histogram list<int64>, explanation string, score float64
    examples    feature int32, kind string ('top' | 'quantile'), interval int32, rank int32,
                value float32, context int64, position int32, window_start int32,
                tokens list<int32>, activations list<float32>,
                document int32, source string, token_offset int32, char_offset int32
    logits      feature int32, kind string ('promoted' | 'suppressed'), rank int32, token int32,
                token_str string, value float32
    neighbours  feature int32, rank int32, neighbour int32, cosine float32
    vocab       token int32, str string

Every table is sorted by its first column and written in row groups of a few thousand rows, so
Parquet's per-row-group min/max statistics let DuckDB read only the row group holding one feature:
a lookup costs the same with 1k or 1M features. Files are written atomically (temporary file,
fsync, rename), ``meta.json`` last: a directory with ``meta.json`` is a complete database.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mechscope.models.errors import MechscopeError
from mechscope.saes.formats.native import write_json_atomic

FORMAT = "mechscope.features"
FORMAT_VERSION = 1
META_FILE = "meta.json"


class FeatureDBError(MechscopeError, ValueError):
    """A feature database that is missing, incomplete, corrupt, or of another format version."""


class IncompatibleFeatureDBError(MechscopeError, ValueError):
    """A feature database (or a build to resume) made with another model, SAE, corpus or config."""


class UnknownFeatureError(MechscopeError, IndexError):
    """A feature id outside ``0 .. n_features - 1``."""


_LIST_I32, _LIST_F32 = pa.list_(pa.int32()), pa.list_(pa.float32())
SCHEMAS: dict[str, pa.Schema] = {
    "features": pa.schema(
        [
            ("id", pa.int32()),
            ("density", pa.float64()),
            ("n_firing", pa.int64()),
            ("mean", pa.float64()),
            ("mean_firing", pa.float64()),
            ("max", pa.float32()),
            ("histogram", pa.list_(pa.int64())),
            ("explanation", pa.string()),
            ("score", pa.float64()),
        ]
    ),
    "examples": pa.schema(
        [
            ("feature", pa.int32()),
            ("kind", pa.string()),
            ("interval", pa.int32()),
            ("rank", pa.int32()),
            ("value", pa.float32()),
            ("context", pa.int64()),
            ("position", pa.int32()),
            ("window_start", pa.int32()),
            ("tokens", _LIST_I32),
            ("activations", _LIST_F32),
            ("document", pa.int32()),
            ("source", pa.string()),
            ("token_offset", pa.int32()),
            ("char_offset", pa.int32()),
        ]
    ),
    "logits": pa.schema(
        [
            ("feature", pa.int32()),
            ("kind", pa.string()),
            ("rank", pa.int32()),
            ("token", pa.int32()),
            ("token_str", pa.string()),
            ("value", pa.float32()),
        ]
    ),
    "neighbours": pa.schema(
        [("feature", pa.int32()), ("rank", pa.int32()), ("neighbour", pa.int32()), ("cosine", pa.float32())]
    ),
    "vocab": pa.schema([("token", pa.int32()), ("str", pa.string())]),
}
SORT_KEYS = {
    "features": ["id"],
    "examples": ["feature", "kind", "interval", "rank"],
    "logits": ["feature", "kind", "rank"],
    "neighbours": ["feature", "rank"],
    "vocab": ["token"],
}
# Rows per row group: small enough that a point lookup decodes little, large enough to keep the
# footer small (examples rows carry ~25-token lists, hence fewer of them).
ROW_GROUP = {"features": 1024, "examples": 512, "logits": 2048, "neighbours": 2048, "vocab": 65536}


def table_path(root: str | Path, name: str) -> Path:
    return Path(root) / f"{name}.parquet"


def write_table(root: str | Path, name: str, table: pa.Table) -> Path:
    """Cast ``table`` to the schema of ``name``, sort it, and write it atomically."""
    schema = SCHEMAS[name]
    if set(table.column_names) != set(schema.names):
        raise ValueError(f"table {name!r} needs columns {schema.names}, got {table.column_names}")
    table = table.select(schema.names).cast(schema).sort_by([(k, "ascending") for k in SORT_KEYS[name]])
    path = table_path(root, name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP[name], compression="zstd", write_statistics=True)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_database(root: str | Path, tables: dict[str, pa.Table], meta: dict[str, Any]) -> Path:
    """Write every table of :data:`SCHEMAS`, then ``meta.json`` (format and version added): a complete DB."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    missing = sorted(set(SCHEMAS) - set(tables))
    if missing:
        raise ValueError(f"a feature database needs the tables {sorted(SCHEMAS)}; missing {missing}")
    for name in SCHEMAS:
        write_table(root, name, tables[name])
    write_json_atomic(root / META_FILE, {"format": FORMAT, "format_version": FORMAT_VERSION, **meta})
    return root
