"""A seeded recipe fuzzer: thousands of mutated recipes through `engine validate` and
`engine apply --dry-run` (the real CLI entry point, in-process for speed). No mutation may end in
exit 70 (a bug in the engine), print a traceback, or take more than a few seconds."""
from __future__ import annotations

import copy
import io
import random
import signal
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.errors import EXIT_INTERNAL

SEED = 14
MUTATIONS = 2000
PER_CASE_SECONDS = 10

BASES = [
    {"name": "fz", "description": "d", "source": {"synthetic": {"architecture": "phi3", "seed": 0}},
     "quantization": {"weight_dtype": "int4", "group_size": 32, "scheme": "sym", "skip_modules": ["lm_head"]},
     "target": {"runtime": "onnxruntime-genai", "device": "cpu", "options": {}}},
    {"name": "fz-{weight_dtype}-{group_size}", "source": {"path": "model"},
     "quantization": {"weight_dtype": "int4"}, "target": {"runtime": "onnxruntime-genai"},
     "matrix": {"quantization.weight_dtype": ["int4", "int8"], "quantization.group_size": [32, 64]}},
    {"name": "fz-eval", "source": {"synthetic": {"architecture": "phi3", "seed": 1}},
     "quantization": {"weight_dtype": "int8"}, "target": {"runtime": "onnxruntime-genai"},
     "eval": {"perplexity": {"dataset": "data.txt", "window": 64, "stride": 32, "max_windows": 2, "bos": True},
              "fidelity": True, "speed": {"prompt_tokens": 16, "new_tokens": 8}}},
    {"name": "fz-hub", "source": {"model": "org/name", "revision": "0" * 40},
     "quantization": {"weight_dtype": "int4"}, "target": {"runtime": "onnxruntime-genai"}},
]
VALUES = [None, True, False, 0, -1, 1, 3, 16, 48, 2**31, 2**63, 10**30, -10**30, 1.5, 1e30, float("inf"),
          "", " ", "1e30", "int4", "nf4", "phi3", "lm_head", "{weight_dtype}", "{nope}", "../..", "/proc",
          "/etc/shadow", "a" * 300, "/".join(["b" * 200] * 25), "é\u202e\x00", "\t", [], [1, 2], ["x"] * 50,
          {}, {"a": 1}, {"synthetic": {}}, {"path": "/"}, {"model": "x"}, list(range(40))]
KEYS = ["name", "source", "quantization", "target", "eval", "matrix", "description", "window", "seed",
        "path", "model", "revision", "runtime", "weight_dtype", "group_size", "options", "speed", "x-y",
        "quantization.group_size", "target.runtime", "source.synthetic.seed", "eval.speed.new_tokens"]


def _paths(doc, prefix=()):
    """Every (path, container) in a nested document."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, prefix + (i,))


def _get(doc, path):
    for part in path:
        doc = doc[part]
    return doc


def _mutate_doc(rng: random.Random, doc):
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(doc))
        path = rng.choice(paths)
        if not path:
            continue
        parent, last = _get(doc, path[:-1]), path[-1]
        action = rng.random()
        if action < 0.5:
            parent[last] = copy.deepcopy(rng.choice(VALUES))
        elif action < 0.7 and isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, dict):
            parent[rng.choice(KEYS)] = copy.deepcopy(rng.choice(VALUES + [rng.choice(BASES)]))
    return doc


def _mutate_text(rng: random.Random, text: str) -> str:
    lines = text.splitlines()
    choice = rng.random()
    if choice < 0.3:
        return text[: rng.randrange(len(text) + 1)]
    if choice < 0.5 and lines:
        i = rng.randrange(len(lines))
        return "\n".join(lines[:i] + [lines[i]] * rng.randint(2, 4) + lines[i + 1:])
    if choice < 0.7:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(["{", "[", ":", "- ", "\n  ", "&a ", "*a", "!!python/object ", "'", "\t",
                                      "? ", "%YAML 1.1\n", "\x00", "1e30"]) + text[i:]
    rng.shuffle(lines)
    return "\n".join(lines)


def _recipe(rng: random.Random) -> str:
    doc = copy.deepcopy(rng.choice(BASES))
    if rng.random() < 0.8:
        doc = _mutate_doc(rng, doc)
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True) if isinstance(doc, dict) else str(doc)
    return _mutate_text(rng, text) if rng.random() < 0.3 else text


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _cli(*args: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return code, err.getvalue()


@pytest.fixture()
def playground(tmp_path: Path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "phi3", "max_position_embeddings": 128}')
    (tmp_path / "data.txt").write_text("The quick brown fox. " * 50)
    monkeypatch.chdir(tmp_path)
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "ENGINE_DEBUG": "",
                        "ENGINE_REGISTRY": str(tmp_path / "registry.db"),
                        "ENGINE_STORE": str(tmp_path / "store")}.items():
        monkeypatch.setenv(name, value)
    return tmp_path


def test_fuzzed_recipes_never_crash_or_hang(playground):
    rng = random.Random(SEED)
    previous = signal.signal(signal.SIGALRM, _alarm)
    seen: dict[int, int] = {}
    try:
        for i in range(MUTATIONS):
            text = _recipe(rng)
            (playground / "r.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
            for command in (("validate", "r.yaml"), ("apply", "--dry-run", "r.yaml")):
                signal.alarm(PER_CASE_SECONDS)
                try:
                    code, err = _cli(*command)
                except _Hang:
                    pytest.fail(f"mutation {i} hung in `engine {' '.join(command)}`:\n{text}")
                finally:
                    signal.alarm(0)
                assert code != EXIT_INTERNAL and "Traceback" not in err, \
                    f"mutation {i}: `engine {' '.join(command)}` exit {code}\n{err}\nrecipe:\n{text}"
                seen[code] = seen.get(code, 0) + 1
                if code != 0:
                    break  # an invalid recipe is not planned
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert seen.get(0, 0) > 100 and seen.get(3, 0) > 100, seen  # both valid and invalid recipes were tried
