"""Peak memory of one runtime's build, measured the way the engine runs it.

The recipe's build parameters come from the runtime itself (`Runtime.build_params`), the build runs
through `Runtime.build` (its child processes: the onnxruntime-genai model builder, the openvino
export + NNCF child), and a sampler polls every descendant's /proc/PID/status every 0.2 s for its
VmHWM (its own peak resident set) and the largest RssAnon seen (memory it owned, not mapped files).
Prints one JSON line: seconds, the largest child's VmHWM, RssAnon and RssFile at the sampled peak,
the artifact's bytes, the facts (parameters) and the runtime's estimate.

Not a test. Builds that may need more than ~6 GB belong under `flock -x /tmp/heavy.lock` and a
memory cgroup (the group's memory.max_usage_in_bytes is read when --cgroup names it):
  python benchmarks/big_model.py --shape phi-3.5-mini --layers 4 --dir /tmp/x --make-only
  python benchmarks/build_peak.py --model /tmp/x/phi-3.5-mini-4l --runtime openvino --weight-dtype int4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def status(pid: int) -> dict[str, int]:
    """The memory fields of /proc/PID/status, in bytes ({} once the process is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in FIELDS:
                    out[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
                found += children
                todo += children
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


class Sampler(threading.Thread):
    """Polls this process's descendants; keeps, per pid, the last VmHWM and the sample with the
    largest RssAnon (a process's VmHWM is read until it exits, so a short poll interval matters less)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.stop, self.seen = interval, threading.Event(), {}

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            for pid in descendants(me):
                now = status(pid)
                if not now:
                    continue
                try:
                    name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120].decode()
                except OSError:
                    name = "?"
                entry = self.seen.setdefault(pid, {"cmd": name, "VmHWM": 0, "RssAnon": 0, "RssFile": 0,
                                                   "VmRSS": 0, "RssFileAtRssPeak": 0})
                entry["VmHWM"] = max(entry["VmHWM"], now.get("VmHWM", 0))
                if now.get("RssAnon", 0) > entry["RssAnon"]:
                    entry.update(RssAnon=now["RssAnon"], RssFile=now.get("RssFile", 0))
                if now.get("VmRSS", 0) > entry["VmRSS"]:
                    entry.update(VmRSS=now["VmRSS"], RssFileAtRssPeak=now.get("RssFile", 0))
            self.stop.wait(self.interval)


def write_recipe(folder: Path, model: Path, runtime: str, dtype: str, group: int, options: dict,
                 algorithm: str | None = None, calibration: dict | None = None) -> Path:
    quant: dict = {"weight_dtype": dtype, "group_size": -1 if runtime == "openvino" and dtype == "int8" else group}
    if algorithm:
        quant["algorithm"] = algorithm
    if calibration:
        quant["calibration"] = calibration
    if runtime == "openvino" and dtype == "int8":
        quant["scheme"] = "asym"
    target = {"runtime": runtime, "device": "cpu"}
    if options:
        target["options"] = options
    path = folder / "build.yaml"
    path.write_text(json.dumps({"name": "peak", "source": {"path": str(model)}, "quantization": quant,
                                "target": target}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--weight-dtype", default="int4")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--option", action="append", default=[], help="target.options KEY=JSON")
    parser.add_argument("--algorithm", default=None, help="quantization.algorithm (rtn, awq, gptq)")
    parser.add_argument("--calibration", type=Path, default=None, help="a text file: calibration data")
    parser.add_argument("--samples", type=int, default=8, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration tokens a sample")
    parser.add_argument("--work", type=Path, default=None, help="output folder (default: beside the model)")
    parser.add_argument("--cgroup", default=None, help="a memory cgroup v1 name whose max_usage to report")
    parser.add_argument("--keep", action="store_true", help="keep the artifact")
    args = parser.parse_args()

    from engine import memory
    from engine.discovery import get_runtime
    from engine.recipe import load_recipe
    from engine.sources import source_from_recipe

    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    work = args.work or args.model.parent / f"build-{args.model.name}-{args.runtime}-{args.weight_dtype}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "staging" / "out").mkdir(parents=True)
    (work / "logs").mkdir()
    calibration = ({"dataset": str(args.calibration.resolve()), "samples": args.samples, "seq_len": args.seq_len}
                   if args.calibration else None)
    recipe = load_recipe(write_recipe(work, args.model, args.runtime, args.weight_dtype, args.group_size, options,
                                      args.algorithm, calibration))
    runtime = get_runtime(args.runtime)
    params = runtime.build_params(recipe.data, recipe.base_dir(), source_from_recipe(recipe.data["source"],
                                                                                     recipe.base_dir()))
    facts = memory.facts_from_folder(args.model)
    estimate = runtime.build_memory(facts, params)
    sampler = Sampler()
    sampler.start()
    started = time.perf_counter()
    runtime.build(args.model, work / "staging" / "out", params, work / "logs", lambda line: None)
    seconds = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    top = max(sampler.seen.values(), key=lambda e: e["VmHWM"])
    result = {
        "runtime": args.runtime, "weight_dtype": args.weight_dtype, "options": options,
        "algorithm": args.algorithm, "calibration": calibration,
        "params": facts.params, "layers": facts.layers, "stored_bytes": facts.stored_bytes,
        "seconds": round(seconds, 1), "child_vmhwm": top["VmHWM"], "child_rss_anon": top["RssAnon"],
        "child_rss_file_at_anon_peak": top["RssFile"], "child_sampled_rss": top["VmRSS"],
        "child_rss_file_at_rss_peak": top["RssFileAtRssPeak"], "child": top["cmd"][:70],
        "artifact_bytes": sum(p.stat().st_size for p in (work / "staging" / "out").rglob("*") if p.is_file()),
        "estimate_anonymous": estimate.anonymous, "estimate_mapped": estimate.mapped,
        "self_vmhwm": status(os.getpid()).get("VmHWM", 0),
    }
    if args.cgroup:
        result["cgroup_max_usage"] = int(Path(f"/sys/fs/cgroup/memory/{args.cgroup}/memory.max_usage_in_bytes")
                                         .read_text())
    print(json.dumps(result), flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
