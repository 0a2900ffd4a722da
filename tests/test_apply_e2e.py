"""End to end through the real CLI (subprocesses), the real SQLite file and the real
ONNX Runtime GenAI builder on a tiny synthetic model. Builds are shared where tests only read."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from clirun import engine, private_copy

pytest.importorskip("onnxruntime_genai", reason="the onnxruntime-genai runtime is not installed (engine[ortgenai])")

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnxruntime", "onnxruntime_genai", "huggingface_hub", "numpy.linalg")

TINY = """\
name: {name}
description: {description}
source:
  synthetic: {{architecture: phi3, seed: 0}}
quantization:
  weight_dtype: int4
  group_size: {group_size}
  skip_modules: [lm_head]
target:
  runtime: onnxruntime-genai
  device: {device}
"""


def write_recipe(folder: Path, name="tiny", description="tiny test model", group_size=32, device="cpu") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(TINY.format(name=name, description=description, group_size=group_size, device=device))
    return path




def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A work folder where `tiny` was applied once (registry.db + .engine/)."""
    work = tmp_path_factory.mktemp("built")
    recipe = write_recipe(work)
    proc = engine("apply", str(recipe), cwd=work)
    assert "built" in proc.stdout and "tiny@1" in proc.stdout
    return work


@pytest.fixture
def work(built, tmp_path) -> Path:
    """A private copy of the module's folder, for tests that change or damage it."""
    return private_copy(built, tmp_path)


def test_second_apply_rebuilds_nothing_and_imports_nothing_heavy(built):
    probe = f"""
        import atexit, sys
        heavy = {HEAVY!r}
        atexit.register(lambda: print("HEAVY:", [m for m in heavy if m in sys.modules], file=sys.stderr))
        from engine.cli import main
        main(["apply", "tiny.yaml"])
    """
    proc = python(probe, built)
    assert proc.returncode == 0, proc.stderr
    assert "tiny@1: up to date, nothing rebuilt" in proc.stdout
    assert "HEAVY: []" in proc.stderr


def test_load_generates_in_a_fresh_process(built):
    proc = python("""
        import engine
        m = engine.load("tiny")
        text = m.generate("Hello", max_new_tokens=8)
        assert isinstance(text, str) and m.info.name == "tiny" and m.info.version == 1
        assert type(m.native).__module__.startswith("onnxruntime_genai")
        print("GEN", repr(text))
    """, built)
    assert proc.returncode == 0, proc.stderr
    assert "GEN" in proc.stdout


def test_ls_show_json(built):
    rows = json.loads(engine("ls", "--json", cwd=built).stdout)
    assert [(r["name"], r["version"], r["runtime"], r["weight_dtype"], r["group_size"]) for r in rows] == [
        ("tiny", 1, "onnxruntime-genai", "int4", 32)]
    assert rows[0]["size_bytes"] > 0 and rows[0]["source"]["synthetic"]["architecture"] == "phi3"
    doc = json.loads(engine("show", "tiny", "--json", cwd=built).stdout)
    assert {f["path"] for f in doc["files"]} >= {"model.onnx", "model.onnx.data", "genai_config.json"}
    assert all(len(f["sha256"]) == 64 for f in doc["files"])
    build = doc["steps"][-1]
    assert build["kind"] == "build" and "onnxruntime-genai" in build["versions"]
    assert build["params"] == {"precision": "int4", "execution_provider": "cpu", "block_size": 32,
                               "is_symmetric": True, "accuracy_level": 4, "nodes_to_exclude": ["/lm_head/MatMul"]}
    # accuracy_level 4: the recipe leaves compute_dtype out, so onnxruntime-genai's CPU default (int8) applies
    assert doc["recipe_text"].startswith("name: tiny")
    human = engine("ls", cwd=built).stdout
    assert "tiny" in human and "int4" in human
    assert "model.onnx.data" in engine("show", "tiny", cwd=built).stdout


def test_dry_run_reports_hits_and_misses(work):
    out = engine("apply", "--dry-run", "tiny.yaml", cwd=work).stdout
    assert "build   cached" in out
    write_recipe(work, name="tiny-g64", group_size=64)
    out = engine("apply", "--dry-run", "tiny-g64.yaml", cwd=work).stdout
    assert "source  cached" in out and "build   to build" in out


