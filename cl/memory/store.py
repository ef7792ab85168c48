"""Typed metadata of the memory's entries in SQLite: one row per vector, keyed by its id.

The columns a strategy filters on are typed (``kind``, ``experience``, ``class``, ``adapter``); any
other keys of an entry's dict go to a JSON ``extra`` column. The live table is an in-memory database,
so the files on disk only ever change through ``ExperienceMemory.save`` (which copies it with SQLite's
online backup); the vectors live in the FAISS indexes, one per kind.
"""

from __future__ import annotations

import difflib
import json
import math
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
"""The built-in kinds: a stored sample's features, a routing key of an adapter, a class prototype, a task. A user
declares kinds of their own (``ExperienceMemory(dim, kinds=[...])``, ``memory.declare(kinds=[...])``)."""

COLUMNS: tuple[str, ...] = ("kind", "experience", "class", "adapter")
"""Metadata keys stored as typed, indexed columns; every other key goes to the JSON ``extra`` column, except declared
fields, which get typed, indexed columns of their own."""

FILTERS: tuple[str, ...] = ("experience", "class", "adapter")
"""The built-in keyword filters of ``search``/``entries``/``count`` (``class_`` is accepted for ``class``); declared
fields and any key stored in entries' metadata filter too."""

FIELD_TYPES: dict[str, str] = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER"}
"""The types a declared field may have, with their SQLite column types."""

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
"""What a declared kind or field may be called (a kind names its index file, a field its column)."""

RESERVED = ("id", *COLUMNS, "extra", "class_")
_BASE_SCHEMA = """
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
_SCHEMA = _BASE_SCHEMA  # what every store holds; each declared field adds a column and its index (``_field_sql``)


def _field_sql(name: str, type_name: str) -> tuple[str, str]:
    """The ALTER TABLE and CREATE INDEX statements of declared field ``name`` (already checked against NAME)."""
    return (f'ALTER TABLE entries ADD COLUMN "{name}" {FIELD_TYPES[type_name]}',
            f'CREATE INDEX IF NOT EXISTS "entries_field_{name}" ON entries(kind, "{name}")')


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_name(name: Any, what: str) -> str:
    """``name`` if it may name a declared kind or field, else ConfigError saying what a name may be."""
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{what} name {name!r} must be 1-64 letters, digits or underscores, not starting with a "
                          "digit")
    return name


def field_type(name: str, type_: Any) -> str:
    """A declared field's type as one of FIELD_TYPES' names (``str``, ``int``, ``float``, ``bool``; the Python types
    too); anything else raises ConfigError."""
    type_name = type_.__name__ if isinstance(type_, type) else type_
    if type_name not in FIELD_TYPES:
        raise ConfigError(f"field {name!r}: unknown type {type_!r} (choose one of {', '.join(FIELD_TYPES)})")
    return type_name


def unknown_kind(kind: Any, kinds: Sequence[str], what: str = "kind") -> str:
    """The message for a kind that is neither built in nor declared."""
    return (f"unknown {what} {kind!r}{_suggest(kind, kinds)} (kinds: {', '.join(kinds)}; declare a kind of your own "
            "with ExperienceMemory(dim, kinds=[...]) or memory.declare(kinds=[...]))")


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


def _as_adapter(value: Any, row: int) -> str | int | None:
    if isinstance(value, np.integer):
        value = int(value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise DataError(f"metadata row {row}: 'adapter' must be a str, an int or None, got {value!r}")
    return value


def _as_field(value: Any, type_name: str, row: int, key: str) -> Any:
    """A declared field's value checked against its type (None: unset); ints are taken for float fields."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    ok = {"str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}[type_name]
    if not ok(value):
        raise DataError(f"metadata row {row}: {key!r} is declared {type_name}, got {value!r}")
    return float(value) if type_name == "float" else int(value) if type_name == "bool" else value


def _extra_json(extra: Mapping[str, Any], row: int) -> str | None:
    try:
        return json.dumps(extra, default=_json_default) if extra else None
    except (TypeError, ValueError) as e:
        raise DataError(f"metadata row {row}: extra keys must be JSON-serializable ({e})") from None


