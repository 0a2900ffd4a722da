"""The registry's tables, as sqlite-utils migrations: append new ones to MIGRATIONS, never edit old ones.

This module is the one place that names the migrations. It imports sqlite-utils only when the
migrations are applied, so engine.registry can check what is pending with plain SQL (sqlite-utils
imports numpy) and nothing here imports the registry.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

MIGRATION_SET = "engine.registry"


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


def m002_scores(db: sqlite_utils.Database) -> None:
    """Evaluation scores, kept per eval step key; a variant points at its latest evaluation."""
    db["variants"].add_column("eval_key", str)
    db["scores"].create(
        {"id": int, "eval_key": str, "artifact_key": str, "metric": str, "value": float, "unit": str,
         "method_json": str, "method_id": str, "versions_json": str, "engine_version": str, "created": str},
        pk="id",
    )
    db["scores"].create_index(["eval_key", "metric"], unique=True)


#: the columns `engine ls` reads, in one covering index so a listing never reads the recipe text
LISTING_COLUMNS = ("name", "version", "runtime", "device", "weight_dtype", "group_size", "scheme", "algorithm",
                   "size_bytes", "created", "description", "source_kind", "artifact_key", "source_identity",
                   "eval_key")


def m003_listing(db: sqlite_utils.Database) -> None:
    """`engine ls` at 10,000 variants: the source identity as its own column and covering indexes
    for the listing and the scores (both read without touching the wide rows)."""
    db["variants"].add_column("source_identity", str)
    db.execute("update variants set source_identity = json_extract(source_json, '$.identity')")
    db.execute(f"create index variants_listing on variants ({', '.join(LISTING_COLUMNS)})")
    db.execute("create index scores_listing on scores (eval_key, metric, value, unit, method_id)")


def m004_score_summaries(db: sqlite_utils.Database) -> None:
    """`engine ls` reads one prepared row per evaluation instead of its scores (engine/score_summary.py);
    the evaluations recorded before this are summarised here."""
    from .score_summary import write_summary

    db["score_summaries"].create({"eval_key": str, "scores_json": str, "cells": str, "methods": str,
                                  "cells_format": str}, pk="eval_key")
    for (eval_key,) in db.execute("select distinct eval_key from scores").fetchall():
        write_summary(db.conn, eval_key)


#: every migration, in the order they apply
MIGRATIONS: tuple[Callable[[sqlite_utils.Database], None], ...] = (m001_initial, m002_scores, m003_listing,
                                                                    m004_score_summaries)
MIGRATION_NAMES: tuple[str, ...] = tuple(m.__name__ for m in MIGRATIONS)


def migrations() -> Migrations:
    """MIGRATIONS as a sqlite-utils Migrations set (apply / pending)."""
    from sqlite_utils.migrations import Migrations

    found = Migrations(MIGRATION_SET)
    for migration in MIGRATIONS:
        found()(migration)
    return found
