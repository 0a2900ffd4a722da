"""The one protocol between a runtime's build() and its child process (engine.subproc.run_job /
child_main), with a real child: a result, a user's mistake, a crash, a child that reports nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import BuildFailed
from engine.subproc import run_job

TESTS = Path(__file__).resolve().parent
CHILD = "buildjob_child"


def job(logs: Path, mode: str, lines: list[str] | None = None) -> dict:
    return run_job(CHILD, {"mode": mode, "value": "model.layers.7"}, logs, what="test build",
                   on_line=(lines.append if lines is not None else None),
                   env={"PYTHONPATH": str(TESTS), "BUILDJOB_PROBE": "seen"})


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_result_comes_back_with_the_job_and_log_beside_it(tmp_path):
    lines: list[str] = []
    result = job(tmp_path, "ok", lines)
    assert result == {"value": "model.layers.7", "env": "seen", "a": 1}
    assert "[child] working on model.layers.7" in lines
    assert files(tmp_path) == ["build.log", "job.json", "result.json"]
    assert json.loads((tmp_path / "job.json").read_text())["mode"] == "ok"
    assert "[child] working on" in (tmp_path / "build.log").read_text()


def test_a_users_mistake_is_its_message_and_hint_without_traceback(tmp_path):
    with pytest.raises(BuildFailed) as caught:
        job(tmp_path, "mistake")
    assert str(caught.value) == "skip_modules: 'model.layers.7' matches no layer (layers here: a, b)"
    assert "Traceback" not in str(caught.value)
    assert json.loads((tmp_path / "result.json").read_text()) == {
        "error": "skip_modules: 'model.layers.7' matches no layer", "hint": "layers here: a, b"}
    assert "exit 3" not in str(caught.value) and files(tmp_path) == ["build.log", "job.json", "result.json"]


def test_a_crash_shows_the_logs_tail_and_never_a_stale_result(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"error": "from an earlier run"}))
    with pytest.raises(BuildFailed) as caught:
        job(tmp_path, "crash")
    message = str(caught.value)
    assert message.startswith("test build failed (exit 1)") and "RuntimeError: native code fell over" in message
    assert "earlier run" not in message
    assert files(tmp_path) == ["build.log", "job.json"]  # the stale result is gone, no new one


def test_a_child_that_reports_nothing_fails(tmp_path):
    with pytest.raises(BuildFailed, match="test build exited without writing result.json"):
        job(tmp_path, "silent")
    assert files(tmp_path) == ["build.log", "job.json"]


def test_the_child_side_imports_nothing_heavy():
    code = ("import sys, engine.subproc, engine.runtimes.itrex_build, engine.runtimes.openvino_build; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'openvino', 'neural_compressor') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=TESTS.parent)
    assert out.stdout.strip() == "[]"
