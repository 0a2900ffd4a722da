"""Typed records the registry returns and the steps produce: JSON columns decoded once, here."""
# No `from __future__ import annotations` here: with it, NamedTuple and TypedDict turn every field
# annotation into a ForwardRef that compile()s its text, ~15 ms of `engine ls`.
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple, TypedDict


@dataclass(frozen=True)
class StepRecord:
    """One step of a variant's plan as it ran (or was reused)."""

    kind: str
    key: str
    cached: bool
    duration_s: float
    params: dict
    versions: dict
    finished: str = ""

    @classmethod
    def from_row(cls, row: dict) -> "StepRecord":
        return cls(row["kind"], row["key"], bool(row["cached"]), row["duration_s"],
                   json.loads(row["params_json"]), json.loads(row["versions_json"]), row.get("finished") or "")


class ScoreRecord(TypedDict):
    """One recorded score; `method_id` says which scores may be compared (engine.comparability)."""

    value: float
    unit: str
    method: dict
    method_id: str
    versions: dict
    engine_version: str
    created: str


class ListedVariant(NamedTuple):
    """One row of `engine ls`: the variant's summary columns and its evaluation's prepared summary
    (engine/score_summary.py), read in one query for the whole registry (no recipe or score decoded;
    a tuple: 10,000 are made per listing). `scores[metric]` = {value, unit, method_id}."""

    name: str
    version: int
    runtime: str
    device: str
    weight_dtype: str | None
    group_size: int | None
    scheme: str | None
    algorithm: str | None
    size_bytes: int | None
    created: str
    description: str
    source_kind: str
    artifact_key: str
    source: Any
    scores_json: str = "{}"
    cells: str | None = None  # tab-separated HEADLINE cells, '' where not measured; None: never evaluated
    methods: str | None = None  # the method id behind each cell, the same way

    @property
    def scores(self) -> dict:
        """{metric: {value, unit, method_id}}, decoded on each call (sorting by a score, footnotes)."""
        return json.loads(self.scores_json)


@dataclass(frozen=True)
class VariantRecord:
    """A registered variant (one row of `variants`), with its recipe and source decoded."""

    name: str
    version: int
    runtime: str
    device: str = "cpu"
    id: int | None = None
    created: str = ""
    description: str = ""
    weight_dtype: str | None = None
    group_size: int | None = None
    scheme: str | None = None
    algorithm: str | None = None
    recipe_path: str | None = None
    recipe_text: str = ""
    recipe_sha256: str = ""
    recipe: dict = field(default_factory=dict)
    source_kind: str = ""
    source_key: str = ""
    source: dict = field(default_factory=dict)
    artifact_key: str = ""
    size_bytes: int | None = None
    engine_version: str = ""
    eval_key: str | None = None
    #: where the artifact's files are, when it was opened through the loader (not a column)
    artifact_dir: str | None = None

    @classmethod
    def from_row(cls, row: dict) -> "VariantRecord":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in known}
        values["recipe"] = json.loads(row["recipe_json"]) if row.get("recipe_json") else {}
        values["source"] = json.loads(row["source_json"]) if row.get("source_json") else {}
        return cls(**values)

    @property
    def ref(self) -> str:
        """NAME@VERSION, what `engine show` and `engine.load` accept."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
