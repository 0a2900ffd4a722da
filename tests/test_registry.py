"""The registry on a real SQLite file: versions, lookups, one-transaction writes, migrations."""
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlite_utils

from engine.errors import VariantNotFound
from engine.records import VariantRecord
from engine.registry import Registry, StepRecord, parse_ref
from engine.registry_schema import MIGRATION_NAMES, migrations


@dataclass
class FakeRecipe:  # only the attributes register() reads; a real Recipe is used in the e2e tests
    name: str
    path: Path | None = None
    text: str = "name: x\n"


def _register(reg, name="m", key="a" * 64, description="", group_size=32, evaluation=None):
    data = {"name": name, "description": description,
            "quantization": {"weight_dtype": "int4", "group_size": group_size, "scheme": "sym", "algorithm": "rtn"},
            "target": {"runtime": "onnxruntime-genai", "device": "cpu"}}
    return reg.register(
        recipe=FakeRecipe(name), recipe_json=data,
        source={"kind": "path", "key": "s" * 64, "identity": {"tree_digest": "t"}, "description": {}},
        artifact={"key": key, "kind": "build", "runtime": "onnxruntime-genai", "created": "now", "size_bytes": 3},
        files=[{"path": "model.onnx", "size": 3, "sha256": "h"}],
        steps=[StepRecord("source", "s" * 64, True, 0.0, {}, {}), StepRecord("build", key, False, 1.5, {"p": 1}, {"onnx": "1"})],
        engine_version="test", evaluation=evaluation,
    )


