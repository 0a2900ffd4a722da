"""Recipe loading and validation: every bad recipe in tests/bad_recipes/ is refused with a located issue."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from engine.errors import EXIT_INVALID_RECIPE, RecipeInvalid
from engine.recipe import Recipe, load_recipe, parse_recipe
from engine.recipe.schemas import load_schema, runtime_schema, schema_dir
from engine.recipe.yamlload import MAX_BYTES

BAD = Path(__file__).parent / "bad_recipes"

GOOD = """\
name: phi35-int4-cpu
description: Phi-3.5 mini, int4 RTN, for CPUs
source:
  model: microsoft/Phi-3.5-mini-instruct
  revision: 0123456789abcdef0123456789abcdef01234567
quantization:
  group_size: 64
  skip_modules:
    - lm_head
target:
  runtime: onnxruntime-genai
"""


def _expectation(path: Path) -> tuple[str, str]:
    """``# expect: <path or -> | <message substring>`` from the first line; a 0-byte file expects 'recipe is empty'."""
    raw = path.read_bytes()
    if not raw:
        return "", "recipe is empty"
    first = raw.split(b"\n", 1)[0].decode("utf-8")
    assert first.startswith("# expect:"), f"{path.name} must start with '# expect: <path> | <message>'"
    where, _, message = first[len("# expect:"):].partition("|")
    where = where.strip()
    return ("" if where == "-" else where), message.strip()


