"""A build child for tests/test_buildjob.py: what it does is chosen by the job it is given."""
from __future__ import annotations

import os
import sys

from engine.subproc import JobError, child_main


def run(job: dict) -> dict:
    print(f"[child] working on {job['value']}", flush=True)
    if job["mode"] == "mistake":
        raise JobError(f"skip_modules: '{job['value']}' matches no layer", hint="layers here: a, b")
    if job["mode"] == "crash":
        raise RuntimeError("native code fell over")
    if job["mode"] == "silent":
        sys.exit(0)  # leaves without a result
    return {"value": job["value"], "env": os.environ.get("BUILDJOB_PROBE"), "a": 1}


if __name__ == "__main__":
    sys.exit(child_main(run, sys.argv[1:]))
