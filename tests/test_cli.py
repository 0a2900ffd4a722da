"""The CLI's own contract: documented commands, exit codes, no side effects on reads. No builds here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_is_documented(command):
    assert cli.commands[command].help, f"`engine {command}` has no help text"
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output
    assert f"`engine {command}`" in (ROOT / "README.md").read_text() or f"engine {command}" in (ROOT / "README.md").read_text()


def test_reads_never_create_a_registry(tmp_path):
    proc = run("ls", cwd=tmp_path)
    assert proc.returncode == 0 and "no variants" in proc.stderr
    assert json.loads(run("ls", "--json", cwd=tmp_path).stdout) == []
    proc = run("show", "nothing", cwd=tmp_path)
    assert proc.returncode == 5 and "no registry" in proc.stderr and "engine apply" in proc.stderr
    assert run("verify", cwd=tmp_path).returncode == 5
    assert not (tmp_path / "registry.db").exists()


def test_schema_and_version(tmp_path):
    doc = json.loads(run("schema", cwd=tmp_path).stdout)
    assert doc["properties"]["quantization"]["properties"]["group_size"]["default"] == 32
    ort = json.loads(run("schema", "--runtime", "onnxruntime-genai", cwd=tmp_path).stdout)
    assert "fp4_e2m1" not in ort["properties"]["quantization"]["properties"]["weight_dtype"]["enum"]
    proc = run("schema", "--runtime", "nope", cwd=tmp_path)
    assert proc.returncode == 1 and "no runtime 'nope' is installed" in proc.stderr and "onnxruntime-genai" in proc.stderr
    assert "engine, version" in run("--version", cwd=tmp_path).stdout


def test_validate_good_recipes(tmp_path):
    recipes = sorted(str(p) for p in (ROOT / "recipes").glob("*.yaml"))
    proc = run("validate", *recipes, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(": ok (") >= len(recipes)  # a sweep prints one line per variant
    assert "wt2-sweep-openvino-int8-g-1" in proc.stdout and "skipped wt2-sweep-onnxruntime-genai-int8-g-1" in proc.stderr


def test_usage_error_is_exit_2(tmp_path):
    proc = run("apply", cwd=tmp_path)
    assert proc.returncode == 2 and "Missing argument" in proc.stderr


def test_unknown_variant_suggests_a_name(tmp_path):
    from engine.registry import Registry

    Registry(tmp_path / "registry.db").close()
    proc = run("show", "phi35", cwd=tmp_path)
    assert proc.returncode == 5 and "engine apply" in proc.stderr
