"""The SQLite registry: which variants exist, how each was made, and which bytes it is.

A variant row is written last, in the same transaction as its artifact and step rows: the row is
the commit marker, so a crash before it leaves nothing registered. Schema changes go through
`sqlite_utils.Migrations`, so an old registry.db upgrades in place.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from .errors import EngineError, VariantNotFound

migrations = Migrations("engine.registry")

_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]*)(?:@(?P<version>[0-9]+))?$")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["variants"].create(
        {
            "id": int, "name": str, "version": int, "created": str, "description": str,
            "runtime": str, "device": str, "weight_dtype": str, "group_size": int,
            "scheme": str, "algorithm": str,
            "recipe_path": str, "recipe_text": str, "recipe_sha256": str, "recipe_json": str,
            "source_kind": str, "source_key": str, "source_json": str,
            "artifact_key": str, "size_bytes": int, "engine_version": str,
        },
        pk="id",
        not_null={"name", "version", "artifact_key"},
    )
    db["variants"].create_index(["name", "version"], unique=True)
    db["artifacts"].create(
        {"key": str, "kind": str, "runtime": str, "created": str, "size_bytes": int,
         "file_count": int, "meta_json": str},
        pk="key",
    )
    db["files"].create(
        {"artifact_key": str, "path": str, "size": int, "sha256": str},
        pk=("artifact_key", "path"),
        foreign_keys=[("artifact_key", "artifacts", "key")],
    )
    db["steps"].create(
        {"id": int, "variant_id": int, "position": int, "kind": str, "key": str,
         "cached": int, "duration_s": float, "params_json": str, "versions_json": str,
         "finished": str},
        pk="id",
        foreign_keys=[("variant_id", "variants", "id")],
    )


@dataclass(frozen=True)
class StepRecord:
    kind: str
    key: str
    cached: bool
    duration_s: float
    params: dict
    versions: dict


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
    """A registry.db file. Opening it applies pending migrations (cheap when there are none)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(self.path)
        self.db.execute("PRAGMA busy_timeout = 30000")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA foreign_keys = ON")
        if migrations.pending(self.db):
            with _exclusive(self.db):
                migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    # -- reading -------------------------------------------------------------------------------
    def get(self, ref: str) -> dict:
        """The variant row for NAME (latest version) or NAME@V; VariantNotFound otherwise."""
        name, version = parse_ref(ref)
        if version is None:
            rows = list(self.db.query(
                "select * from variants where name = ? order by version desc limit 1", [name]))
        else:
            rows = list(self.db.query(
                "select * from variants where name = ? and version = ?", [name, version]))
        if rows:
            return rows[0]
        known = [r["name"] for r in self.db.query("select distinct name from variants order by name")]
        raise VariantNotFound(f"no variant '{ref}' in {self.path}", hint=_suggest(name, known))

    def latest(self, name: str) -> dict | None:
        rows = list(self.db.query(
            "select * from variants where name = ? order by version desc limit 1", [name]))
        return rows[0] if rows else None

    def variants(self, name: str | None = None, all_versions: bool = False) -> list[dict]:
        where, params = ("where name = ?", [name]) if name else ("", [])
        rows = list(self.db.query(f"select * from variants {where} order by name, version", params))
        if all_versions:
            return rows
        latest: dict[str, dict] = {}
        for row in rows:
            latest[row["name"]] = row
        return list(latest.values())

    def files(self, artifact_key: str) -> list[dict]:
        return list(self.db.query(
            "select path, size, sha256 from files where artifact_key = ? order by path", [artifact_key]))

    def steps(self, variant_id: int) -> list[dict]:
        return list(self.db.query(
            "select * from steps where variant_id = ? order by position", [variant_id]))

    def referenced_keys(self) -> set[str]:
        rows = self.db.query("select key from steps union select artifact_key from variants")
        return {row["key"] for row in rows}

    # -- writing -------------------------------------------------------------------------------
    def register(self, *, recipe: Any, recipe_json: dict, source: dict, artifact: dict,
                 files: list[dict], steps: list[StepRecord], engine_version: str) -> tuple[dict, bool]:
        """Record a variant in one transaction; returns (row, created).

        A new version is added only when the artifact differs from the latest version's; applying
        the same recipe again (or one that differs only in its description) adds nothing.
        """
        with _exclusive(self.db):
            latest = self.latest(recipe.name)
            self._upsert_artifact(artifact, files)
            if latest and latest["artifact_key"] == artifact["key"]:
                if latest["description"] != recipe_json.get("description", ""):
                    self.db["variants"].update(latest["id"], {"description": recipe_json.get("description", "")})
                return self.get(f"{latest['name']}@{latest['version']}"), False
            quant, target = recipe_json.get("quantization", {}), recipe_json["target"]
            row = {
                "name": recipe.name,
                "version": (latest["version"] + 1) if latest else 1,
                "created": _now(),
                "description": recipe_json.get("description", ""),
                "runtime": target["runtime"],
                "device": target.get("device", "cpu"),
                "weight_dtype": quant.get("weight_dtype"),
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
                "artifact_key": artifact["key"],
                "size_bytes": artifact["size_bytes"],
                "engine_version": engine_version,
            }
            variant_id = self.db["variants"].insert(row).last_pk
            self.db["steps"].insert_all(
                {"variant_id": variant_id, "position": i, "kind": s.kind, "key": s.key,
                 "cached": int(s.cached), "duration_s": round(s.duration_s, 3),
                 "params_json": json.dumps(s.params, sort_keys=True),
                 "versions_json": json.dumps(s.versions, sort_keys=True), "finished": _now()}
                for i, s in enumerate(steps)
            )
            return self.db["variants"].get(variant_id), True

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

    def remove(self, ref: str) -> list[dict]:
        """Delete NAME (every version) or NAME@V; returns the removed rows."""
        name, version = parse_ref(ref)
        rows = self.variants(name, all_versions=True)
        if version is not None:
            rows = [r for r in rows if r["version"] == version]
        if not rows:
            self.get(ref)  # raises VariantNotFound with a suggestion
        with _exclusive(self.db):
            for row in rows:
                self.db.execute("delete from steps where variant_id = ?", [row["id"]])
                self.db.execute("delete from variants where id = ?", [row["id"]])
            self._drop_orphan_artifacts()
        return rows

    def _drop_orphan_artifacts(self) -> None:
        self.db.execute(
            "delete from files where artifact_key not in (select artifact_key from variants)")
        self.db.execute(
            "delete from artifacts where key not in (select artifact_key from variants)")


class _exclusive:
    """BEGIN IMMEDIATE ... COMMIT: writers queue on the busy timeout instead of failing."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.conn = db.conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


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


__all__ = ["Registry", "StepRecord", "parse_ref", "EngineError"]
