"""Sweeps in parallel (issue 13): `engine apply --jobs 2` and `--executor ray` on a real local Ray
cluster give the same keys and byte-identical artifacts as the serial apply, with one worker killed
mid-build along the way (it is retried; nothing of it is registered twice or half).

One sweep of four onnxruntime-genai variants (int8/int4 x group 32/64) on the trained fixture
models/wt2-phi3-7m (no eval: scores hold timings, which no two runs share). The serial apply and the
Ray cluster are made once per module.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from engine.discovery import get_runtime
from engine.executors import Task
from engine.local_executor import LocalExecutor
from tests.clirun import engine
from tests.runtimes_present import unavailable

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "wt2-phi3-7m"

pytestmark = pytest.mark.skipif(bool(unavailable(get_runtime("onnxruntime-genai"))),
                                reason=f"onnxruntime-genai: {unavailable(get_runtime('onnxruntime-genai'))}")

SWEEP = """\
name: par-{{weight_dtype}}-g{{group_size}}
source:
  path: %s
quantization:
  scheme: asym
  skip_modules: [lm_head]
target:
  runtime: onnxruntime-genai
matrix:
  quantization.weight_dtype: [int8, int4]
  quantization.group_size: %s
"""


def _workdir(parent: Path, groups: str = "[32, 64]") -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    (parent / "sweep.yaml").write_text(SWEEP.replace("{{", "{").replace("}}", "}") % (FIXTURE, groups))
    return parent


def _facts(work: Path) -> tuple[list, dict]:
    """What must not depend on the executor: the registry's variants (names, keys, sizes, sources) and
    every store entry's payload, file by file (sha256)."""
    listed = json.loads(engine("ls", "--json", cwd=work).stdout)
    rows = sorted((v["name"], v["version"], v["artifact_key"], v["size_bytes"], json.dumps(v["source"]))
                  for v in listed)
    payload = {}
    for entry in sorted((work / ".engine" / "artifacts").iterdir()):
        for f in sorted((entry / "files").rglob("*")):
            if f.is_file():
                payload[f"{entry.name}/{f.relative_to(entry)}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return rows, payload


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> tuple[list, dict]:
    work = _workdir(tmp_path_factory.mktemp("serial"))
    proc = engine("apply", "sweep.yaml", cwd=work)
    assert proc.stdout.count("registered") == 4, proc.stdout
    rows, payload = _facts(work)
    assert len(rows) == 4 and len({r[2] for r in rows}) == 4, rows
    return rows, payload


class _KillOnce(threading.Thread):
    """Kill -9 the first process seen building a variant (its pid is in its staging folder's name):
    the worker dies mid-build, as on a lost node."""

    def __init__(self, store: Path) -> None:
        super().__init__(daemon=True)
        self.staging, self.killed, self.stop = store / "staging", None, False

    def run(self) -> None:
        while not self.stop and self.killed is None:
            for folder in self.staging.glob("*.*.*") if self.staging.is_dir() else []:
                pid = int(folder.name.rsplit(".", 2)[1])
                if pid != os.getpid() and (folder / "files").is_dir():
                    time.sleep(1.0)  # well inside the build (builds take ~15 s here)
                    try:
                        os.kill(pid, signal.SIGKILL)
                        self.killed = pid
                    except ProcessLookupError:
                        continue
                    return
            time.sleep(0.05)


def _apply_killing_one(work: Path, *args: str, check: int | None = 0) -> tuple[subprocess.CompletedProcess, int]:
    killer = _KillOnce(work / ".engine")
    killer.start()
    try:
        proc = engine("apply", "sweep.yaml", *args, cwd=work, check=check)
    finally:
        killer.stop = True
        killer.join()
    assert killer.killed, "no worker was seen building"
    return proc, killer.killed


def _assert_same(work: Path, serial: tuple[list, dict], proc: subprocess.CompletedProcess) -> None:
    assert proc.stdout.count("registered") == 4, proc.stdout + proc.stderr
    rows, payload = _facts(work)
    assert rows == serial[0]
    assert payload == serial[1]
    assert not list((work / ".engine" / "staging").iterdir())  # the killed build's folder swept


def test_jobs_two_same_keys_and_bytes_with_a_killed_worker_retried(serial, tmp_path) -> None:
    work = _workdir(tmp_path / "jobs")
    proc, killed = _apply_killing_one(work, "--jobs", "2")
    _assert_same(work, serial, proc)
    assert f"building in process {killed}" in proc.stderr  # the killed worker was one of ours, and its variant ran again
    assert proc.stderr.count("building in process") == 5, proc.stderr
    again = engine("apply", "sweep.yaml", "--jobs", "2", cwd=work)  # all cached: registered by the driver, no worker
    assert again.stdout.count("up to date") == 4 and "building" not in again.stderr, again.stdout + again.stderr


def test_address_without_ray_executor_is_a_usage_mistake(tmp_path) -> None:
    work = _workdir(tmp_path / "addr")
    proc = engine("apply", "sweep.yaml", "--address", "127.0.0.1:6379", cwd=work, check=None)
    assert proc.returncode != 0 and "needs --executor ray" in proc.stderr and "Traceback" not in proc.stderr
    assert not (work / ".engine" / "artifacts").exists()


def test_jobs_worker_lost_with_no_retries_fails_that_variant_only(tmp_path) -> None:
    work = _workdir(tmp_path / "noretry", groups="[32]")
    proc, _ = _apply_killing_one(work, "--jobs", "2", "--retries", "0", check=None)
    assert proc.returncode != 0
    assert proc.stdout.count("registered") == 1, proc.stdout
    assert "FAILED" in proc.stderr and "worker process was killed by signal 9" in proc.stderr and "nothing was registered" in proc.stderr
    assert "1 of 2 variant(s) failed" in proc.stderr
    listed = json.loads(engine("ls", "--json", cwd=work).stdout)
    assert len(listed) == 1


def _alive_after(pids: set[int], seconds: float) -> set[int]:
    """The processes of `pids` still running (not zombies) after waiting up to `seconds` for them to go."""
    deadline = time.monotonic() + seconds
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {pid for pid in pids if Path(f"/proc/{pid}").exists()
                 and "zombie" not in Path(f"/proc/{pid}/status").read_text()}
    return alive


def _interrupt_while_building(proc: subprocess.Popen, staging: Path) -> set[int]:
    """Ctrl-C to `proc` once its workers are building (their staging folders exist); the workers' pids."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.1)
    time.sleep(2)
    workers = {int(p.name.rsplit(".", 2)[1]) for p in staging.iterdir()}
    proc.send_signal(signal.SIGINT)
    return workers


def test_ctrl_c_stops_the_running_variants_and_keeps_nothing_half_done(tmp_path) -> None:
    work = _workdir(tmp_path / "interrupt")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "apply", "sweep.yaml", "--jobs", "2"], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = work / ".engine" / "staging"
    workers = _interrupt_while_building(proc, staging)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    for pid in workers:  # the workers (and so their build children) are gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not any(staging.iterdir()), list(staging.iterdir())
    assert json.loads(engine("ls", "--json", cwd=work).stdout) == []


def test_admission_keeps_the_sum_of_estimates_inside_the_budget() -> None:
    gib = 1 << 30
    executor = LocalExecutor(jobs=3, budget=10 * gib)
    task = lambda est: Task(0, None, est)  # noqa: E731
    assert executor._fits(task(6 * gib), [task(3 * gib)])
    assert not executor._fits(task(8 * gib), [task(3 * gib)])
    assert executor._fits(task(12 * gib), [])  # larger than the budget: runs, alone
    assert executor._fits(task(None), [task(9 * gib)])  # no estimate: a job slot is enough


# -- Ray -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address():
    """A Ray cluster of this machine on 127.0.0.1 (2 CPUs), started here and stopped after."""
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="wt-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    context = ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, object_store_memory=80 << 20,
                       _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_same_keys_and_bytes_with_a_killed_worker_retried(serial, ray_address, tmp_path) -> None:
    work = _workdir(tmp_path / "ray")
    proc, killed = _apply_killing_one(work, "--executor", "ray", "--address", ray_address, "--retries", "1")
    _assert_same(work, serial, proc)
    assert "FAILED" not in proc.stderr


def test_ray_missing_says_how_to_install(tmp_path) -> None:
    """Without Ray importable, `--executor ray` is one message and a non-zero exit, before any work."""
    block = tmp_path / "noray"
    block.mkdir()
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n"
        "sys.meta_path.insert(0, _NoRay())\n")
    work = _workdir(tmp_path / "w")
    proc = engine("apply", "sweep.yaml", "--executor", "ray", cwd=work, check=None,
                  env={"PYTHONPATH": f"{block}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.returncode != 0
    assert "needs Ray" in proc.stderr and "pip install 'engine[ray]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (work / ".engine" / "artifacts").exists()


def test_a_shared_store_sweeps_only_this_hosts_dead_builds(tmp_path) -> None:
    """On a store shared by several nodes, a pid names a process on its own host: another node's
    build in progress must survive this node's sweep, this node's dead build must not."""
    from engine.store import _HOST, Store

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    store = Store(tmp_path / "st")
    (tmp_path / "st" / "staging").mkdir(parents=True)
    other = "0" * 8 if _HOST != "0" * 8 else "1" * 8
    theirs = tmp_path / "st" / "staging" / f"{'a' * 64}.{dead}.{other}deadbeef"
    ours = tmp_path / "st" / "staging" / f"{'b' * 64}.{dead}.{_HOST}deadbeef"
    for folder in (theirs, ours):
        folder.mkdir()
    assert store.sweep_staging() == [ours]
    assert theirs.is_dir()


def test_the_shared_source_is_made_once_by_the_driver(tmp_path) -> None:
    """A source that is itself a step (here a synthetic model) is made once, before the workers start,
    and recorded as made by one variant only; the other finds it cached."""
    work = tmp_path / "syn"
    work.mkdir()
    (work / "sweep.yaml").write_text(
        "name: syn-{weight_dtype}\nsource:\n  synthetic: {architecture: phi3, seed: 0}\n"
        "quantization: {scheme: sym, group_size: 32, skip_modules: [lm_head]}\n"
        "target: {runtime: onnxruntime-genai}\nmatrix:\n  quantization.weight_dtype: [int8, int4]\n")
    proc = engine("apply", "sweep.yaml", "--jobs", "2", cwd=work)
    assert proc.stdout.count("registered") == 2, proc.stdout
    assert proc.stderr.count("making the source") == 1, proc.stderr
    assert proc.stderr.index("making the source") < proc.stderr.index("building in process")
    made = []
    for name in ("syn-int8", "syn-int4"):
        steps = json.loads(engine("show", name, "--json", cwd=work).stdout)["steps"]
        made += [s["cached"] is False for s in steps if s["kind"] == "source"]
    assert sorted(made) == [False, True]


def test_ray_worker_lost_with_no_retries_fails_that_variant_only(ray_address, tmp_path) -> None:
    work = _workdir(tmp_path / "raynoretry", groups="[32]")
    proc, _ = _apply_killing_one(work, "--executor", "ray", "--address", ray_address, "--retries", "0", check=None)
    assert proc.returncode != 0
    assert proc.stdout.count("registered") == 1, proc.stdout + proc.stderr
    assert "its Ray worker was lost" in proc.stderr and "nothing was registered" in proc.stderr, proc.stderr
    assert "1 of 2 variant(s) failed" in proc.stderr
    assert len(json.loads(engine("ls", "--json", cwd=work).stdout)) == 1


def test_a_killed_driver_takes_its_workers_with_it(tmp_path) -> None:
    """kill -9 of `engine apply --jobs 2`: its worker processes (and so their build children) die too,
    nothing is registered, and the next apply sweeps their staging folders."""
    work = _workdir(tmp_path / "driverkill", groups="[32]")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "apply", "sweep.yaml", "--jobs", "2"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = work / ".engine" / "staging"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (staging.is_dir() and any(staging.iterdir())):
        time.sleep(0.1)
    workers = {int(p.name.rsplit(".", 2)[1]) for p in staging.iterdir()}
    proc.kill()
    proc.wait()
    alive = _alive_after(workers, seconds=10)
    assert not alive, f"workers outlived their driver: {alive}"
    assert json.loads(engine("ls", "--json", cwd=work).stdout) == []


def test_ray_ctrl_c_cancels_the_running_tasks(ray_address, tmp_path) -> None:
    """Ctrl-C of the driver: its running Ray tasks are cancelled (their workers killed), exit 130,
    nothing registered; the cluster itself stays up for others."""
    work = _workdir(tmp_path / "rayint", groups="[32]")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "apply", "sweep.yaml", "--executor", "ray",
                             "--address", ray_address], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    staging = work / ".engine" / "staging"
    workers = _interrupt_while_building(proc, staging)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    alive = _alive_after(workers, seconds=10)
    assert not alive, f"Ray workers still building after Ctrl-C: {alive}"
    assert json.loads(engine("ls", "--json", cwd=work).stdout) == []
