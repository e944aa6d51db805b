"""Point lookups in a Parquet file sorted by a key: read only the row groups that can hold the key.

The feature tables are sorted by feature id, so each row group covers an id range, recorded in the
file footer as the key column's min/max statistics. :class:`KeyedParquet` parses the footer once,
keeps those ranges as two sorted arrays, and answers "rows with key == i" by binary search and one
``read_row_group``: about a millisecond, independent of the number of features. (DuckDB prunes row
groups by the same statistics but schedules a scan task per row group per query, which costs more
than the read itself for point lookups; it remains the engine for SQL, filters and sorting.)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class KeyedParquet:
    """One Parquet file sorted by ``key``, opened for point lookups (thread-safe)."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key
        self._file = pq.ParquetFile(self.path)
        md = self._file.metadata
        col = self._file.schema_arrow.get_field_index(key)
        stats = [md.row_group(g).column(col).statistics for g in range(md.num_row_groups)]
        if any(s is None or not s.has_min_max for s in stats):  # not written by mechscope: read it all
            self._min = np.full(md.num_row_groups, np.iinfo(np.int64).min)
            self._max = np.full(md.num_row_groups, np.iinfo(np.int64).max)
        else:
            self._min = np.array([s.min for s in stats], dtype=np.int64)
            self._max = np.array([s.max for s in stats], dtype=np.int64)
        self._lock = threading.Lock()  # one file handle: reads are serialised

    @property
    def num_rows(self) -> int:
        """Rows in the file (from its footer)."""
        return self._file.metadata.num_rows

    def _groups(self, key: int) -> range:
        """Row groups whose [min, max] holds ``key`` (contiguous, since the file is sorted)."""
        return range(
            int(np.searchsorted(self._max, key, "left")), int(np.searchsorted(self._min, key, "right"))
        )

    def rows(self, key: int, columns: Sequence[str] | None = None) -> pa.Table:
        """The rows with ``key``, in file order."""
        return self.rows_in([key], columns)

    def rows_in(self, keys: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """The rows whose key is in ``keys``, in file order (each row group read once)."""
        cols = None if columns is None else list(dict.fromkeys([self.key, *columns]))
        groups = sorted({g for k in keys for g in self._groups(int(k))})
        with self._lock:
            parts = [self._file.read_row_group(g, columns=cols) for g in groups]
        if not parts:
            return self._file.schema_arrow.empty_table().select(cols or self._file.schema_arrow.names)
        table = pa.concat_tables(parts)
        return table.filter(
            pc.is_in(table[self.key], pa.array(list(keys), table.schema.field(self.key).type))
        )

    def close(self) -> None:
        self._file.close()