def encode_rows(ids: np.ndarray, metadata: Sequence[Mapping[str, Any]], kinds: Sequence[str] = KINDS,
                fields: Mapping[str, str] | None = None) -> list[tuple[Any, ...]]:
    """Validated SQLite rows ``(id, kind, experience, class, adapter, extra_json, *declared fields)``, one per dict;
    ``kind`` must be one of ``kinds``, declared ``fields`` (name -> type name) must have their type."""
    fields = fields or {}
    rows = []
    for i, (id_, meta) in enumerate(zip(ids.tolist(), metadata, strict=True)):
        if not isinstance(meta, Mapping):
            raise DataError(
                f"metadata row {i} is a {type(meta).__name__}, expected a dict like {{'kind': 'prototype'}}"
            )
        if "kind" not in meta:
            raise DataError(f"metadata row {i} has no 'kind' (one of {', '.join(kinds)})")
        kind = meta["kind"]
        if kind not in kinds:
            raise DataError(f"metadata row {i}: {unknown_kind(kind, kinds)}")
        extra = {k: v for k, v in meta.items() if k not in COLUMNS and k not in fields}
        rows.append(
            (id_, kind, _as_int(meta.get("experience"), i, "experience"), _as_int(meta.get("class"), i, "class"),
             _as_adapter(meta.get("adapter"), i), _extra_json(extra, i),
             *(_as_field(meta.get(f), t, i, f) for f, t in fields.items()))
        )
    return rows


def _id_list(ids: np.ndarray) -> str:
    return json.dumps(ids.tolist())


def _json_path(key: str) -> str:
    return '$."' + key + '"'