def test_description_change_does_not_rebuild_group_size_does(work):
    write_recipe(work, description="a new description")
    out = engine("apply", "tiny.yaml", cwd=work).stdout
    assert "tiny@1: up to date, nothing rebuilt" in out
    assert json.loads(engine("show", "tiny", "--json", cwd=work).stdout)["description"] == "a new description"
    write_recipe(work, group_size=16)
    out = engine("apply", "tiny.yaml", cwd=work).stdout
    assert "tiny@2: built" in out
    rows = json.loads(engine("ls", "--all", "--json", cwd=work).stdout)
    assert [(r["version"], r["group_size"]) for r in rows] == [(1, 32), (2, 16)]
    assert rows[0]["artifact_key"] != rows[1]["artifact_key"]
    doc = json.loads(engine("show", "tiny", "--json", cwd=work).stdout)
    assert doc["steps"][0]["cached"] is True  # the synthetic source was reused
    # name@1 still loads the first build
    proc = python("import engine; print(engine.load('tiny@1').info.group_size)", work)
    assert proc.stdout.strip() == "32", proc.stderr


def test_flipped_byte_fails_verify_and_verified_load(work):
    assert engine("verify", cwd=work).returncode == 0
    doc = json.loads(engine("show", "tiny", "--json", cwd=work).stdout)
    data = work / ".engine" / "artifacts" / doc["artifact_key"] / "files" / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    data.write_bytes(bytes(blob))
    proc = engine("verify", cwd=work, check=4)
    assert "model.onnx.data" in proc.stderr and "FAILED" in proc.stdout
    assert "Traceback" not in proc.stderr
    proc = python("""
        import engine
        from engine.errors import VerificationFailed
        try:
            engine.load("tiny", verify=True)
        except VerificationFailed as e:
            print("REFUSED", e.problems)
    """, work)
    assert "REFUSED" in proc.stdout and "model.onnx.data" in proc.stdout, proc.stderr


def test_missing_file_is_named(work):
    doc = json.loads(engine("show", "tiny", "--json", cwd=work).stdout)
    (work / ".engine" / "artifacts" / doc["artifact_key"] / "files" / "genai_config.json").unlink()
    proc = engine("verify", "tiny", cwd=work, check=4)
    assert "missing" in proc.stderr and "genai_config.json" in proc.stderr


def test_rm_then_gc_frees_the_store(work):
    doc = json.loads(engine("show", "tiny", "--json", cwd=work).stdout)
    engine("rm", "tiny", cwd=work)
    assert json.loads(engine("ls", "--json", cwd=work).stdout) == []
    out = engine("gc", cwd=work).stdout
    assert "deleted" in out
    assert not (work / ".engine" / "artifacts" / doc["artifact_key"]).exists()
    proc = engine("show", "tiny", cwd=work, check=5)
    assert "no variant 'tiny'" in proc.stderr


def test_kill_9_mid_build_leaves_nothing_trusted(tmp_path):
    recipe = write_recipe(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "apply", str(recipe)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    staging = tmp_path / ".engine" / "staging"
    deadline = time.time() + 120
    # wait until the runtime build is under way: its staging folder exists and the builder is writing
    while time.time() < deadline and not any(p.name.count(".") == 2 and (p / "logs" / "build.log").exists()
                                              for p in (staging.iterdir() if staging.is_dir() else [])):
        time.sleep(0.05)
    assert proc.poll() is None, "apply finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    registry = tmp_path / "registry.db"
    if registry.exists():
        assert json.loads(engine("ls", "--json", cwd=tmp_path).stdout) == []
    built = [p for p in (tmp_path / ".engine" / "artifacts").iterdir()
             if json.loads((p / "manifest.json").read_text())["kind"] == "build"] \
        if (tmp_path / ".engine" / "artifacts").exists() else []
    assert built == []
    out = engine("apply", str(recipe), cwd=tmp_path).stdout
    assert "tiny@1: built" in out
    assert not any((tmp_path / ".engine" / "staging").iterdir())  # the dead run's staging was swept
    assert engine("verify", cwd=tmp_path).returncode == 0


def test_concurrent_applies_build_once(tmp_path):
    recipe = write_recipe(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "engine", "apply", str(recipe)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stdout = "".join(o[0] for o in outs)
    assert stdout.count("tiny@1: built") == 1 and "tiny@1: registered (artifact was cached)" in stdout \
        or stdout.count("tiny@1: up to date") == 1, stdout
    assert [r["version"] for r in json.loads(engine("ls", "--all", "--json", cwd=tmp_path).stdout)] == [1]
    assert engine("verify", cwd=tmp_path).returncode == 0


def test_missing_device_package_is_refused_cleanly(tmp_path):
    recipe = write_recipe(tmp_path, device="cuda")
    proc = engine("apply", str(recipe), cwd=tmp_path, check=1)
    assert "onnxruntime-genai-cuda" in proc.stderr and "Traceback" not in proc.stderr


def test_unsupported_dtype_refused_before_any_work(tmp_path):
    recipe = write_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("weight_dtype: int4", "weight_dtype: fp4_e2m1"))
    proc = engine("apply", str(recipe), cwd=tmp_path, check=3)
    assert "quantization.weight_dtype" in proc.stderr and "onnxruntime-genai" in proc.stderr
    assert f"{recipe}:6" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "registry.db").exists() and not (tmp_path / ".engine").exists()


