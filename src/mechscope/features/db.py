"""Read a feature database: DuckDB views over its Parquet tables, and the queries dashboards need.

A database is a directory written by :func:`~mechscope.features.build.build_features`::

    meta.json           format, version, model name + fingerprint, source (SAE config + weights
                        SHA-256, or the neuron layer), corpus, config, token counts, histogram edges
    features.parquet    one row per feature: density, mean, max, histogram, explanation, score
    examples.parquet    top-k contexts and quantile samples: token windows with per-token activations
    logits.parquet      promoted / suppressed tokens per feature
    neighbours.parquet  nearest features by decoder cosine
    vocab.parquet       token id -> string

(columns: :mod:`mechscope.features.tables` and ``docs/features.md``). ``FeatureDB.open`` makes
an in-memory DuckDB connection with one view per table, so plain SQL works
(``db.sql("SELECT id, max FROM features WHERE density < 1e-3 ORDER BY max DESC LIMIT 5")``); listing,
filtering and searching run in DuckDB. Nothing is loaded up front: one feature's dashboard
(:meth:`FeatureDB.feature`) reads only the row group holding it in each table
(:mod:`mechscope.features.lookup`), a few milliseconds whether the database holds 1k or 1M
features. Queries are thread-safe (a cursor per SQL query, a lock per file), so one ``FeatureDB``
can serve a web server's threads.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from mechscope.features.lookup import KeyedParquet
from mechscope.features.records import (
    Example,
    FeatureRecord,
    FeatureSummary,
    Neighbour,
    TokenEffect,
    _none_if_nan,
)
from mechscope.features.tables import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SCHEMAS,
    FeatureDBError,
    IncompatibleFeatureDBError,
    UnknownFeatureError,
    table_path,
    write_table,
)

ORDERABLE = ("id", "density", "n_firing", "mean", "mean_firing", "max", "score")
"""Columns :meth:`FeatureDB.features` can order by."""


class FeatureDB:
    """A feature database opened for queries. Use :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.meta = meta
        self.n_features: int = int(meta["n_features"])
        self._con = duckdb.connect(":memory:")
        # Keep each file's footer (row-group statistics) in memory: a point lookup then decodes only the
        # row group holding the feature instead of re-reading the footer first.
        self._con.execute("SET parquet_metadata_cache = true")
        self._lookups = {
            name: _keyed(path, name) for name in ("features", "examples", "logits", "neighbours")
        }
        self._lock = threading.Lock()
        self._vocab: list[str] | None = None
        for name in SCHEMAS:
            file = str(table_path(path, name)).replace("'", "''")
            self._con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{file}')")

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, model=None, sae=None) -> FeatureDB:
        """Open the database in ``path``; with ``model`` / ``sae``, refuse one built from others.

        Raises:
            FeatureDBError: not a (complete) feature database, or another format version.
            IncompatibleFeatureDBError: built with another model (fingerprint) or SAE (weights SHA-256),
                or for neurons when an SAE is given.
        """
        root = Path(path)
        meta_file = root / META_FILE
        if not meta_file.is_file():
            hint = " (a build was interrupted: re-run it to finish)" if (root / "checkpoint").is_dir() else ""
            raise FeatureDBError(f"{root} is not a feature database: no {META_FILE}{hint}")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FeatureDBError(f"{meta_file} is not valid JSON ({e})") from e
        if not isinstance(meta, dict):
            raise FeatureDBError(f"{meta_file} is not a mechscope feature database (not a JSON object)")
        if meta.get("format") != FORMAT:
            raise FeatureDBError(
                f"{meta_file} is not a mechscope feature database (format {meta.get('format')!r})"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise FeatureDBError(
                f"{root} has format_version {meta.get('format_version')!r}; this mechscope reads "
                f"{FORMAT_VERSION}: rebuild it with `mechscope features build` or upgrade mechscope"
            )
        missing = [n for n in SCHEMAS if not table_path(root, n).is_file()]
        if missing:
            raise FeatureDBError(
                f"{root} lacks {', '.join(f'{n}.parquet' for n in missing)}: copy the whole directory"
            )
        _check_compatible(root, meta, model, sae)
        if isinstance(meta.get("n_features"), bool) or not isinstance(meta.get("n_features"), int):
            raise FeatureDBError(f"{meta_file} has no n_features: rebuild the database or copy it again")
        # A table cut short (a copy interrupted, a full disk) or from another database: refuse it here,
        # naming it, rather than fail later on a query.
        try:
            db = cls(root, meta)
        except duckdb.Error as e:  # vocab.parquet, the table only DuckDB reads (its message names the file)
            raise FeatureDBError(f"{root} is damaged ({e}): rebuild it or copy it again") from e
        rows = db._lookups["features"].num_rows
        if rows != db.n_features:
            db.close()
            raise FeatureDBError(
                f"{table_path(root, 'features')} has {rows} rows, but {meta_file} says {db.n_features} "
                "features: the tables come from different databases; rebuild it or copy it again"
            )
        return db

    def close(self) -> None:
        self._con.close()
        for lookup in self._lookups.values():
            lookup.close()

    def __enter__(self) -> FeatureDB:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        src = self.meta.get("source", {})
        return f"FeatureDB({str(self.path)!r}, {self.n_features} {src.get('kind', '')} features at {src.get('hook')})"

    @property
    def title(self) -> str:
        src = self.meta.get("source", {})
        what = "neurons" if src.get("kind") == "neurons" else f"{src.get('sae_kind', '')} SAE latents"
        return f"{self.meta.get('model', '')} · {src.get('hook', '')} · {self.n_features} {what}"

    # ------------------------------------------------------------------ queries
    def _rows(self, query: str, params: list | None = None) -> list[tuple]:
        with self._lock:
            cur = self._con.cursor()  # a cursor per query: safe to call from several threads
        try:
            return cur.execute(query, params or []).fetchall()
        finally:
            cur.close()

    def sql(self, query: str, params: list | None = None) -> pa.Table:
        """Run plain SQL over the views ``features``, ``examples``, ``logits``, ``neighbours``, ``vocab``.

        Returns a pyarrow Table (``.to_pylist()`` for dicts, ``.to_pandas()`` for a data frame).
        """
        with self._lock:
            cur = self._con.cursor()
        try:
            rel = cur.sql(query, params=params or None)
            if rel is None:  # a statement that returns no rows
                return pa.table({})
            # duckdb 2 renamed the relation's arrow() to to_arrow_table()
            return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.arrow()
        finally:
            cur.close()

    def check_id(self, i: int) -> int:
        """``i`` as an int, or UnknownFeatureError when it is not a feature of this database."""
        if isinstance(i, bool) or not isinstance(i, int) and not hasattr(i, "__index__"):
            raise UnknownFeatureError(f"a feature id is an integer, got {i!r}")
        i = int(i)
        if not 0 <= i < self.n_features:
            raise UnknownFeatureError(
                f"feature {i} does not exist: this database has {self.n_features} features (0..{self.n_features - 1})"
            )
        return i

    def vocab(self) -> list[str]:
        """Token id -> string, loaded once."""
        if self._vocab is None:
            self._vocab = pq.read_table(table_path(self.path, "vocab"), columns=["str"]).column(0).to_pylist()
        return self._vocab

    def feature(self, i: int) -> FeatureRecord:
        """Everything for feature ``i``'s dashboard.

        Raises:
            UnknownFeatureError: ``i`` is not in ``0 .. n_features - 1``.
        """
        i = self.check_id(i)
        f = self._lookups["features"].rows(i).to_pylist()[0]
        vocab = self.vocab()
        top: list[Example] = []
        quantiles: list[list[Example]] = [[] for _ in range(int(self.meta["config"]["n_quantiles"]))]
        for r in self._lookups["examples"].rows(i).to_pylist():  # file order: kind, interval, rank
            del r["feature"]
            ex = Example(**r, strs=[vocab[t] for t in r["tokens"]])
            (top if ex.kind == "top" else quantiles[ex.interval]).append(ex)
        effects: dict[str, list[TokenEffect]] = {"promoted": [], "suppressed": []}
        for r in self._lookups["logits"].rows(i).to_pylist():
            effects[r["kind"]].append(TokenEffect(r["token"], r["token_str"], r["value"]))
        near = self._lookups["neighbours"].rows(i).to_pylist()
        ids = [r["neighbour"] for r in near]
        expl = self._lookups["features"].rows_in(ids, ["explanation"]).to_pydict() if ids else {"id": []}
        named = dict(zip(expl["id"], expl.get("explanation", []), strict=True))
        return FeatureRecord(
            id=i,
            density=f["density"],
            n_firing=f["n_firing"],
            mean=f["mean"],
            mean_firing=_none_if_nan(f["mean_firing"]),
            max=f["max"],
            histogram=f["histogram"],
            hist_edges=list(self.meta["hist_edges"]),
            explanation=f["explanation"],
            score=_none_if_nan(f["score"]),
            top=top,
            quantiles=quantiles,
            promoted=effects["promoted"],
            suppressed=effects["suppressed"],
            neighbours=[Neighbour(r["neighbour"], r["cosine"], named.get(r["neighbour"])) for r in near],
            title=self.title,
        )

    @staticmethod
    def _where(min_density: float | None, max_density: float | None) -> tuple[str, list]:
        clauses, params = [], []
        if min_density is not None:
            clauses.append("density >= ?")
            params.append(float(min_density))
        if max_density is not None:
            clauses.append("density <= ?")
            params.append(float(max_density))
        return " AND ".join(clauses), params

    def features(
        self,
        *,
        order_by: str = "id",
        descending: bool = False,
        min_density: float | None = None,
        max_density: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[FeatureSummary]:
        """A page of features, filtered by density and ordered by one of :data:`ORDERABLE` (then id)."""
        if order_by not in ORDERABLE:
            raise ValueError(f"order_by must be one of {ORDERABLE}, got {order_by!r}")
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0, got {limit} and {offset}")
        where, params = self._where(min_density, max_density)
        direction = "DESC NULLS LAST" if descending else "ASC NULLS LAST"
        rows = self._rows(
            "SELECT id, density, mean, max, explanation, score FROM features"
            + (f" WHERE {where}" if where else "")
            + f" ORDER BY {order_by} {direction}, id LIMIT ? OFFSET ?",
            [*params, int(limit), int(offset)],
        )
        return [FeatureSummary(r[0], r[1], r[2], r[3], r[4], _none_if_nan(r[5])) for r in rows]

    def summaries(self, ids: list[int]) -> list[FeatureSummary]:
        """The summary rows of ``ids``, in the order given (point lookups: fast for any database size)."""
        ids = [self.check_id(i) for i in ids]
        cols = ["density", "mean", "max", "explanation", "score"]
        by_id = {r["id"]: r for r in self._lookups["features"].rows_in(ids, cols).to_pylist()}
        return [
            FeatureSummary(i, *(by_id[i][c] for c in cols[:-1]), _none_if_nan(by_id[i]["score"])) for i in ids
        ]

    def count(self, *, min_density: float | None = None, max_density: float | None = None) -> int:
        """How many features pass the density filter (for paging :meth:`features`)."""
        where, params = self._where(min_density, max_density)
        return self._rows("SELECT count(*) FROM features" + (f" WHERE {where}" if where else ""), params)[0][
            0
        ]

    def search_explanations(
        self,
        text: str,
        *,
        limit: int = 50,
        min_density: float | None = None,
        max_density: float | None = None,
    ) -> list[FeatureSummary]:
        """Features whose explanation contains every word of ``text`` (case-insensitive), best score first."""
        words = text.split()
        if not words:
            return []
        where, params = self._where(min_density, max_density)
        like = " AND ".join(["explanation ILIKE ? ESCAPE '\\'"] * len(words))
        escaped = ["%" + w.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%" for w in words]
        rows = self._rows(
            f"SELECT id, density, mean, max, explanation, score FROM features WHERE explanation IS NOT NULL "
            f"AND {like}"
            + (f" AND {where}" if where else "")
            + " ORDER BY score DESC NULLS LAST, id LIMIT ?",
            [*escaped, *params, int(limit)],
        )
        return [FeatureSummary(r[0], r[1], r[2], r[3], r[4], _none_if_nan(r[5])) for r in rows]

    def set_explanations(self, explanations: dict[int, str], scores: dict[int, float] | None = None) -> None:
        """Store explanations (and scores) for some features; rewrites ``features.parquet`` atomically."""
        scores = scores or {}
        for i in [*explanations, *scores]:
            self.check_id(i)
        table = pq.read_table(table_path(self.path, "features"))
        expl = table.column("explanation").to_pylist()
        score = table.column("score").to_pylist()
        for i, text in explanations.items():
            expl[int(i)] = text
        for i, s in scores.items():
            score[int(i)] = float(s)
        table = table.set_column(
            table.schema.get_field_index("explanation"), "explanation", pa.array(expl, pa.string())
        )
        table = table.set_column(
            table.schema.get_field_index("score"), "score", pa.array(score, pa.float64())
        )
        with self._lock:
            write_table(self.path, "features", table)
            self._lookups["features"].close()  # the file was replaced: read the new one
            self._lookups["features"] = KeyedParquet(table_path(self.path, "features"), "id")


def _keyed(root: Path, name: str) -> KeyedParquet:
    """Table ``name`` opened for point lookups; FeatureDBError naming it if it is not a whole Parquet file."""
    path = table_path(root, name)
    try:
        return KeyedParquet(path, SCHEMAS[name].names[0])
    except (OSError, pa.ArrowException) as e:
        raise FeatureDBError(f"{path} is damaged ({e}): rebuild the database or copy it again") from e


def _check_compatible(root: Path, meta: dict[str, Any], model, sae) -> None:
    if model is not None:
        from mechscope.saes.harvest import model_fingerprint

        if model_fingerprint(model) != meta.get("model_fingerprint"):
            raise IncompatibleFeatureDBError(
                f"{root} was built with the model {meta.get('model')!r}, whose weights differ from "
                f"{model.name or 'the model given'!r} (fingerprints differ); open it with that model or "
                "rebuild it with `mechscope features build`"
            )
    if sae is not None:
        from mechscope.features.sources import sae_sha256

        src = meta.get("source", {})
        if src.get("kind") != "sae":
            raise IncompatibleFeatureDBError(
                f"{root} holds the neurons of {src.get('hook')}, not SAE latents; open it without sae="
            )
        if sae_sha256(sae) != src.get("sae_sha256"):
            raise IncompatibleFeatureDBError(
                f"{root} was built with another SAE ({src.get('sae_kind')} at {src.get('hook')}, "
                f"{src.get('n_features')} latents): its weights or config differ from the SAE given; "
                "rebuild the database for this SAE"
            )