class MetadataStore:
    """The ``entries`` table in an in-memory SQLite database, with the fields declared on it (name -> type name)."""

    def __init__(self, conn: sqlite3.Connection | None = None, fields: Mapping[str, str] | None = None) -> None:
        self.conn = conn or sqlite3.connect(":memory:")
        self.conn.executescript(_BASE_SCHEMA)
        self.fields: dict[str, str] = {}
        present = {r[1] for r in self.conn.execute("PRAGMA table_info(entries)")}
        for name, type_name in (fields or {}).items():
            self._add_field(name, type_name, exists=name in present)
        self.extra_keys: set[str] = {r[0] for r in self.conn.execute(
            "SELECT DISTINCT j.key FROM entries, json_each(entries.extra) AS j WHERE entries.extra IS NOT NULL")}

    # -- declared fields ---------------------------------------------------------------------------

    def _add_field(self, name: str, type_name: str, exists: bool = False) -> None:
        alter, index = _field_sql(name, type_name)
        with self.conn:
            if not exists:
                self.conn.execute(alter)
            self.conn.execute(index)
        self.fields[name] = type_name

    def declare_field(self, name: str, type_: Any) -> None:
        """Give ``name`` a typed, indexed column. Entries that already hold it in their extra metadata move their
        values there, once all of them have the type (else DataError, and nothing changes)."""
        check_name(name, "field")
        if name in RESERVED:
            raise ConfigError(f"field {name!r} is built in (built-in keys: {', '.join(RESERVED[:-1])})")
        type_name = field_type(name, type_)
        if name in self.fields:
            if self.fields[name] != type_name:
                raise ConfigError(f"field {name!r} is already declared {self.fields[name]}, not {type_name}")
            return
        path = _json_path(name)
        json_types = {"str": "'text'", "int": "'integer'", "float": "'integer', 'real'", "bool": "'true', 'false'"}
        held, bad = (self.conn.execute(
            "SELECT COUNT(json_type(extra, ?)), COUNT(*) FILTER (WHERE json_type(extra, ?) NOT IN "
            f"({json_types[type_name]}, 'null')) FROM entries WHERE extra IS NOT NULL", (path, path)).fetchone()
            if name in self.extra_keys else (0, 0))
        if bad:
            raise DataError(f"field {name!r} cannot be declared {type_name}: {bad} entries hold values of another "
                            "type for it (update or remove them first)")
        self._add_field(name, type_name)
        if held:
            with self.conn:
                self.conn.execute(f'UPDATE entries SET "{name}" = json_extract(extra, ?), '
                                  "extra = NULLIF(json_remove(extra, ?), '{}') WHERE json_type(extra, ?) IS NOT NULL",
                                  (path, path, path))

    # -- reading and writing -----------------------------------------------------------------------

    @property
    def _select(self) -> str:
        return "SELECT " + ", ".join(["id", *COLUMNS, "extra", *(f'"{f}"' for f in self.fields)]) + " FROM entries"

    def _decode(self, row: tuple[Any, ...]) -> dict[str, Any]:
        meta = {"kind": row[1], "experience": row[2], "class": row[3], "adapter": row[4]}
        for (name, type_name), value in zip(self.fields.items(), row[6:], strict=True):
            if value is not None:
                meta[name] = bool(value) if type_name == "bool" else value
        if row[5] is not None:
            meta.update(json.loads(row[5]))
        return meta

    def filter_keys(self) -> list[str]:
        """Every key a filter may name now: the built-in ones, the declared fields, the keys entries hold."""
        return [*FILTERS, *self.fields, *sorted(self.extra_keys - set(self.fields))]

    def normalize_filters(self, filters: Mapping[str, Any]) -> dict[str, Any]:
        """``filters`` with ``class_`` renamed to ``class``; a key that is neither built in, declared nor held by
        any entry raises ConfigError listing the keys that are."""
        out: dict[str, Any] = {}
        for key, value in filters.items():
            name = "class" if key == "class_" else key
            if name not in FILTERS and name not in self.fields and name not in self.extra_keys:
                keys = self.filter_keys()
                raise ConfigError(
                    f"unknown memory filter {key!r}{_suggest(key, [*keys, 'class_'])} (filters: "
                    f"{', '.join(k if k != 'class' else 'class (or class_)' for k in keys)}; a key of your own "
                    "filters once an entry holds it, or declare it: memory.declare(fields={...}); pass the kind as "
                    "kind=...)"
                )
            out[name] = value
        return out

    def _where(self, kinds: Sequence[str] | None, filters: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """A WHERE clause for kinds and filters; a filter value may be a scalar, None or a list. Built-in and
        declared keys are (indexed) columns; other keys are read from the extra JSON."""
        clauses, params = [], []
        if kinds is not None:
            clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params += list(kinds)
        for key, value in filters.items():
            if key in FILTERS or key in self.fields:
                target, target_params = f'"{key}"', []
            else:
                target, target_params = "json_extract(extra, ?)", [_json_path(key)]
            if value is None:
                clauses.append(f"{target} IS NULL")
                params += target_params
                continue
            values = list(value) if isinstance(value, (list, tuple, set, frozenset, np.ndarray)) else [value]
            values = [v.item() if isinstance(v, np.generic) else v for v in values]
            values = [int(v) if isinstance(v, bool) else v for v in values]
            clauses.append(f"{target} IN ({', '.join('?' * len(values))})")
            params += target_params + values
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def insert(self, rows: list[tuple[Any, ...]], keys: Iterable[str] = ()) -> None:
        """Insert ``encode_rows``' rows; ``keys``: the metadata keys they hold (those kept in ``extra`` filter)."""
        cols = ", ".join(["id", *COLUMNS, "extra", *(f'"{f}"' for f in self.fields)])
        with self.conn:
            self.conn.executemany(f"INSERT INTO entries ({cols}) VALUES ({', '.join('?' * (6 + len(self.fields)))})",
                                  rows)
        self.extra_keys.update(k for k in keys if k not in COLUMNS and k not in self.fields)

    def ids(self, kinds: Sequence[str] | None = None, filters: Mapping[str, Any] | None = None) -> np.ndarray:
        """Ids (sorted) of the entries of ``kinds`` that match ``filters``."""
        where, params = self._where(kinds, filters or {})
        cur = self.conn.execute(f"SELECT id FROM entries{where} ORDER BY id", params)
        return np.fromiter((r[0] for r in cur), dtype=np.int64)

    def count(self, kinds: Sequence[str] | None = None, filters: Mapping[str, Any] | None = None) -> int:
        where, params = self._where(kinds, filters or {})
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
        rows = self.conn.execute(f"{self._select} WHERE id IN (SELECT value FROM json_each(?))", (_id_list(ids),))
        found = {r[0]: self._decode(r) for r in rows}
        if not missing_ok:
            _check_found(ids, found)
        return found

    def select(self, kinds: Sequence[str] | None, filters: Mapping[str, Any]) -> tuple[np.ndarray, list[dict]]:
        """Ids (sorted) and metadata of the matching entries."""
        where, params = self._where(kinds, filters)
        rows = self.conn.execute(f"{self._select}{where} ORDER BY id", params).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64), [self._decode(r) for r in rows]

    def delete(self, ids: np.ndarray) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM entries WHERE id IN (SELECT value FROM json_each(?))", (_id_list(ids),))

    def update(self, ids: np.ndarray, values: Mapping[str, Any]) -> None:
        """Set typed columns (built-in and declared) and merge extra keys (a None extra value deletes that key) on
        ``ids``."""
        if "kind" in values:
            raise DataError("an entry's kind cannot be updated (its vector lives in that kind's index); "
                            "remove it and add it again with the new kind")
        _check_found(ids, {r[0] for r in self.conn.execute(
            "SELECT id FROM entries WHERE id IN (SELECT value FROM json_each(?))", (_id_list(ids),))})
        sets, params = [], []
        for col, value in values.items():
            if col in ("experience", "class"):
                checked = _as_int(value, 0, col)
            elif col == "adapter":
                checked = _as_adapter(value, 0)
            elif col in self.fields:
                checked = _as_field(value, self.fields[col], 0, col)
            else:
                continue
            sets.append(f'"{col}" = ?')
            params.append(checked)
        extra = {k: v for k, v in values.items() if k not in COLUMNS and k not in self.fields}
        if extra:
            sets.append("extra = NULLIF(json_patch(COALESCE(extra, '{}'), ?), '{}')")
            params.append(_extra_json(extra, 0))
            self.extra_keys.update(k for k, v in extra.items() if v is not None)
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
    def load(cls, file: Path, kinds: Sequence[str] = KINDS, fields: Mapping[str, str] | None = None) -> MetadataStore:
        """Copy a saved SQLite file into a new in-memory store (opened read-only: loading never writes). Its
        schema must be exactly what a save of a memory with these ``kinds`` and declared ``fields`` writes."""
        fields = dict(fields or {})
        conn = sqlite3.connect(":memory:")
        try:
            src = sqlite3.connect(sqlite_uri(file, mode="ro"), uri=True)
            try:
                src.backup(conn)
            finally:
                src.close()
            info = [(r[1], r[2]) for r in conn.execute("PRAGMA table_info(entries)")]
        except sqlite3.DatabaseError as e:
            conn.close()
            raise CheckpointError(f"memory metadata {file} is not a readable SQLite database ({e})") from None
        expected = [("id", "INTEGER"), ("kind", "TEXT"), ("experience", "INTEGER"), ("class", "INTEGER"),
                    ("adapter", ""), ("extra", "TEXT"), *((f, FIELD_TYPES[t]) for f, t in fields.items())]
        names, want = [c for c, _ in info], [c for c, _ in expected]
        problem = (f"has columns {names}, expected {want}" if names != want else
                   f"types its fields {info[6:]}, its manifest {expected[6:]}" if info[6:] != expected[6:] else None)
        if problem is not None:
            conn.close()
            raise CheckpointError(f"memory metadata {file} {problem}")
        if (problem := _schema_problem(conn, kinds, fields)) is not None:
            conn.close()
            raise CheckpointError(f"memory metadata {file} {problem}; it is corrupted or was not written by clagent")
        return cls(conn, fields)


