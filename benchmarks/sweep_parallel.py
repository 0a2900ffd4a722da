"""The same sweep three ways on this machine: serial, `--jobs 2`, and `--executor ray` (a Ray cluster
of this machine that the engine starts itself, its start-up included). Wall times and ratios, one run
each, every run into a fresh registry and store; and a projection for a 16-variant 8 B sweep on 4 nodes.

    python benchmarks/sweep_parallel.py [--variants 4] [--jobs 2]
    python benchmarks/sweep_parallel.py --project-only

The sweep: onnxruntime-genai int8/int4 x group sizes on the trained fixture models/wt2-phi3-7m (no
eval). The machine is shared (load average printed): one run, read the ratios with that in mind.
"""
from __future__ import annotations

import argparse
import heapq
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = [32, 64, 128, 16]


def sweep_text(variants: int) -> str:
    groups = GROUPS[: max(1, variants // 2)]
    return (f"name: bench-{{weight_dtype}}-g{{group_size}}\nsource:\n  path: {ROOT / 'models' / 'wt2-phi3-7m'}\n"
            "quantization:\n  scheme: asym\n  skip_modules: [lm_head]\ntarget:\n  runtime: onnxruntime-genai\n"
            f"matrix:\n  quantization.weight_dtype: [int8, int4]\n  quantization.group_size: {groups}\n")


def timed_apply(variants: int, *args: str) -> tuple[float, list[str], list[str]]:
    """Wall seconds of `engine apply sweep.yaml ARGS` in a fresh folder; its result lines; its keys."""
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    try:
        (work / "sweep.yaml").write_text(sweep_text(variants))
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "engine", "apply", "sweep.yaml", *args], cwd=work,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode:
            sys.exit(f"engine apply {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        keys = sorted(p.name for p in (work / ".engine" / "artifacts").iterdir())
        return seconds, proc.stdout.splitlines(), keys
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- projection ----------------------------------------------------------------------------------
def simulate(durations: list[float], memory: list[float], nodes: int, node_memory: float, slots: int,
             overhead: float) -> float:
    """Wall seconds of the driver's schedule: each variant goes to the first node with a free slot
    and room for its memory estimate (a variant larger than a node runs alone there), in order;
    `overhead` per variant is reading the shared source and writing the artifact over the network."""
    free_at: list[tuple[float, int]] = []  # (finish time, node) of running variants
    running: dict[int, list[float]] = {n: [] for n in range(nodes)}  # node -> memory of its running variants
    now, pending = 0.0, list(zip(durations, memory))
    while pending:
        placed = False
        for node in range(nodes):
            duration, mem = pending[0]
            used = sum(running[node])
            if len(running[node]) < slots and (not running[node] or used + mem <= node_memory):
                running[node].append(mem)
                heapq.heappush(free_at, (now + duration + overhead, node, mem))
                pending.pop(0)
                placed = True
                break
        if not placed:
            now, node, mem = heapq.heappop(free_at)
            running[node].remove(mem)
    return max((t for t, _, _ in free_at), default=now)


def projection() -> None:
    """16 variants of an 8 B model, from the one measured large build here (../shared/BACKENDS.md: the
    onnxruntime-genai int4 build of a 3.8 B checkpoint, 136 s and 24.1 GB peak on 2 cores, fp32 in
    memory), scaled linearly in parameters: ~290 s and ~51 GB a variant on 2 cores."""
    scale = 8.0 / 3.8
    build, peak = 136 * scale, 24.1e9 * scale
    # int8 and per-channel variants are cheaper to quantize than int4 grouped; AWQ/GPTQ much dearer:
    # the sweep assumed is 8 RTN variants (x1.0) and 8 calibrated ones (x4: calibration passes), all alike in memory
    durations = [build] * 8 + [build * 4] * 8
    memory = [peak] * 16
    overhead = 16e9 / 1e9 + 5e9 / 0.5e9  # 16 GB fp16 source read at 1 GB/s + ~5 GB artifact written at 0.5 GB/s
    serial = sum(durations) + overhead * 16
    print("\nprojection: 16-variant 8 B sweep (8 RTN ~%.0f s, 8 calibrated ~%.0f s; %.0f GB peak each)"
          % (build, build * 4, peak / 1e9))
    print(f"  serial, one node                       {serial / 3600:6.2f} h")
    for nodes, node_gb, slots in ((4, 64, 1), (4, 128, 2), (4, 256, 4)):
        wall = simulate(sorted(durations, reverse=True), memory, nodes, node_gb * 1e9, slots, overhead)
        print(f"  {nodes} nodes x {node_gb:>3} GB, {slots} slot(s)/node    {wall / 3600:6.2f} h"
              f"   ({serial / wall:.1f}x)")
    print("  (slots > 1 assume each node has the cores for that many builds at the 2-core speed)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--project-only", action="store_true")
    args = parser.parse_args()
    if not args.project_only:
        print(f"machine: {os.cpu_count()} cores, load average {open('/proc/loadavg').read().split()[:3]}")
        runs = {}
        for label, flags in (("serial", ()), (f"--jobs {args.jobs}", ("--jobs", str(args.jobs))),
                             ("--executor ray", ("--executor", "ray"))):
            seconds, lines, keys = timed_apply(args.variants, *flags)
            runs[label] = (seconds, keys)
            print(f"{label:<16} {seconds:7.1f} s   ({len(lines)} variants registered)", flush=True)
        base, base_keys = runs["serial"]
        for label, (seconds, keys) in runs.items():
            same = "same keys" if keys == base_keys else "KEYS DIFFER"
            print(f"  {label:<16} serial/this = {base / seconds:.2f}x   {same}")
    projection()
    return 0


if __name__ == "__main__":
    sys.exit(main())
