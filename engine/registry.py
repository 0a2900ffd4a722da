"""The SQLite registry: which variants exist, how each was made, and which bytes it is.

A variant row is written last, in the same transaction as its artifact and step rows: the row is
the commit marker, so a crash before it leaves nothing registered. Schema changes go through
`sqlite_utils.Migrations` (engine/registry_schema.py), so an old registry.db upgrades in place.
Reads use the stdlib sqlite3 module; sqlite-utils is imported only to write. Reads return typed
records (engine/records.py) whose JSON columns are decoded once, here.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .errors import EngineError, VariantNotFound, registry_error
from .records import ListedVariant, ScoreRecord, StepRecord, VariantRecord
from .registry_schema import LISTING_COLUMNS, MIGRATION_NAMES, MIGRATION_SET

_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]*)(?:@(?P<version>[0-9]+))?$")


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@2' -> (name, 2)."""
    match = _REF.match(ref)
    if not match:
        raise VariantNotFound(
            f"'{ref}' is not a variant reference", hint="use NAME or NAME@VERSION, e.g. phi35-int4-cpu@2"
        )
    version = match.group("version")
    return match.group("name"), int(version) if version else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    """A registry.db file. Opening it applies pending migrations (cheap when there are none).

    `readonly=True` (ls, show, verify, gc's look at other registries) opens it without writing
    anything, so reads work on a read-only file or folder. Every sqlite3/OS failure becomes one
    RegistryDamaged or RegistryUnavailable naming the file.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        with self.errors():
            self.conn = self._connect_readonly() if readonly else self._connect()
            if self._pending_migrations():
                if readonly:  # made by an older engine: upgrade it in place where it may be written
                    self._upgrade_for_reading()
                from .registry_schema import migrations

                with _exclusive(self.conn):
                    migrations().apply(self.db)

    def _upgrade_for_reading(self) -> None:
        """A reader of a registry an older engine made: its queries need the current tables, so the
        connection becomes a writable one that applies the migrations; where the file cannot be
        written, one message says how to upgrade it."""
        if not (os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)):
            raise EngineError(f"{self.path} was made by an older engine and must be upgraded before this one "
                              "can read it, but it is read-only here",
                              hint="run `engine ls` once with write access to the file and its folder (any "
                                   "engine command then upgrades it in place), or use the older engine")
        self.conn.close()
        self.conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _connect_readonly(self) -> sqlite3.Connection:
        """mode=ro; where even that cannot open (a WAL file needs its -shm made beside it, and the
        folder is read-only or full), immutable=1: then no one can be writing it either."""
        uri = f"file:{quote(str(self.path.absolute()))}?mode=ro"
        try:
            return _probed(sqlite3.connect(uri, uri=True, timeout=30))
        except sqlite3.OperationalError:
            return _probed(sqlite3.connect(uri + "&immutable=1", uri=True, timeout=30))

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Turn a sqlite3 or OS failure on this file into one clear EngineError."""
        try:
            yield
        except (sqlite3.DatabaseError, OSError) as error:
            raise registry_error(self.path, error) from error

    @classmethod
    def check_writable_at(cls, path: Path) -> None:
        """Fail now, not after a long build, when the registry at `path` cannot take a write. The
        permissions are read first: SQLite opening a read-only file would leave read-only -wal and
        -shm files beside it, which keep failing after the file is fixed."""
        existing = path if path.exists() else next(p for p in path.parents if p.exists())
        for where in {existing, existing.parent if existing == path else existing}:
            if not os.access(where, os.W_OK):
                raise registry_error(path, PermissionError(errno.EACCES, f"{where} is not writable", str(where)))
        if not path.exists():
            return  # a new registry is made by the first registration; a crash before it leaves no file
        for attempt in range(5):  # another apply may be making the registry this moment (its migrations)
            try:
                registry = cls(path)
                try:
                    registry.check_writable()
                finally:
                    registry.close()
                return
            except EngineError as error:
                if attempt == 4 or not any(word in str(error).lower() for word in ("locked", "busy")):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def check_writable(self) -> None:
        """A real write (the header's user_version set to itself) in a transaction rolled back."""
        with self.errors():
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self.conn.execute(f"PRAGMA user_version = {int(version)}")
            finally:
                self.conn.execute("ROLLBACK")

    @cached_property
    def db(self):
        """sqlite-utils over the same connection, for writes."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    def _pending_migrations(self) -> bool:
        try:
            rows = self.query("select name from _sqlite_migrations where migration_set = ?", [MIGRATION_SET])
        except sqlite3.OperationalError:  # no migrations table: a new file
            return True
        return not set(MIGRATION_NAMES) <= {r["name"] for r in rows}

    def query(self, sql: str, params: list | tuple = ()) -> list[dict]:
        cursor = self.conn.cursor()
        cursor.row_factory = _dict_row  # per cursor: sqlite-utils shares the connection and wants tuples
        if sql.lstrip().startswith("select name from _sqlite_migrations"):
            return cursor.execute(sql, params).fetchall()  # its absence is a question, not a fault
        with self.errors():
            return cursor.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()

    # -- reading -------------------------------------------------------------------------------
    def get(self, ref: str) -> VariantRecord:
        """The variant NAME (latest version) or NAME@V; VariantNotFound otherwise."""
        name, version = parse_ref(ref)
        if version is None:
            rows = (self.query(
                "select * from variants where name = ? order by version desc limit 1", [name]))
        else:
            rows = (self.query(
                "select * from variants where name = ? and version = ?", [name, version]))
        if rows:
            return VariantRecord.from_row(rows[0])
        known = [r["name"] for r in self.query("select distinct name from variants order by name")]
        raise VariantNotFound(f"no variant '{ref}' in {self.path}", hint=_suggest(name, known))

    def latest(self, name: str) -> VariantRecord | None:
        rows = (self.query(
            "select * from variants where name = ? order by version desc limit 1", [name]))
        return VariantRecord.from_row(rows[0]) if rows else None

    def variants(self, name: str | None = None, all_versions: bool = False) -> list[VariantRecord]:
        where, params = ("where name = ?", [name]) if name else ("", [])
        rows = (self.query(f"select * from variants {where} order by name, version", params))
        if not all_versions:
            latest: dict[str, dict] = {}
            for row in rows:
                latest[row["name"]] = row
            rows = list(latest.values())
        return [VariantRecord.from_row(row) for row in rows]

    def listing(self, *, all_versions: bool = False, runtime: str | None = None,
                dtype: str | None = None) -> list[ListedVariant]:
        """What `engine ls` shows, for every variant (latest versions unless all_versions), ordered by
        name and version: one query over a covering index (m003) and the evaluations' summaries (m004);
        no recipe or score row read or decoded."""
        from .score_summary import CELLS_FORMAT

        rows = self.conn.execute(
            f"select {', '.join('v.' + c for c in LISTING_COLUMNS)}, s.scores_json, s.cells, s.methods, s.cells_format"
            " from variants v indexed by variants_listing left join score_summaries s on s.eval_key = v.eval_key"
            " order by v.name, v.version").fetchall()
        if not all_versions:  # ordered by name, version: the last row of each name is its latest
            rows = [row for row, after in zip(rows, [*rows[1:], None]) if after is None or after[0] != row[0]]
        if runtime or dtype:  # after choosing the latest: a filter never resurrects an older version
            rows = [row for row in rows if (not runtime or row[2] == runtime) and (not dtype or row[4] == dtype)]
        stale = {row[14] for row in rows if row[14] is not None and row[18] != CELLS_FORMAT}
        remade = self._summaries(stale) if stale else {}
        identities: dict[str | None, Any] = {}  # variants of one source share its identity: decode it once
        for row in rows:
            if row[13] not in identities:
                identities[row[13]] = _identity(row[13])
        if remade:
            rows = [(*row[:15], *remade[row[14]][:3]) if row[14] in remade else row for row in rows]
        return [ListedVariant(*row[:13], identities[row[13]], row[15] or "{}", row[16], row[17]) for row in rows]

    def _summaries(self, eval_keys: set[str]) -> dict[str, tuple[str, str, str, str]]:
        """Summaries made in memory from the scores, where the stored one is missing (an older engine
        recorded them) or of another format (this engine formats a column differently)."""
        from .score_summary import summarize

        found: dict[str, list] = {key: [] for key in eval_keys}
        keys = sorted(eval_keys)
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            for eval_key, *score in self.conn.execute(
                    "select eval_key, metric, value, unit, method_id from scores where eval_key in"
                    f" ({', '.join('?' * len(chunk))}) order by eval_key, metric", chunk):
                found[eval_key].append(score)
        return {key: summarize(scores) for key, scores in found.items()}

    def methods(self, method_ids: set[str]) -> dict[str, dict]:
        """method_id -> the method it stands for (what `engine ls` footnotes print)."""
        out = {}
        for mid in method_ids:
            row = self.conn.execute("select method_json from scores where method_id = ? limit 1", [mid]).fetchone()
            out[mid] = json.loads(row[0]) if row else {}
        return out

    def files(self, artifact_key: str) -> list[dict]:
        return (self.query(
            "select path, size, sha256 from files where artifact_key = ? order by path", [artifact_key]))

    def artifact_meta(self, artifact_key: str) -> dict:
        """The build facts recorded for an artifact (empty when there are none)."""
        rows = self.query("select meta_json from artifacts where key = ?", [artifact_key])
        return json.loads(rows[0]["meta_json"]) if rows and rows[0]["meta_json"] else {}

    def steps(self, variant_id: int) -> list[StepRecord]:
        rows = self.query("select * from steps where variant_id = ? order by position", [variant_id])
        return [StepRecord.from_row(row) for row in rows]

    def referenced_keys(self) -> set[str]:
        rows = self.query("select key from steps union select artifact_key from variants"
                          " union select eval_key as key from variants where eval_key is not null")
        return {row["key"] for row in rows}

    # -- writing -------------------------------------------------------------------------------
    def register(self, *, recipe: Any, recipe_json: dict, source: dict, artifact: dict,
                 files: list[dict], steps: list[StepRecord], engine_version: str,
                 rebuilt: bool = True, evaluation: dict | None = None) -> tuple[VariantRecord, bool]:
        """Record a variant in one transaction; returns (row, created).

        A new version is added when the artifact or the recipe's behaviour (anything but its
        description and eval section, e.g. a load-time ov_config) differs from the latest version;
        applying the same recipe again, or one that differs only in those two, adds nothing.
        `rebuilt=False` says the artifact came from the store unchanged, so its file rows stand.
        `evaluation` = {"key", "scores", "versions"}: recorded once per eval key; a changed eval
        spec re-points the variant at the new scores without adding a version.
        """
        with self.errors():
            return self._register(recipe, recipe_json, source, artifact, files, steps, engine_version,
                                  rebuilt, evaluation)

    def _register(self, recipe: Any, recipe_json: dict, source: dict, artifact: dict, files: list[dict],
                  steps: list[StepRecord], engine_version: str, rebuilt: bool,
                  evaluation: dict | None) -> tuple[VariantRecord, bool]:
        eval_key = evaluation["key"] if evaluation else None
        with _exclusive(self.conn):
            if evaluation:
                self._record_scores(evaluation, artifact["key"], engine_version)
            latest = self.latest(recipe.name)
            if latest and latest.artifact_key == artifact["key"] and \
                    _behaviour(latest.recipe) == _behaviour(recipe_json):
                if rebuilt:
                    self._upsert_artifact(artifact, files)
                if latest.eval_key != eval_key:  # re-scored: the steps now name the new evaluation
                    self.conn.execute("update variants set eval_key = ? where id = ?", [eval_key, latest.id])
                    self.conn.execute("delete from steps where variant_id = ?", [latest.id])
                    self._insert_steps(latest.id, steps)
                if latest.description != recipe_json.get("description", ""):
                    self.conn.execute("update variants set description = ? where id = ?",
                                      [recipe_json.get("description", ""), latest.id])
                return self.get(latest.ref), False
            self._upsert_artifact(artifact, files)
            quant, target = recipe_json.get("quantization", {}), recipe_json["target"]
            row = {
                "name": recipe.name,
                "version": (latest.version + 1) if latest else 1,
                "created": _now(),
                "description": recipe_json.get("description", ""),
                "runtime": target["runtime"],
                "device": target.get("device", "cpu"),
                # a runtime whose types are finer than weight_dtype names the one it built (llama.cpp: Q4_K_M)
                "weight_dtype": artifact.get("meta", {}).get("built_weight_type") or quant.get("weight_dtype"),
                "group_size": quant.get("group_size"),
                "scheme": quant.get("scheme"),
                "algorithm": quant.get("algorithm"),
                "recipe_path": str(recipe.path) if recipe.path else None,
                "recipe_text": recipe.text,
                "recipe_sha256": _sha256_text(recipe.text),
                "recipe_json": json.dumps(recipe_json, sort_keys=True),
                "source_kind": source["kind"],
                "source_key": source["key"],
                "source_json": json.dumps(source, sort_keys=True),
                "source_identity": json.dumps(source.get("identity"), sort_keys=True),
                "artifact_key": artifact["key"],
                "size_bytes": artifact["size_bytes"],
                "engine_version": engine_version,
                "eval_key": eval_key,
            }
            variant_id = self.db["variants"].insert(row).last_pk
            self._insert_steps(variant_id, steps)
            return VariantRecord.from_row(self.query("select * from variants where id = ?", [variant_id])[0]), True

    def _insert_steps(self, variant_id: int, steps: list[StepRecord]) -> None:
        self.db["steps"].insert_all(
            {"variant_id": variant_id, "position": i, "kind": s.kind, "key": s.key,
             "cached": int(s.cached), "duration_s": round(s.duration_s, 3),
             "params_json": json.dumps(s.params, sort_keys=True),
             "versions_json": json.dumps(s.versions, sort_keys=True), "finished": _now()}
            for i, s in enumerate(steps)
        )

    def scores(self, variant: VariantRecord) -> dict[str, ScoreRecord]:
        """The variant's latest scores by metric (empty when it was never evaluated)."""
        if not variant.eval_key:
            return {}
        out = {}
        for s in self.query("select * from scores where eval_key = ? order by id", [variant.eval_key]):
            out[s["metric"]] = ScoreRecord(value=s["value"], unit=s["unit"], method=json.loads(s["method_json"]),
                                           method_id=s["method_id"], versions=json.loads(s["versions_json"]),
                                           engine_version=s["engine_version"], created=s["created"])
        return out

    def _record_scores(self, evaluation: dict, artifact_key: str, engine_version: str) -> None:
        for score in evaluation["scores"]:
            self.conn.execute(
                "insert or ignore into scores (eval_key, artifact_key, metric, value, unit, method_json, method_id,"
                " versions_json, engine_version, created) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [evaluation["key"], artifact_key, score["metric"], score["value"], score["unit"],
                 json.dumps(score["method"], sort_keys=True), score["method_id"],
                 json.dumps(evaluation["versions"], sort_keys=True), engine_version, _now()])
        from .score_summary import write_summary

        write_summary(self.conn, evaluation["key"])  # what `engine ls` reads, in the same transaction

    def _upsert_artifact(self, artifact: dict, files: list[dict]) -> None:
        """Artifact rows mirror the store manifest (a --force rebuild may change the bytes)."""
        self.db["artifacts"].upsert(
            {"key": artifact["key"], "kind": artifact["kind"], "runtime": artifact.get("runtime"),
             "created": artifact["created"], "size_bytes": artifact["size_bytes"],
             "file_count": len(files), "meta_json": json.dumps(artifact.get("meta", {}), sort_keys=True)},
            pk="key",
        )
        self.db.execute("delete from files where artifact_key = ?", [artifact["key"]])
        self.db["files"].insert_all(
            {"artifact_key": artifact["key"], "path": f["path"], "size": f["size"], "sha256": f["sha256"]}
            for f in files
        )

    def remove(self, ref: str, force: bool = False) -> list[VariantRecord]:
        """Delete NAME (every version) or NAME@V; returns the removed rows. A variant other variants
        were built from (`source: {variant: ...}`) is removed only with force."""
        name, version = parse_ref(ref)
        rows = self.variants(name, all_versions=True)
        if version is not None:
            rows = [r for r in rows if r.version == version]
        if not rows:
            self.get(ref)  # raises VariantNotFound with a suggestion
        if not force:
            from .variant_source import children

            ids = {r.id for r in rows}
            kids = [c for c in children(self, {r.artifact_key for r in rows}) if c.id not in ids]
            if kids:
                raise EngineError(f"{ref} is the source of {', '.join(c.ref for c in kids)}",
                                  hint=f"`engine rm --force {ref}` removes it anyway (those variants stay, and "
                                       "`engine show` marks their source removed)")
        with self.errors(), _exclusive(self.conn):
            for row in rows:
                self.conn.execute("delete from steps where variant_id = ?", [row.id])
                self.conn.execute("delete from variants where id = ?", [row.id])
            self._drop_orphan_artifacts()
        return rows

    def _drop_orphan_artifacts(self) -> None:
        self.conn.execute(
            "delete from files where artifact_key not in (select artifact_key from variants)")
        self.conn.execute(
            "delete from artifacts where key not in (select artifact_key from variants)")


