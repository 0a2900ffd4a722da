"""Progress of long steps (bytes digested or downloaded, layers built, windows scored), with rates.

Long loops open a `task(stage, total, unit)` and `advance()` it; what becomes of that depends on
who listens. The CLI installs a `Terminal` (`reporting(terminal)`): on a TTY one live line that
replaces itself (at most ten times a second), otherwise nothing while a task runs and one short
summary line when a task that took a while ends, so CI logs stay short. A build child started by
engine.subproc has no terminal of its own (its output goes to the build log): it writes its
tasks as JSON lines to the pipe named by ENGINE_PROGRESS_FD, and the parent forwards them to its
own listener. Without a listener a task costs a clock read per advance and shows nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

#: the environment variable naming the write end of the progress pipe in a build child
FD_ENV = "ENGINE_PROGRESS_FD"
#: seconds between two live redraws (and between two events a child sends)
REDRAW = 0.1
#: a task shorter than this leaves no summary line when the output is not a terminal
SUMMARY_AFTER = 2.0

Event = dict  # {"stage", "done", "total", "unit", "seconds", "end"}
_listener: Callable[[Event], None] | None = None
_child: IO[str] | None = None
_child_lock = threading.Lock()


class Task:
    """One long loop's counter; `advance(n)` as work is done, closed by `finish()` (or `with`)."""

    def __init__(self, stage: str, total: float | None = None, unit: str = "") -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.done = 0.0
        self.started = time.monotonic()
        self._sent = 0.0
        self._ended = False
        self.label = ""  # the current stage's name, for stage-counted tasks

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._sent >= REDRAW:
            self._sent = now
            _emit(self.event(now))

    def update(self, done: float) -> None:
        """Set the count (a tool that reports where it is, not how much it did)."""
        self.advance(done - self.done)

    def step(self, name: str) -> None:
        """The next named stage of a stage-counted task (`build: quantizing`), shown at once."""
        self.done += 1
        self.label = name
        self._sent = time.monotonic()
        _emit(self.event(self._sent))

    def finish(self) -> None:
        if not self._ended:
            self._ended = True
            if self.done:
                _emit(self.event(time.monotonic(), end=True))

    def event(self, now: float, end: bool = False) -> Event:
        stage = f"{self.stage} ({self.label})" if self.label else self.stage
        return {"stage": stage, "done": self.done, "total": self.total, "unit": self.unit,
                "seconds": now - self.started, "end": end}

    def __enter__(self) -> Task:
        return self  # the first advance is the first event: a task that does nothing shows nothing

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def task(stage: str, total: float | None = None, unit: str = "") -> Task:
    """A counter for one long loop (use as a context manager)."""
    return Task(stage, total, unit)


def _emit(event: Event) -> None:
    if _listener is not None:
        _listener(event)
    elif _to_parent() is not None:
        with _child_lock:
            try:
                _child.write(json.dumps(event) + "\n")
                _child.flush()
            except (OSError, ValueError):  # the parent went away: progress is never worth a failure
                pass


def _to_parent() -> IO[str] | None:
    """In a build child: the pipe to the parent (opened on first use); else None."""
    global _child
    if _child is None and os.environ.get(FD_ENV, "").isdigit():
        fd = int(os.environ.pop(FD_ENV))  # read once: a grandchild does not inherit the pipe
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):  # never write into an fd that is something else
                _child = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        except OSError:
            pass
    return _child


def forward(event: Event) -> None:
    """A child's event, heard by the parent: passed to this process's listener (or its parent)."""
    if _listener is not None:
        _listener(event)
    elif _to_parent() is not None:
        _emit(event)


@contextlib.contextmanager
def reporting(listener: Callable[[Event], None]) -> Iterator[None]:
    """Send every task's events to `listener` for the block (the CLI's Terminal)."""
    global _listener
    previous, _listener = _listener, listener
    try:
        yield
    finally:
        _listener = previous


@contextlib.contextmanager
def child_channel() -> Iterator[tuple[dict[str, str], tuple[int, ...], Callable[[], None]]]:
    """For starting a child: (env, pass_fds, close_write_end). The parent reads the pipe in a
    thread and forwards each event until the child closes it; leaving the block joins the thread."""
    read_fd, write_fd = os.pipe()
    reader = threading.Thread(target=_pump, args=(read_fd,), daemon=True)
    reader.start()
    closed = False

    def close_write_end() -> None:
        nonlocal closed
        if not closed:
            closed = True
            os.close(write_fd)

    try:
        yield {FD_ENV: str(write_fd)}, (write_fd,), close_write_end
    finally:
        close_write_end()
        reader.join(timeout=5)


def _pump(read_fd: int) -> None:
    with os.fdopen(read_fd, "r", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and "stage" in event:
                forward(event)


# -- the terminal --------------------------------------------------------------------------------------
def human(value: float, unit: str) -> str:
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{value / scale:.1f} {name}"
        return f"{value:.0f} B"
    return f"{value:.0f}" + (f" {unit}" if unit else "")


def describe(event: Event) -> str:
    """`digesting: 3.1 GB / 7.6 GB (41%), 1.1 GB/s` or `scoring: 3/16 windows (19%), 2.1 windows/s`."""
    done, total, unit, seconds = event["done"], event.get("total"), event.get("unit", ""), event["seconds"]
    if not total:
        text = f"{event['stage']}: {human(done, unit)}"
    elif unit == "B":
        text = f"{event['stage']}: {human(done, unit)} / {human(total, unit)} ({100 * done / total:.0f}%)"
    else:
        text = f"{event['stage']}: {done:.0f}/{total:.0f} {unit} ({100 * done / total:.0f}%)".replace("  (", " (")
    if seconds >= 0.5 and done:
        rate = done / seconds
        if unit == "B":
            text += f", {human(rate, unit)}/s"
        elif rate >= 0.1:
            text += f", {rate:.1f} {unit or 'items'}/s"
        else:  # slow steps read better per item: "44.6 s per window"
            text += f", {seconds / done:.1f} s per {(unit or 'items').removesuffix('s')}"
    return text


class Terminal:
    """Where the engine's own progress goes: step messages and task counters, on `stream`.

    Live (a TTY): one line rewritten in place, throttled. Not live: each step message once and a
    task's summary only when it took longer than SUMMARY_AFTER seconds. A tool's output: never."""

    def __init__(self, stream: IO[str], live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self.name = ""
        self._drawn = 0.0
        self._lock = threading.Lock()

    def message(self, name: str, text: str, detail: bool = False) -> None:
        """A step's line. `detail` lines are a tool's own output: library chatter, never shown (it is
        in the step's log; the tool's progress reaches us as tasks)."""
        if detail:
            return
        with self._lock:
            self.name = name
            if self.live:
                self._draw(f"{name}: {text}")
            else:
                self.stream.write(f"{name}: {text}\n")
                self.stream.flush()

    def __call__(self, event: Event) -> None:
        with self._lock:
            now = time.monotonic()
            if self.live and (event.get("end") or now - self._drawn >= REDRAW):
                self._drawn = now
                self._draw(f"{self.name}: {describe(event)}" if self.name else describe(event))
            elif not self.live and event.get("end") and event["seconds"] >= SUMMARY_AFTER:
                self.stream.write(f"{self.name}: {describe(event)} in {event['seconds']:.1f} s\n")
                self.stream.flush()

    def clear(self) -> None:
        with self._lock:
            if self.live:
                self.stream.write("\r\033[K")
                self.stream.flush()

    def _draw(self, text: str) -> None:
        self.stream.write(f"\r\033[K{text}"[:160])
        self.stream.flush()
