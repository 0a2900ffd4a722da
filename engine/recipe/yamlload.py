"""Read recipe YAML into plain data plus a map of where every key sits in the file.

We compose nodes ourselves instead of calling ``yaml.safe_load`` so that every error (ours and the
schema's) can point at a line and column, so that duplicate keys are refused rather than silently
overwritten, and so that anchors/aliases (and with them alias bombs) never reach a constructor.
"""
from __future__ import annotations

import re
from itertools import accumulate
from pathlib import Path
from typing import Any

from engine.errors import RecipeInvalid, RecipeIssue

MAX_BYTES = 1024 * 1024  # recipes are a screenful; anything near this size is a mistake
MAX_FLOW_DEPTH = 64  # libyaml slows down quadratically with `[[[[...`; no recipe nests this deep
Pos = tuple[int, int]
DocPath = tuple[Any, ...]

_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null")}
_TIMESTAMP = _YAML + "timestamp"  # an unquoted date stays the string the user wrote


def _issue(filename: str, message: str, pos: Pos = (0, 0), path: str = "", hint: str | None = None) -> RecipeIssue:
    return RecipeIssue(filename, pos[0], pos[1], path, message, hint)


def dotted(path: DocPath) -> str:
    """``("quantization", "skip_modules", 1)`` -> ``quantization.skip_modules[1]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_text(path: Path, filename: str) -> str:
    """The file's text, or RecipeInvalid saying why it cannot be read (missing, too big, not UTF-8)."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise RecipeInvalid([_issue(filename, f"recipe is larger than {MAX_BYTES // 1024} KiB")])
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeInvalid([_issue(filename, "no such file")]) from None
    except IsADirectoryError:
        raise RecipeInvalid([_issue(filename, "is a directory, not a recipe file")]) from None
    except OSError as exc:
        raise RecipeInvalid([_issue(filename, f"cannot read file: {exc.strerror or exc}")]) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        issue = _issue(filename, "file is not UTF-8 text", (line, col), hint="save the recipe as UTF-8")
        raise RecipeInvalid([issue]) from None