def _probed(conn: sqlite3.Connection) -> sqlite3.Connection:
    """The connection, once a read of the variants table worked (closed if it did not)."""
    try:
        conn.execute("select count(*) from variants").fetchone()
    except sqlite3.Error:
        conn.close()
        raise
    return conn


class _exclusive:
    """BEGIN IMMEDIATE ... COMMIT: writers queue on the busy timeout instead of failing."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


def _behaviour(recipe_json: dict) -> dict:
    """What makes two recipes with the same artifact different variants (e.g. a load-time
    ov_config). Not the description or the eval section, and not where the source or the
    calibration data lie: their content is already in the artifact key."""
    doc = {k: v for k, v in recipe_json.items() if k not in ("description", "eval", "source")}
    doc["quantization"] = {k: v for k, v in doc.get("quantization", {}).items() if k != "calibration"}
    return doc


def _identity(text: str | None) -> Any:
    """json_extract gives a JSON object as text and a string as the string itself."""
    if text is None or text[:1] not in ("{", "["):
        return text
    return json.loads(text)


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict:
    return {col[0]: value for col, value in zip(cursor.description, row)}


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _suggest(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    if close:
        return "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    if known:
        return "registered variants: " + ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
    return "the registry is empty: run `engine apply RECIPE.yaml` first"


__all__ = ["Registry", "ScoreRecord", "StepRecord", "VariantRecord", "parse_ref", "EngineError"]
