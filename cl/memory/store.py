"""Typed metadata of the memory's entries in SQLite: one row per vector, keyed by its id.

The columns a strategy filters on are typed (``kind``, ``experience``, ``class``, ``adapter``); any
other keys of an entry's dict go to a JSON ``extra`` column. The live table is an in-memory database,
so the files on disk only ever change through ``ExperienceMemory.save`` (which copies it with SQLite's
online backup); the vectors live in the FAISS indexes, one per kind.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cl.errors import CheckpointError, ConfigError, DataError

KINDS: tuple[str, ...] = ("exemplar", "adapter_key", "prototype", "task")
"""What an entry is: a stored sample's features, a routing key of an adapter, a class prototype, a task."""

COLUMNS: tuple[str, ...] = ("kind", "experience", "class", "adapter")
"""Metadata keys stored as typed, indexed columns; every other key goes to the JSON ``extra`` column."""

FILTERS: tuple[str, ...] = ("experience", "class", "adapter")
"""Keyword filters of ``search``/``entries``/``count`` (``class_`` is accepted for ``class``)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    experience INTEGER,
    class INTEGER,
    adapter,            -- no type affinity: an adapter id is kept as given, str or int
    extra TEXT          -- JSON object of the other keys, NULL when there are none
);
CREATE INDEX IF NOT EXISTS entries_kind_experience ON entries(kind, experience);
CREATE INDEX IF NOT EXISTS entries_kind_class ON entries(kind, class);
CREATE INDEX IF NOT EXISTS entries_kind_adapter ON entries(kind, adapter);
"""
_SELECT = "SELECT id, kind, experience, class, adapter, extra FROM entries"


def check_kind(kind: str) -> str:
    """``kind`` if it is one of KINDS, else ConfigError with a suggestion."""
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown memory kind {kind!r}{hint} (kinds: {', '.join(KINDS)})")
    return kind