def test_trained_fixture_int4_builds_and_generates(tmp_path):
    fixture = ROOT / "models" / "wt2-phi3-7m"  # ships with the repository
    recipe = tmp_path / "wt2.yaml"
    recipe.write_text(f"""\
name: wt2-int4
source: {{path: {fixture}}}
quantization: {{weight_dtype: int4, group_size: 32, skip_modules: [lm_head]}}
target: {{runtime: onnxruntime-genai}}
""")
    engine("apply", str(recipe), cwd=tmp_path)
    proc = python("""
        import engine
        print("GEN", repr(engine.load("wt2-int4").generate("The history of the", max_new_tokens=16)))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.split("GEN", 1)[1]
    assert len(text.strip("' \n")) > 10  # a trained model continues with real words
    assert "up to date" in engine("apply", str(recipe), cwd=tmp_path).stdout


def test_hub_source_from_an_offline_cache(tmp_path):
    from hubcache import repo_folder, write_snapshot

    from engine.synthetic import make_synthetic_model

    model = tmp_path / "model"
    make_synthetic_model({"architecture": "llama", "seed": 1}, model)
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_snapshot(repo_folder(tmp_path / "hf" / "hub", "org/tiny-llama"), commit,
                   {p.name: p.read_bytes() for p in model.iterdir()} | {"README.md": b"not needed"}, ref="main")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    recipe = tmp_path / "hub.yaml"
    recipe.write_text(f"""\
name: hub-tiny
source: {{model: org/tiny-llama, revision: {commit}}}
quantization: {{weight_dtype: int8, group_size: 32}}
target: {{runtime: onnxruntime-genai}}
""")
    assert "hub-tiny@1: built" in engine("apply", str(recipe), cwd=tmp_path, env=env).stdout
    doc = json.loads(engine("show", "hub-tiny", "--json", cwd=tmp_path).stdout)
    assert doc["source"]["identity"] == {"repo": "org/tiny-llama", "commit": commit}
    assert doc["steps"][-1]["params"]["precision"] == "int8"
    # a revision the cache does not hold: one clear message saying how to get it, no traceback
    recipe.write_text(recipe.read_text().replace(commit, "f" * 40))
    proc = engine("apply", str(recipe), cwd=tmp_path, env=env, check=1)
    assert "org/tiny-llama" in proc.stderr and "hf download" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_recipe_corpus_through_the_cli(tmp_path):
    corpus = sorted((ROOT / "tests" / "bad_recipes").glob("*.yaml"))
    proc = engine("validate", *map(str, corpus), cwd=tmp_path, check=3)
    assert f"{len(corpus)} of {len(corpus)} recipe(s) invalid" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = engine("apply", str(ROOT / "tests" / "bad_recipes" / "group_size_48.yaml"), cwd=tmp_path, check=3)
    assert "group_size_48.yaml:" in proc.stderr and "quantization.group_size" in proc.stderr
    assert not (tmp_path / "registry.db").exists()


def test_ctrl_c_mid_build_exits_cleanly(tmp_path):
    recipe = write_recipe(tmp_path, name="tiny-int", group_size=64)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "apply", str(recipe)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = tmp_path / ".engine" / "staging"
    deadline = time.time() + 120
    while time.time() < deadline and not any((p / "logs" / "build.log").exists()
                                              for p in (staging.iterdir() if staging.is_dir() else [])):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not any(staging.iterdir())  # its own staging folder is gone, the builder child with it
    assert not (tmp_path / "registry.db").exists()