def _syntax_issue(filename: str, exc: Exception, text: str) -> RecipeIssue:
    """A YAML error as an issue at the problem's mark (falling back to the reader's position)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None:
        pos = (mark.line + 1, mark.column + 1)
    elif isinstance(getattr(exc, "position", None), int):  # ReaderError: bad character
        at = exc.position  # type: ignore[attr-defined]
        pos = (text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1)
        problem = str(exc).split("\n")[0]
    else:
        pos = (0, 0)
    hint = None
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context == "expected a single document in the stream":
        return _issue(filename, "a recipe must be a single YAML document", pos,
                      hint="remove the second '---' and everything after it")
    if context:
        hint = context + (f" (line {cmark.line + 1}, column {cmark.column + 1})" if cmark else "")
    return _issue(filename, f"YAML syntax error: {problem or exc}", pos, hint=hint)


def _flow_depth(text: str) -> int:
    """Deepest run of unclosed brackets, counted crudely (quotes ignored): linear, before libyaml sees it."""
    steps = (1 if c in "[{" else -1 for c in re.findall(r"[\[\]{}]", text))
    return max(accumulate(steps), default=0)


def _loader() -> type:
    import yaml

    return getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader


def _refuse_anchors(text: str, filename: str) -> None:
    """Refuse the first anchor or alias before any node is built (a cheap event scan)."""
    import yaml

    for event in yaml.parse(text, Loader=_loader()):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise RecipeInvalid([_issue(
                filename, "YAML anchors/aliases are not allowed in recipes", (mark.line + 1, mark.column + 1),
                hint="write the value out in full")])


class _Builder:
    """Turns a composed node tree into dicts/lists/scalars, recording positions and issues."""

    def __init__(self, filename: str) -> None:
        import yaml

        self.yaml = yaml
        self.constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self.constructors = yaml.SafeLoader.yaml_constructors
        self.filename = filename
        self.positions: dict[DocPath, Pos] = {}
        self.issues: list[RecipeIssue] = []

    def pos(self, node: Any) -> Pos:
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def refuse_tag(self, node: Any, path: DocPath) -> None:
        tag = node.tag.replace(_YAML, "!!")
        self.issues.append(_issue(self.filename, f"YAML tag '{tag}' is not allowed in recipes", self.pos(node),
                                  dotted(path), "recipes hold plain strings, numbers, booleans, lists and mappings"))

    def build(self, node: Any, path: DocPath) -> Any:
        yaml = self.yaml
        if isinstance(node, yaml.MappingNode):
            if node.tag != _YAML + "map":
                return self.refuse_tag(node, path)
            out: dict[str, Any] = {}
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key_pos = self.pos(key_node)
                if key_node.tag == _YAML + "merge":
                    self.issues.append(_issue(self.filename, "YAML merge keys (<<) are not allowed in recipes", key_pos,
                                              dotted(path), "write the keys out in full"))
                    continue
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _YAML + "str":
                    shown = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                    self.issues.append(_issue(self.filename, f"mapping keys must be strings, got {shown!r}", key_pos,
                                              dotted(path), "quote the key"))
                    continue
                key = key_node.value
                if key in seen:
                    message = f"duplicate key '{key}' (lines {seen[key]} and {key_pos[0]})"
                    self.issues.append(_issue(self.filename, message, key_pos, dotted(path + (key,)),
                                              "keep only one of them"))
                    continue
                seen[key] = key_pos[0]
                self.positions[path + (key,)] = key_pos
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _YAML + "seq":
                return self.refuse_tag(node, path)
            items = []
            for index, item in enumerate(node.value):
                self.positions[path + (index,)] = self.pos(item)
                items.append(self.build(item, path + (index,)))
            return items
        if node.tag == _TIMESTAMP:
            return node.value
        if node.tag not in _SCALAR_TAGS:
            return self.refuse_tag(node, path)
        try:
            return self.constructors[node.tag](self.constructor, node)
        except (yaml.YAMLError, ValueError) as exc:  # e.g. `!!int abc`
            self.issues.append(_issue(self.filename, f"bad value {node.value!r}: {exc}", self.pos(node), dotted(path)))
            return None


def load_yaml(text: str, filename: str = "<string>") -> tuple[dict[str, Any], dict[DocPath, Pos]]:
    """Parse recipe text into ``(data, positions)``; positions map a document path to its 1-based (line, col)."""
    import yaml

    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise RecipeInvalid([_issue(filename, f"recipe is larger than {MAX_BYTES // 1024} KiB")])
    if _flow_depth(text) > MAX_FLOW_DEPTH:
        raise RecipeInvalid([_issue(filename, "recipe is nested too deeply")])
    try:
        _refuse_anchors(text, filename)
        root = yaml.compose(text, Loader=_loader())
    except yaml.YAMLError as exc:
        raise RecipeInvalid([_syntax_issue(filename, exc, text)]) from None
    except RecursionError:
        raise RecipeInvalid([_issue(filename, "recipe is nested too deeply")]) from None
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag == _YAML + "null" and root.value == ""):
        raise RecipeInvalid([_issue(filename, "recipe is empty", hint="start from an example recipe")])
    builder = _Builder(filename)
    if not isinstance(root, yaml.MappingNode):
        kind = "a list" if isinstance(root, yaml.SequenceNode) else f"the value {root.value!r}"
        message = f"a recipe must be a mapping of keys (name, source, target, ...), got {kind}"
        raise RecipeInvalid([_issue(filename, message, builder.pos(root))])
    builder.positions[()] = builder.pos(root)
    try:
        data = builder.build(root, ())
    except RecursionError:
        raise RecipeInvalid([_issue(filename, "recipe is nested too deeply")]) from None
    if builder.issues:
        raise RecipeInvalid(builder.issues)
    return data, builder.positions
