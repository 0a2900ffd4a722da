"""`engine ls` at scale: build a registry of N variants (default 10,000) and time the listing commands.

    .venv/bin/python benchmarks/ls_scale.py [N]

The rows are written straight into a real registry.db (the engine's own migrations make it), each
with a realistic recipe, source and five headline scores; the artifacts are not built. Each command
runs as a user runs it (`python -m engine ...`, stdout to a pipe), best of 3 wall times and CPU
times (user + system: the steadier number when other jobs share the machine), all in this one run. Targets (issue 16, a 2-core machine): ls < 0.3 s, ls --json < 0.5 s.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNTIMES = ("onnxruntime-genai", "openvino", "itrex")
DTYPES = ("int4", "int8", "nf4", "fp16")


def make_registry(path: Path, n: int) -> None:
    from engine.registry import Registry
    from engine.score_summary import write_summary

    reg = Registry(path)  # creates the tables through the migrations
    recipe_text = (ROOT / "recipes" / "demo-wt2-int4.yaml").read_text()
    variants, scores = [], []
    for i in range(n):
        runtime, dtype = RUNTIMES[i % 3], DTYPES[(i // 3) % 4]
        name = f"sweep{i // 100:03d}-{runtime}-{dtype}-{i:05d}"
        key = hashlib.sha256(name.encode()).hexdigest()
        recipe = {"name": name, "description": "a sweep variant", "source": {"path": "../models/wt2-phi3-7m"},
                  "quantization": {"weight_dtype": dtype, "group_size": 32, "scheme": "sym", "algorithm": "rtn",
                                   "compute_dtype": "fp32", "mse_range": False, "skip_modules": ["lm_head"]},
                  "target": {"runtime": runtime, "device": "cpu", "options": {}}}
        source = {"kind": "path", "key": "s" * 64, "identity": {"tree_digest": "d" * 64}, "path": "/x/models/m"}
        variants.append((name, 1, f"2026-11-{1 + i % 28:02d}T12:00:00Z", "a sweep variant", runtime, "cpu", dtype, 32,
                         "sym", "rtn", "recipes/sweep.yaml", recipe_text, "r" * 64, json.dumps(recipe, sort_keys=True),
                         "path", "s" * 64, json.dumps(source, sort_keys=True), json.dumps(source["identity"]), key, 3_000_000 + i, "0.1.0", "e" + key[1:]))
        method = {"dataset_sha256": "0bd051ff", "window": 256, "stride": 256, "windows": 16, "bos": True}
        for metric, value, unit in (("perplexity", 190 + (i % 97) / 10, "ppl"), ("kl_divergence", 1e-3 * (1 + i % 13), "nats"),
                                    ("top1_agreement", 0.9 + (i % 7) / 100, "share"), ("size_ratio", 0.3, "x"),
                                    ("decode_tokens_per_s", 1000 + i % 500, "tok/s")):
            scores.append(("e" + key[1:], key, metric, value, unit, json.dumps(method), "m1", "{}", "0.1.0", "2026-11-30T12:00:00Z"))
    with reg.conn:
        reg.conn.executemany(
            "insert into variants (name, version, created, description, runtime, device, weight_dtype, group_size,"
            " scheme, algorithm, recipe_path, recipe_text, recipe_sha256, recipe_json, source_kind, source_key,"
            " source_json, source_identity, artifact_key, size_bytes, engine_version, eval_key)"
            " values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", variants)
        reg.conn.executemany(
            "insert into scores (eval_key, artifact_key, metric, value, unit, method_json, method_id, versions_json,"
            " engine_version, created) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", scores)
        for eval_key in {row[0] for row in scores}:  # as Registry._record_scores does
            write_summary(reg.conn, eval_key)
    reg.close()


def best_of(cmd: list[str], env: dict, runs: int = 3) -> tuple[float, float, int]:
    """Best wall time and best CPU time (user + system of the child) over `runs`, and the output size.
    On a machine shared with other jobs the CPU time is the steadier of the two."""
    import resource

    walls, cpus, size = [], [], 0
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, check=True).stdout
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        size = len(out)
    return min(walls), min(cpus), size


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry.db"
        started = time.perf_counter()
        make_registry(registry, n)
        print(f"registry with {n:,} variants written in {time.perf_counter() - started:.1f} s")
        env = {**os.environ, "ENGINE_REGISTRY": str(registry), "ENGINE_STORE": str(Path(tmp) / "store")}
        # as a user's shell runs it: Python keeps its bytecode cache (this sandbox sets
        # PYTHONDONTWRITEBYTECODE=1, which makes every run compile the engine's modules from source)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        print(f"bytecode cache: {'on' if 'PYTHONDONTWRITEBYTECODE' not in env else 'off'}")
        engine = [sys.executable, "-m", "engine"]
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'command (best of 3)':<52} {'wall':>8} {'cpu':>8}")
        wall, cpu, _ = best_of([sys.executable, "-c", "pass"], env)
        print(f"{'python -c pass (interpreter start, for scale)':<52} {wall:>7.3f}s {cpu:>7.3f}s")
        for args in (["ls"], ["ls", "--json"], ["ls", "--all"], ["ls", "sweep01*", "--runtime", "openvino"],
                     ["ls", "--sort", "kl", "--limit", "20"], ["show", "sweep000-onnxruntime-genai-int4-00000", "--json"]):
            wall, cpu, size = best_of(engine + args, env)
            print(f"{'engine ' + ' '.join(args):<52} {wall:>7.3f}s {cpu:>7.3f}s  ({size:,} bytes out)")


if __name__ == "__main__":
    main()
