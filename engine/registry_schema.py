"""The registry's tables, as sqlite-utils migrations: append new ones, never edit old ones.

Add each new migration's name to engine.registry.MIGRATIONS as well.
"""
from __future__ import annotations

import sqlite_utils
from sqlite_utils.migrations import Migrations

from .registry import MIGRATION_SET

migrations = Migrations(MIGRATION_SET)


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


@migrations()
def m002_scores(db: sqlite_utils.Database) -> None:
    """Evaluation scores, kept per eval step key; a variant points at its latest evaluation."""
    db["variants"].add_column("eval_key", str)
    db["scores"].create(
        {"id": int, "eval_key": str, "artifact_key": str, "metric": str, "value": float, "unit": str,
         "method_json": str, "method_id": str, "versions_json": str, "engine_version": str, "created": str},
        pk="id",
    )
    db["scores"].create_index(["eval_key", "metric"], unique=True)