def test_versions_and_refs(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    row, created = _register(reg)
    assert created and row.version == 1
    row, created = _register(reg)  # same artifact: nothing new
    assert not created and row.version == 1
    row, created = _register(reg, description="now described")  # description only: updated in place
    assert not created and row.version == 1 and reg.get("m").description == "now described"
    row, created = _register(reg, key="b" * 64, group_size=128)
    assert created and row.version == 2
    assert reg.get("m").version == 2 and reg.get("m@1").group_size == 32
    assert [s.kind for s in reg.steps(row.id)] == ["source", "build"]
    assert reg.files("b" * 64)[0]["sha256"] == "h"
    assert reg.referenced_keys() == {"a" * 64, "b" * 64, "s" * 64}


def test_not_found_suggests(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    _register(reg, name="phi35-int4-cpu")
    with pytest.raises(VariantNotFound) as info:
        reg.get("phi35-int4-cpi")
    assert "phi35-int4-cpu" in info.value.hint
    with pytest.raises(VariantNotFound):
        reg.get("phi35-int4-cpu@7")
    with pytest.raises(VariantNotFound):
        parse_ref("Bad Name")


def test_remove_version_and_orphans(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    _register(reg)
    _register(reg, key="b" * 64)
    assert [r.version for r in reg.remove("m@1")] == [1]
    assert reg.files("a" * 64) == []  # artifact rows nobody references are dropped
    assert reg.get("m").version == 2
    reg.remove("m")
    with pytest.raises(VariantNotFound):
        reg.get("m")


def test_migrations_recorded_and_idempotent(tmp_path):
    Registry(tmp_path / "registry.db").close()
    reg = Registry(tmp_path / "registry.db")  # reopening applies nothing new
    assert migrations().pending(reg.db) == []
    names = [r[0] for r in sqlite3.connect(tmp_path / "registry.db").execute(
        "select name from _sqlite_migrations where migration_set = 'engine.registry'")]
    assert names == ["m001_initial", "m002_scores", "m003_listing", "m004_score_summaries"]
    assert tuple(m.name for m in migrations().pending(sqlite_utils.Database(memory=True))) == MIGRATION_NAMES


def test_old_registry_upgrades_and_lists(tmp_path):
    """A registry made before m003 (no source_identity, no listing indexes) upgrades in place."""
    from sqlite_utils.migrations import Migrations

    from engine.registry_schema import MIGRATION_SET, m001_initial, m002_scores

    db = sqlite_utils.Database(tmp_path / "registry.db")
    old = Migrations(MIGRATION_SET)  # the set as it was before m003
    old()(m001_initial)
    old()(m002_scores)
    old.apply(db)
    db["variants"].insert({"name": "old", "version": 1, "runtime": "itrex", "device": "cpu", "artifact_key": "k",
                           "source_json": '{"identity": {"tree_digest": "t"}, "kind": "path"}', "recipe_json": "{}"})
    db.close()
    reg = Registry(tmp_path / "registry.db")
    [listed] = reg.listing()
    assert listed.name == "old" and listed.source == {"tree_digest": "t"} and listed.scores == {}


def test_listing_latest_then_filters(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    _register(reg)
    _register(reg, key="b" * 64, group_size=128)
    _register(reg, name="n", key="c" * 64)
    assert [(v.name, v.version) for v in reg.listing()] == [("m", 2), ("n", 1)]
    assert [(v.name, v.version) for v in reg.listing(all_versions=True)] == [("m", 1), ("m", 2), ("n", 1)]
    assert reg.listing(runtime="openvino") == [] and len(reg.listing(dtype="int4")) == 2
    assert reg.listing()[0].source == {"tree_digest": "t"} and reg.listing()[0].group_size == 128


def test_records_are_typed_and_decoded_once(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    row, _ = _register(reg)
    assert isinstance(row, VariantRecord) and row.ref == "m@1"
    assert row.recipe["quantization"]["group_size"] == 32 and row.source["identity"] == {"tree_digest": "t"}
    step = reg.steps(row.id)[1]
    assert isinstance(step, StepRecord) and step.params == {"p": 1} and step.versions == {"onnx": "1"}


def test_registry_and_its_migrations_do_not_import_each_other():
    import ast

    root = Path(__file__).resolve().parents[1] / "engine"
    tree = ast.parse((root / "registry_schema.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.endswith("registry") for m in imported), imported


def test_failed_write_leaves_nothing(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    with pytest.raises(TypeError):
        reg.register(recipe=FakeRecipe("m"), recipe_json={"target": {"runtime": "x"}}, source=None,
                     artifact={"key": "a" * 64, "kind": "build", "created": "now", "size_bytes": 1},
                     files=[], steps=[], engine_version="t")
    assert reg.variants() == [] and list(reg.db.query("select * from artifacts")) == []


def test_same_artifact_new_version_only_when_behaviour_changes(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    base = {"name": "m", "description": "", "source": {"path": "a"},
            "quantization": {"weight_dtype": "int4", "calibration": {"dataset": "a.txt"}},
            "target": {"runtime": "openvino", "device": "cpu", "options": {}}}

    def register(doc):
        return reg.register(
            recipe=FakeRecipe("m"), recipe_json=doc,
            source={"kind": "path", "key": "s" * 64, "identity": {}, "description": {}},
            artifact={"key": "a" * 64, "kind": "build", "created": "now", "size_bytes": 1},
            files=[], steps=[], engine_version="t")

    assert register(base)[0].version == 1
    moved = {**base, "description": "x", "eval": {"perplexity": {}}, "source": {"path": "b"},
             "quantization": {**base["quantization"], "calibration": {"dataset": "moved.txt"}}}
    assert register(moved) == (reg.get("m@1"), False)  # same content, same behaviour
    load_time = {**base, "target": {**base["target"], "options": {"ov_config": {"KV_CACHE_PRECISION": "u8"}}}}
    row, created = register(load_time)
    assert created and row.version == 2 and row.artifact_key == "a" * 64


def _evaluation(key: str, ppl: float, method: str = "m1", speed: bool = True) -> dict:
    scores = [{"metric": "perplexity", "value": ppl, "unit": "ppl", "method": {"window": 8}, "method_id": method},
              {"metric": "kl_divergence", "value": ppl / 1e4, "unit": "nats", "method": {}, "method_id": "k1"}]
    if speed:
        scores.append({"metric": "decode_tokens_per_s", "value": 1234.5, "unit": "tok/s", "method": {},
                       "method_id": "s1"})
    return {"key": key, "scores": scores, "versions": {}}


def _both_ways(listed):
    """`engine ls`'s cells from the prepared summaries and from the decoded scores."""
    from engine.render import ls_cells

    return ls_cells(listed), ls_cells(listed, [v.scores for v in listed])


def test_listing_reads_prepared_summaries_that_match_the_scores(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    _register(reg, evaluation=_evaluation("e1", 12.345))
    _register(reg, name="n", key="b" * 64, evaluation=_evaluation("e2", 23.0, speed=False))
    _register(reg, name="p", key="c" * 64)  # never evaluated
    stored = reg.conn.execute("select eval_key, cells_format from score_summaries order by eval_key").fetchall()
    from engine.score_summary import CELLS_FORMAT

    assert stored == [("e1", CELLS_FORMAT), ("e2", CELLS_FORMAT)]
    listed = reg.listing()
    assert listed[0].scores["perplexity"] == {"value": 12.345, "unit": "ppl", "method_id": "m1"}
    assert listed[2].scores == {} and listed[2].cells is None
    prepared, decoded = _both_ways(listed)
    assert prepared == decoded and prepared[2] == []
    headers, cells, _ = prepared
    assert headers[-4:] == ["ppl", "KL", "tok/s", "created"]
    assert [row[-4:-1] for row in cells] == [("12.35", "1.23e-03", "1234"), ("23.00", "2.30e-03", "-"),
                                              ("-", "-", "-")]


def test_a_missing_or_stale_summary_is_remade_from_the_scores(tmp_path):
    """An older engine recorded scores without a summary; a newer one formats a column differently:
    either way the listing shows what the scores say, never the stored text."""
    reg = Registry(tmp_path / "registry.db")
    _register(reg, evaluation=_evaluation("e1", 12.345))
    _register(reg, name="n", key="b" * 64, evaluation=_evaluation("e2", 23.0))
    expected = _both_ways(reg.listing())[1]
    with reg.conn:
        reg.conn.execute("delete from score_summaries where eval_key = 'e1'")
        reg.conn.execute("update score_summaries set cells = 'stale', cells_format = 'older' where eval_key = 'e2'")
    listed = reg.listing()
    assert listed[0].scores["perplexity"]["value"] == 12.345
    assert _both_ways(listed) == (expected, expected)


def test_values_of_different_methods_are_tagged_from_the_scores(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    _register(reg, evaluation=_evaluation("e1", 12.0, method="m1"))
    _register(reg, name="n", key="b" * 64, evaluation=_evaluation("e2", 13.0, method="m2"))
    prepared, decoded = _both_ways(reg.listing())
    assert prepared == decoded
    assert [row[-4] for row in prepared[1]] == ["12.00 (a)", "13.00 (b)"] and prepared[2][0].startswith("perplexity")


def test_ls_json_rows_are_the_scores_as_recorded(tmp_path):
    import json

    from engine.render import LS_KEYS, ls_json, ls_row

    reg = Registry(tmp_path / "registry.db")
    _register(reg, evaluation=_evaluation("e1", 12.345))
    _register(reg, name="p", key="c" * 64)
    listed = reg.listing()
    rows = json.loads(ls_json(listed))
    assert rows == [ls_row(v) for v in listed] and list(rows[0]) == [*LS_KEYS, "source", "scores"]
    assert rows[0]["source"] == {"tree_digest": "t"} and rows[1]["scores"] == {}
    assert rows[0]["scores"]["decode_tokens_per_s"] == {"value": 1234.5, "unit": "tok/s", "method_id": "s1"}
    assert ls_json([]) == "[\n]"