def _schema_problem(conn: sqlite3.Connection, kinds: Sequence[str] = KINDS,
                    fields: Mapping[str, str] | None = None) -> str | None:
    """What a loaded database holds besides the entries table, its indexes and well-typed rows (None: nothing);
    a trigger or view would run SQL on later writes and reads, so none is kept."""
    fields = fields or {}
    expected = {("table", "entries"), *(("index", n) for n in re.findall(r"INDEX IF NOT EXISTS (\w+)", _BASE_SCHEMA)),
                *(("index", f"entries_field_{f}") for f in fields)}
    found = set(conn.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())
    if extra := sorted(found - expected):  # a missing index is harmless: the store creates it again
        return f"holds {', '.join(f'{t} {n}' for t, n in extra)} besides the entries table and its indexes"
    typed = {"str": "('text', 'null')", "int": "('integer', 'null')", "float": "('real', 'null')",
             "bool": "('integer', 'null')"}
    field_checks = "".join(f' OR typeof("{f}") NOT IN {typed[t]}' + (f' OR "{f}" NOT IN (0, 1)' if t == "bool" else "")
                           for f, t in fields.items())
    marks = ", ".join("?" * len(kinds))
    bad = conn.execute(
        f"SELECT COUNT(*) FROM entries WHERE typeof(id) != 'integer' OR kind NOT IN ({marks}) "
        "OR typeof(experience) NOT IN ('integer', 'null') OR typeof(class) NOT IN ('integer', 'null') "
        "OR typeof(adapter) NOT IN ('integer', 'text', 'null') "
        f"OR (extra IS NOT NULL AND (NOT json_valid(extra) OR json_type(extra) != 'object')){field_checks}",
        list(kinds),
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