def normalize_filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    """``filters`` with ``class_`` renamed to ``class``; unknown names raise ConfigError."""
    out: dict[str, Any] = {}
    for key, value in filters.items():
        name = "class" if key == "class_" else key
        if name not in FILTERS:
            close = difflib.get_close_matches(key, (*FILTERS, "class_"), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown memory filter {key!r}{hint} (filters: experience, class (or class_), adapter; "
                "pass the kind as kind=...)"
            )
        out[name] = value
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def _as_int(value: Any, row: int, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"metadata row {row}: {key!r} must be an int or None, got {value!r}")
    return int(value)


def encode_rows(ids: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
    """Validated SQLite rows ``(id, kind, experience, class, adapter, extra_json)``, one per dict."""
    rows = []
    for i, (id_, meta) in enumerate(zip(ids.tolist(), metadata, strict=True)):
        if not isinstance(meta, Mapping):
            raise DataError(
                f"metadata row {i} is a {type(meta).__name__}, expected a dict like {{'kind': 'prototype'}}"
            )
        if "kind" not in meta:
            raise DataError(f"metadata row {i} has no 'kind' (one of {', '.join(KINDS)})")
        kind = meta["kind"]
        if kind not in KINDS:
            close = difflib.get_close_matches(str(kind), KINDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(f"metadata row {i}: unknown kind {kind!r}{hint} (kinds: {', '.join(KINDS)})")
        adapter = meta.get("adapter")
        if isinstance(adapter, np.integer):
            adapter = int(adapter)
        if adapter is not None and (isinstance(adapter, bool) or not isinstance(adapter, (str, int))):
            raise DataError(f"metadata row {i}: 'adapter' must be a str, an int or None, got {adapter!r}")
        extra = {k: v for k, v in meta.items() if k not in COLUMNS}
        try:
            extra_json = json.dumps(extra, default=_json_default) if extra else None
        except (TypeError, ValueError) as e:
            raise DataError(f"metadata row {i}: extra keys must be JSON-serializable ({e})") from None
        rows.append(
            (id_, kind, _as_int(meta.get("experience"), i, "experience"), _as_int(meta.get("class"), i, "class"),
             adapter, extra_json)
        )
    return rows


def _decode(row: tuple[Any, ...]) -> dict[str, Any]:
    meta = {"kind": row[1], "experience": row[2], "class": row[3], "adapter": row[4]}
    if row[5] is not None:
        meta.update(json.loads(row[5]))
    return meta


def _where(kinds: Sequence[str] | None, filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause for kinds and column filters; a filter value may be a scalar, None or a list."""
    clauses, params = [], []
    if kinds is not None:
        clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
        params += list(kinds)
    for col, value in filters.items():
        if value is None:
            clauses.append(f'"{col}" IS NULL')
            continue
        values = list(value) if isinstance(value, (list, tuple, set, frozenset, np.ndarray)) else [value]
        values = [v.item() if isinstance(v, np.generic) else v for v in values]
        clauses.append(f'"{col}" IN ({", ".join("?" * len(values))})')
        params += values
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _id_list(ids: np.ndarray) -> str:
    return json.dumps(ids.tolist())


class MetadataStore:
    """The ``entries`` table in an in-memory SQLite database."""

    def __init__(self, conn: sqlite3.Connection | None = None) -> None:
        self.conn = conn or sqlite3.connect(":memory:")
        self.conn.executescript(_SCHEMA)

    def insert(self, rows: list[tuple[Any, ...]]) -> None:
        with self.conn:
            self.conn.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", rows)

    def ids(self, kinds: Sequence[str] | None = None, filters: Mapping[str, Any] | None = None) -> np.ndarray:
        """Ids (sorted) of the entries of ``kinds`` that match ``filters``."""
        where, params = _where(kinds, filters or {})
        cur = self.conn.execute(f"SELECT id FROM entries{where} ORDER BY id", params)
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def count(self, kinds: Sequence[str] | None = None, filters: Mapping[str, Any] | None = None) -> int:
        where, params = _where(kinds, filters or {})
        return int(self.conn.execute(f"SELECT COUNT(*) FROM entries{where}", params).fetchone()[0])

    def kind_counts(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT kind, COUNT(*) FROM entries GROUP BY kind").fetchall())

    def kinds_of(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The given ids grouped by kind; ids not in the table raise DataError."""
        rows = self.conn.execute(
            "SELECT id, kind FROM entries WHERE id IN (SELECT value FROM json_each(?))", (_id_list(ids),)
        ).fetchall()
        _check_found(ids, {r[0] for r in rows})
        groups: dict[str, list[int]] = {}
        for id_, kind in rows:
            groups.setdefault(kind, []).append(id_)
        return {k: np.array(sorted(v), dtype=np.int64) for k, v in groups.items()}

    def get(self, ids: Iterable[int], missing_ok: bool = False) -> dict[int, dict[str, Any]]:
        """Metadata dicts by id; an id not in the table raises DataError unless ``missing_ok``."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        rows = self.conn.execute(f"{_SELECT} WHERE id IN (SELECT value FROM json_each(?))", (_id_list(ids),))
        found = {r[0]: _decode(r) for r in rows}
        if not missing_ok:
            _check_found(ids, found)
        return found

    def select(self, kinds: Sequence[str] | None, filters: Mapping[str, Any]) -> tuple[np.ndarray, list[dict]]:
        """Ids (sorted) and metadata of the matching entries."""
        where, params = _where(kinds, filters)
        rows = self.conn.execute(f"{_SELECT}{where} ORDER BY id", params).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), [_decode(r) for r in rows]

    def delete(self, ids: np.ndarray) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM entries WHERE id IN (SELECT value FROM json_each(?))", (_id_list(ids),))

    def update(self, ids: np.ndarray, values: Mapping[str, Any]) -> None:
        """Set typed columns and merge extra keys (a None extra value deletes that key) on ``ids``."""
        if "kind" in values:
            raise DataError("an entry's kind cannot be updated (its vector lives in that kind's index); "
                            "remove it and add it again with the new kind")
        _check_found(ids, {r[0] for r in self.conn.execute(
            "SELECT id FROM entries WHERE id IN (SELECT value FROM json_each(?))", (_id_list(ids),))})
        probe = encode_rows(np.zeros(1, np.int64), [{"kind": KINDS[0], **values}])[0]
        sets, params = [], []
        for col, value in zip(COLUMNS[1:], probe[2:5], strict=True):
            if col in values:
                sets.append(f'"{col}" = ?')
                params.append(value)
        extra = {k: v for k, v in values.items() if k not in COLUMNS}
        if extra:
            sets.append("extra = NULLIF(json_patch(COALESCE(extra, '{}'), ?), '{}')")
            params.append(json.dumps(extra, default=_json_default))
        if sets:
            with self.conn:
                self.conn.execute(
                    f"UPDATE entries SET {', '.join(sets)} WHERE id IN (SELECT value FROM json_each(?))",
                    [*params, _id_list(ids)],
                )

    def save(self, file: Path) -> None:
        """Copy the table into a new SQLite file (online backup: a consistent snapshot)."""
        dest = sqlite3.connect(file)
        try:
            self.conn.backup(dest)
        finally:
            dest.close()

    @classmethod
    def load(cls, file: Path) -> MetadataStore:
        """Copy a saved SQLite file into a new in-memory store (opened read-only: loading never writes)."""
        conn = sqlite3.connect(":memory:")
        try:
            src = sqlite3.connect(sqlite_uri(file, mode="ro"), uri=True)
            try:
                src.backup(conn)
            finally:
                src.close()
            cols = [r[1] for r in conn.execute("PRAGMA table_info(entries)")]
        except sqlite3.DatabaseError as e:
            conn.close()
            raise CheckpointError(f"memory metadata {file} is not a readable SQLite database ({e})") from None
        if cols != ["id", *COLUMNS, "extra"]:
            conn.close()
            raise CheckpointError(f"memory metadata {file} has columns {cols}, expected {['id', *COLUMNS, 'extra']}")
        if (problem := _schema_problem(conn)) is not None:
            conn.close()
            raise CheckpointError(f"memory metadata {file} {problem}; it is corrupted or was not written by clagent")
        return cls(conn)


def _schema_problem(conn: sqlite3.Connection) -> str | None:
    """What a loaded database holds besides the entries table, its indexes and well-typed rows (None: nothing);
    a trigger or view would run SQL on later writes and reads, so none is kept."""
    expected = {("table", "entries"), *(("index", n) for n in re.findall(r"INDEX IF NOT EXISTS (\w+)", _SCHEMA))}
    found = set(conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())
    if extra := sorted(found - expected):  # a missing index is harmless: the store creates it again
        return f"holds {', '.join(f'{t} {n}' for t, n in extra)} besides the entries table and its indexes"
    kinds = ", ".join("?" * len(KINDS))
    bad = conn.execute(
        f"SELECT COUNT(*) FROM entries WHERE typeof(id) != 'integer' OR kind NOT IN ({kinds}) "
        "OR typeof(experience) NOT IN ('integer', 'null') OR typeof(class) NOT IN ('integer', 'null') "
        "OR typeof(adapter) NOT IN ('integer', 'text', 'null') "
        "OR (extra IS NOT NULL AND (NOT json_valid(extra) OR json_type(extra) != 'object'))", KINDS,
    ).fetchone()[0]
    return f"has {bad} malformed rows (kind, types or extra JSON)" if bad else None


def sqlite_uri(file: str | Path, **params: str) -> str:
    """A ``file:`` URI for SQLite naming exactly ``file``, with query ``params`` (e.g. ``mode="ro"``).

    The path is made absolute and percent-encoded (``Path.as_uri``), so ``#``, ``?``, ``%`` and spaces in a
    directory name stay part of the path instead of starting SQLite's query string or fragment (a raw
    ``f"file:{path}?mode=ro"`` opens, and creates, a truncated path when the name holds ``#`` or ``?``).
    """
    uri = Path(os.path.abspath(file)).as_uri()
    return uri + ("?" + urllib.parse.urlencode(params) if params else "")


def _check_found(ids: np.ndarray, found: Iterable[int] | Mapping[int, Any]) -> None:
    found = found if isinstance(found, (set, dict)) else set(found)
    if len(found) != len(set(ids.tolist())):
        missing = [i for i in ids.tolist() if i not in found]
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} id(s) are not in the memory: {shown} (removed already, or never added)")