@pytest.mark.parametrize("case", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_recipe_is_refused(case: Path) -> None:
    path, message = _expectation(case)
    with pytest.raises(RecipeInvalid) as caught:
        load_recipe(case)
    issues = caught.value.issues
    assert caught.value.exit_code == EXIT_INVALID_RECIPE
    rendered = "\n".join(i.render() for i in issues)
    matching = [i for i in issues if i.path == path and message in i.message]
    assert matching, f"no issue at {path!r} containing {message!r}; got:\n{rendered}"
    assert all(i.file == str(case) for i in issues)
    empty = "recipe is empty" in message
    assert empty or all(i.line > 0 and i.col > 0 for i in matching), rendered


def test_corpus_covers_enough_cases() -> None:
    assert len(list(BAD.glob("*.yaml"))) >= 19


def test_valid_recipe_fills_defaults() -> None:
    recipe = parse_recipe(GOOD)
    assert isinstance(recipe, Recipe)
    assert recipe.name == "phi35-int4-cpu"
    assert recipe.runtime == "onnxruntime-genai"
    q = recipe.data["quantization"]
    assert q["group_size"] == 64  # given
    assert q["weight_dtype"] == "int4" and q["algorithm"] == "rtn" and q["mse_range"] is False
    assert q["skip_modules"] == ["lm_head"]
    assert "calibration" not in q  # no default for a whole optional section
    assert recipe.data["target"] == {"runtime": "onnxruntime-genai", "device": "cpu", "options": {}}
    assert recipe.text == GOOD
    assert recipe.path is None and recipe.base_dir() == Path.cwd()


def test_quantization_defaults_when_absent_and_synthetic_subdefaults() -> None:
    text = "name: demo\nsource:\n  synthetic: {seed: 7}\ntarget: {runtime: onnxruntime-genai}\n"
    data = parse_recipe(text).data
    assert data["quantization"]["group_size"] == 32
    assert data["source"]["synthetic"] == {
        "seed": 7, "architecture": "phi3", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
    }
    assert data["description"] == ""


def test_defaults_do_not_leak_between_recipes() -> None:
    a = parse_recipe(GOOD.replace("  skip_modules:\n    - lm_head\n", ""))
    a.data["quantization"]["skip_modules"].append("x")
    b = parse_recipe(GOOD.replace("  skip_modules:\n    - lm_head\n", ""))
    assert b.data["quantization"]["skip_modules"] == []


def test_positions() -> None:
    recipe = parse_recipe(GOOD)
    assert recipe.positions[("name",)] == (1, 1)
    assert recipe.positions[("quantization", "group_size")] == (7, 3)
    assert recipe.positions[("quantization", "skip_modules", 0)] == (9, 7)
    assert recipe.positions[("target", "runtime")] == (11, 3)


def test_load_recipe_from_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "r.yaml").write_text(GOOD, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("r.yaml")
    assert recipe.path == tmp_path.resolve() / "r.yaml"
    assert recipe.base_dir() == tmp_path.resolve()


def test_many_errors_reported_together_sorted() -> None:
    text = (
        "name: Bad Name\n"  # 1
        "source:\n"  # 2
        "  model: microsoft/Phi-3.5-mini-instruct\n"  # 3
        "quantization:\n"  # 4
        "  grup_size: 32\n"  # 5
        "  weight_dtype: fp5\n"  # 6
        "  group_size: \"32\"\n"  # 7
        "target:\n"  # 8
        "  runtime: onnxruntime_genai\n"  # 9
    )
    with pytest.raises(RecipeInvalid) as caught:
        parse_recipe(text, "many.yaml")
    issues = caught.value.issues
    got = {(i.path, i.line) for i in issues}
    assert {("name", 1), ("source", 2), ("quantization.grup_size", 5), ("quantization.weight_dtype", 6),
            ("quantization.group_size", 7), ("target.runtime", 9)} <= got
    assert [i.line for i in issues] == sorted(i.line for i in issues)
    assert len({(i.path, i.message) for i in issues}) == len(issues)  # no duplicates
    by_path = {i.path: i for i in issues}
    assert by_path["quantization.grup_size"].hint == "did you mean 'group_size'?"
    assert by_path["target.runtime"].hint == "did you mean 'onnxruntime-genai'?"
    assert all(i.file == "many.yaml" for i in issues)
    assert "many.yaml:5:3: quantization.grup_size: unknown key 'grup_size'" in str(caught.value)


def test_hints() -> None:
    def issue_for(text: str, path: str):
        with pytest.raises(RecipeInvalid) as caught:
            parse_recipe("name: x\nsource: {path: m}\ntarget: {runtime: onnxruntime-genai}\n" + text)
        return next(i for i in caught.value.issues if i.path == path)

    assert "32 or 64" in issue_for("quantization: {group_size: 48}", "quantization.group_size").hint
    assert "remove the quotes" in issue_for("quantization: {group_size: '32'}", "quantization.group_size").hint
    unknown = issue_for("quantization: {mystery: 1}", "quantization.mystery")
    assert unknown.hint.startswith("allowed: weight_dtype, ")
    assert "quotes" in issue_for("description: 5\n", "description").hint


def test_unknown_option_did_you_mean() -> None:
    text = GOOD + "  options: {accuracy_levl: 4}\n"
    with pytest.raises(RecipeInvalid) as caught:
        parse_recipe(text)
    (issue,) = caught.value.issues
    assert issue.path == "target.options.accuracy_levl" and issue.line == 12
    assert issue.hint == "did you mean 'accuracy_level'?"


def test_runtime_schema_skipped_while_common_schema_fails() -> None:
    text = GOOD.replace("group_size: 64", "group_size: 48\n  weight_dtype: fp4_e2m1")
    with pytest.raises(RecipeInvalid) as caught:
        parse_recipe(text)
    assert [i.path for i in caught.value.issues] == ["quantization.group_size"]


def test_missing_file() -> None:
    with pytest.raises(RecipeInvalid) as caught:
        load_recipe("does/not/exist.yaml")
    (issue,) = caught.value.issues
    assert issue.message == "no such file" and issue.file == "does/not/exist.yaml"


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RecipeInvalid):
        load_recipe(tmp_path)


def test_too_big_file_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * MAX_BYTES + "\n")
    with pytest.raises(RecipeInvalid, match="larger than"):
        load_recipe(big)
    with pytest.raises(RecipeInvalid, match="larger than"):
        parse_recipe(big.read_text())


def test_deep_nesting_is_refused_quickly() -> None:
    start = time.perf_counter()
    with pytest.raises(RecipeInvalid, match="nested too deeply"):
        parse_recipe("name: " + "[" * 500_000)
    assert time.perf_counter() - start < 5


def test_timestamps_stay_strings() -> None:
    recipe = parse_recipe(GOOD.replace("description: Phi-3.5 mini, int4 RTN, for CPUs", "description: 2024-05-01"))
    assert recipe.data["description"] == "2024-05-01"


def test_schemas_are_found_and_valid() -> None:
    from jsonschema import Draft202012Validator

    assert (schema_dir() / "recipe.schema.json").is_file()
    Draft202012Validator.check_schema(load_schema("recipe"))
    ort = runtime_schema("onnxruntime-genai")
    assert ort is not None
    Draft202012Validator.check_schema(ort)
    assert runtime_schema("no-such-runtime") is None
    assert runtime_schema("../recipe") is None
