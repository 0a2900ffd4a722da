"""Progress on long steps (engine.progress): the real CLI under a pseudo-terminal shows live lines
with rates for the builder's stages and the windows scored; piped, it stays a few short lines; a
build child's tasks reach the parent through the progress pipe."""
from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import engine, library_lines

from engine import progress

ROOT = Path(__file__).resolve().parents[1]

RECIPE = f"""\
name: shown
source:
  path: {ROOT / "models" / "wt2-phi3-7m"}
quantization:
  weight_dtype: int4
  group_size: 32
target:
  runtime: onnxruntime-genai
  device: cpu
eval:
  perplexity:
    dataset: {ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"}
    window: 256
    max_windows: 8
  speed: {{enabled: false}}
"""


def _under_pty(args: list[str], cwd: Path) -> tuple[str, int]:
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal; everything it wrote, its exit code."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the engine
        os.chdir(cwd)
        os.execv(sys.executable, [sys.executable, "-m", "engine", *args])
    out = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return out.decode("utf-8", "replace"), os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not (ROOT / "models" / "wt2-phi3-7m").is_dir(), reason="the shipped model is missing")
def test_terminal_shows_live_progress_and_pipes_stay_short(tmp_path):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    (tmp_path / "r.yaml").write_text(RECIPE)
    text, code = _under_pty(["apply", "r.yaml"], tmp_path)
    assert code == 0, text
    frames = [f.removeprefix("\033[K") for f in text.split("\r")]
    assert any("onnxruntime-genai builder: reading layers: 6/6 layers (100%)" in f for f in frames), frames
    assert any("builder: quantizing layers" in f for f in frames), frames
    scored = [f for f in frames if "reference: scoring the source:" in f]
    assert any("8/8 windows (100%)" in f for f in scored), scored
    assert any(" windows/s" in f for f in frames if "scoring" in f), frames  # a rate, once it means something
    assert any("evaluating: scoring the variant: 8/8 windows" in f for f in frames), frames
    assert not library_lines(text.replace("\r", "\n")), library_lines(text.replace("\r", "\n"))
    assert "Reading layer" not in text and "Saving " not in text  # the builder's own lines stay in its log

    piped = engine("apply", "--force", "r.yaml", cwd=tmp_path)  # not a terminal: CI's view of the same work
    lines = piped.stderr.splitlines()
    assert "\r" not in piped.stderr and "\033" not in piped.stderr
    assert 1 <= len(lines) <= 8 and all(len(line) <= 160 for line in lines), lines  # one per step stage
    assert len([line for line in lines if "/s" in line]) <= 2, lines  # tasks: a summary only when long
    assert "built (build" in piped.stdout


def test_a_build_childs_tasks_reach_the_parent_through_the_pipe():
    """A real child process (as engine.subproc starts builds) reports stages; the parent hears them."""
    heard: list[dict] = []
    code = ("from engine.progress import task\n"
            "with task('child build', 3, 'stages') as t:\n"
            "    for name in ('loading', 'quantizing', 'saving'):\n"
            "        t.step(name)\n"
            "print('library chatter the parent must not show')\n")
    with progress.reporting(heard.append), progress.child_channel() as (env, fds, close_ours):
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, pass_fds=fds,
                                stdout=subprocess.PIPE, text=True)
        close_ours()
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert [e["stage"] for e in heard if not e["end"]] == [
        "child build (loading)", "child build (quantizing)", "child build (saving)"]
    assert heard[-1]["end"] and heard[-1]["done"] == 3 and heard[-1]["total"] == 3
    assert "chatter" in out  # stdout is still the tool's (it goes to the build log), never mixed into events


def test_not_a_terminal_prints_only_summaries_of_long_tasks():
    stream = io.StringIO()
    term = progress.Terminal(stream, live=False)
    term.message("v", "building x")
    term.message("v", "a tool's own line", detail=True)
    for seconds, end in ((0.5, False), (1.0, True), (5.0, False), (6.7, True)):
        term({"stage": "digesting", "done": 7.6e9, "total": None, "unit": "B", "seconds": seconds, "end": end})
    assert stream.getvalue().splitlines() == ["v: building x", "v: digesting: 7.6 GB, 1.1 GB/s in 6.7 s"]


def test_hub_download_bytes_become_a_task():
    """huggingface_hub's snapshot_download drives its tqdm_class this way (a bytes bar whose total grows
    as each file's size is known, and a files bar); no network here, so the class is driven directly."""
    from engine.sources import _download_progress

    heard: list[dict] = []
    bars = _download_progress()
    with progress.reporting(heard.append):
        files = bars(total=2, desc="Fetching 2 files")
        data = bars(total=0, initial=0, unit="B", unit_scale=True, desc="Downloading", name="huggingface_hub")
        data.total += 3000
        data.update(1000)
        files.update(1)
        progress.REDRAW, saved = 0.0, progress.REDRAW
        try:
            data.update(2000)
        finally:
            progress.REDRAW = saved
        files.close()
        data.close()
    assert [e["stage"] for e in heard] == ["downloading"] * len(heard) and len(heard) >= 2
    assert heard[-1]["end"] and heard[-1]["done"] == 3000 and heard[-1]["total"] == 3000 and heard[-1]["unit"] == "B"


def test_rates_read_well_when_fast_and_when_slow():
    fast = {"stage": "scoring", "done": 8, "total": 16, "unit": "windows", "seconds": 2.0, "end": False}
    slow = {"stage": "scoring", "done": 2, "total": 2, "unit": "windows", "seconds": 89.2, "end": True}
    assert progress.describe(fast) == "scoring: 8/16 windows (50%), 4.0 windows/s"
    assert progress.describe(slow) == "scoring: 2/2 windows (100%), 44.6 s per window"
