"""Recipes that used to validate and then fail (or blow up): bounded sweeps, a sweep with no name
or with every combination skipped, eval lengths beyond the model's context, absurd numbers, and
a source path longer than the OS allows. Each is refused before any work with file:line, exit 3."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from clirun import engine

BASE = """source: {synthetic: {architecture: phi3, seed: 0}}
quantization: {weight_dtype: int4}
target: {runtime: onnxruntime-genai}
"""


def _write(folder: Path, text: str, name: str = "r.yaml") -> str:
    (folder / name).write_text(text)
    return name


def test_a_huge_matrix_is_refused_at_once_without_expanding(tmp_path):
    values = ", ".join(str(i) for i in range(700))
    recipe = _write(tmp_path, "name: x-{group_size}-{seed}\n" + BASE + "matrix:\n"
                    f"  quantization.group_size: [{values}]\n  source.synthetic.seed: [{values}]\n")
    started = time.perf_counter()
    proc = engine("validate", recipe, cwd=tmp_path, check=3)
    assert time.perf_counter() - started < 20
    assert "r.yaml:5:" in proc.stderr and "490,000 combinations" in proc.stderr
    assert "ENGINE_MAX_COMBINATIONS" in proc.stderr


def test_five_keys_of_ten_values_are_refused_fast(tmp_path):
    ten = "[" + ", ".join(str(i) for i in range(10)) + "]"
    keys = ["source.synthetic.seed", "quantization.group_size", "description", "eval.speed.new_tokens",
            "eval.speed.prompt_tokens"]
    matrix = "".join(f"  {k}: {ten}\n" for k in keys)
    recipe = _write(tmp_path, "name: x-{seed}-{group_size}-{description}-{new_tokens}-{prompt_tokens}\n"
                    + BASE + "matrix:\n" + matrix)
    started = time.perf_counter()
    proc = engine("validate", recipe, cwd=tmp_path, check=3)
    assert time.perf_counter() - started < 10
    assert "100,000 combinations" in proc.stderr


def test_the_limit_can_be_raised(tmp_path):
    recipe = _write(tmp_path, "name: x-{group_size}\n" + BASE + "matrix:\n  quantization.group_size: [16, 32, 64]\n")
    proc = engine("validate", recipe, cwd=tmp_path, check=3, env={"ENGINE_MAX_COMBINATIONS": "2"})
    assert "3 combinations" in proc.stderr and "more than 2" in proc.stderr
    engine("validate", recipe, cwd=tmp_path, check=0, env={"ENGINE_MAX_COMBINATIONS": "3"})


@pytest.mark.parametrize("values", ["[16]", "[16, 32]"])
def test_a_sweep_without_a_name(tmp_path, values):
    recipe = _write(tmp_path, BASE + f"matrix:\n  quantization.group_size: {values}\n")
    for command in (("validate", recipe), ("apply", "--dry-run", recipe)):
        proc = engine(*command, cwd=tmp_path, check=3)
        assert "r.yaml:" in proc.stderr and "name" in proc.stderr and "internal error" not in proc.stderr


def test_a_sweep_whose_every_combination_is_skipped(tmp_path):
    recipe = _write(tmp_path, "name: x-{weight_dtype}\n" + BASE
                    + "matrix:\n  quantization.weight_dtype: [nf4, fp4_e2m1]\n")
    for command in (("validate", recipe), ("apply", recipe)):
        proc = engine(*command, cwd=tmp_path, check=3)
        assert "every combination of the sweep is skipped" in proc.stderr
        assert "skipped x-nf4" in proc.stderr
    assert not (tmp_path / "registry.db").exists()


@pytest.mark.parametrize("section, where", [
    ("eval:\n  perplexity: {dataset: data.txt, window: 512}\n  speed: {enabled: false}\n", "eval.perplexity.window"),
    ("eval:\n  speed: {prompt_tokens: 200, new_tokens: 100}\n", "eval.speed"),
])
def test_eval_lengths_beyond_the_context_are_refused_before_work(tmp_path, section, where):
    (tmp_path / "data.txt").write_text("some text " * 100)
    recipe = _write(tmp_path, "name: x\n" + BASE + section)
    proc = engine("apply", "--dry-run", recipe, cwd=tmp_path, check=3)
    assert "r.yaml:" in proc.stderr and where in proc.stderr and "context of 256 tokens" in proc.stderr


@pytest.mark.parametrize("field", [
    "eval:\n  speed: {prompt_tokens: 1000000000000000000000000000000}\n",
    "eval:\n  speed: {new_tokens: 1000000000000000000000000000000}\n",
    "eval:\n  perplexity: {dataset: data.txt, max_windows: 1000000000000000000000000000000}\n",
    "eval:\n  perplexity: {dataset: data.txt, stride: 1000000000000000000000000000000}\n",
    "eval:\n  speed: {new_tokens: 1e30}\n",
])
def test_absurd_numbers_are_refused_at_validation(tmp_path, field):
    (tmp_path / "data.txt").write_text("some text " * 100)
    recipe = _write(tmp_path, "name: x\n" + BASE + field)
    proc = engine("validate", recipe, cwd=tmp_path, check=3)
    assert "r.yaml:6:" in proc.stderr, proc.stderr
    assert "remove the quotes" not in proc.stderr


def test_a_source_path_longer_than_the_os_allows(tmp_path):
    long = "/".join(["a" * 200] * 30)
    for path in (long, "b" * 300):
        recipe = _write(tmp_path, f"name: x\nsource: {{path: {path}}}\n"
                        "quantization: {weight_dtype: int4}\ntarget: {runtime: onnxruntime-genai}\n")
        proc = engine("apply", "--dry-run", recipe, cwd=tmp_path, check=3)
        assert "r.yaml:2:" in proc.stderr and "source.path" in proc.stderr and "too long" in proc.stderr
        assert len(proc.stderr) < 2000
