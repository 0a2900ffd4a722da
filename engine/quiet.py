"""Keep third-party chatter (warnings, prints, progress bars, C++ log lines) out of the user's terminal.

Libraries write to the terminal from Python (`print`, `warnings`, `logging`) and from C++ (onnxruntime,
OpenVINO, torch's glog-style `W1130 ...` lines), so the engine redirects the process's file descriptors
1 and 2 while a step works: `captured(log)` sends everything written to either into the step's log
file, and the engine's own words (progress, the answer of `engine run`) go through `terminal(1|2)`,
streams on the original stdout/stderr that keep reaching the user. Captures nest (an inner one writes
to its own log, then the outer one resumes).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

_terminals: dict[int, TextIO] = {}
_lock = threading.Lock()
_depth = 0


def terminal(fd: int) -> TextIO:
    """A text stream on the process's original stdout (1) or stderr (2), unaffected by `captured`."""
    with _lock:
        if fd not in _terminals:
            if _depth:  # fds are redirected now: the original is what sys.__stdout__/__stderr__ wrap
                raise RuntimeError("engine.quiet.terminal() first called inside captured()")
            _terminals[fd] = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
        return _terminals[fd]


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


@contextmanager
def captured(log: Path) -> Iterator[Path]:
    """Send fds 1 and 2 (Python and native output alike) to `log` (appended) for the block."""
    global _depth
    terminal(1), terminal(2)  # remember the real ones before the first redirection
    log.parent.mkdir(parents=True, exist_ok=True)
    _flush()
    saved = os.dup(1), os.dup(2)
    target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        _depth += 1
        yield log
    finally:
        _flush()
        _depth -= 1
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def quiet_transformers() -> None:
    """Call before importing transformers in-process: no per-shard bars, only errors logged."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
