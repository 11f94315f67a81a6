"""The typed ``manifest.json``: field types, shard entries, stats, and its validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lightning_opd.config import from_dict, to_dict
from lightning_opd.errors import StoreError, StoreVersionError

from .header import HEADER_KEYS, compute_store_id, header_problems
from .layout import FORMAT_NAME, KINDS, is_int, parse_version, shard_file
from .schema import schema_options, store_schema

# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


# JSON types of the manifest's fields ("int" never accepts a bool; "float" accepts an int). Checked
# before the manifest is built, so a hand-edited or damaged manifest is a StoreError, not a TypeError.
_STR, _INT, _FLOAT, _DICT, _LIST, _NONE = str, "int", "float", dict, list, type(None)
MANIFEST_FIELD_TYPES: dict[str, tuple[Any, ...]] = {
    "format": (_STR,), "format_version": (_STR,), "writer_version": (_STR,), "created_at": (_STR,),
    "store_uuid": (_STR,), "store_id": (_STR,), "kind": (_STR,), "student": (_DICT,), "sampling": (_DICT,),
    "horizon": (_INT,), "prompt_set": (_DICT,), "num_parts": (_INT,), "teacher": (_DICT, _NONE),
    "teacher_consistency": (_DICT, _NONE), "topk": (_DICT, _NONE), "columns": (_LIST,), "shards": (_LIST,),
    "stats": (_DICT, _NONE), "lineage": (_LIST,), "extra": (_DICT, _NONE), "encoding": (_DICT, _NONE),
}  # fmt: skip
SHARD_FIELD_TYPES: dict[str, tuple[Any, ...]] = {
    "file": (_STR,), "part": (_INT,), "rows": (_INT,), "tokens": (_INT,), "bytes": (_INT,), "sha256": (_STR,),
}  # fmt: skip
STATS_FIELD_TYPES: dict[str, tuple[Any, ...]] = {
    "num_rollouts": (_INT,), "num_response_tokens": (_INT,), "mean_response_length": (_FLOAT,),
    "max_response_length": (_INT,), "trunc_rate": (_FLOAT,), "rep_rate": (_FLOAT, _NONE), "num_empty": (_INT,),
    "mean_teacher_minus_behavior_logratio": (_FLOAT, _NONE),
}  # fmt: skip


def _has_type(value: Any, expected: tuple[Any, ...]) -> bool:
    for kind in expected:
        if kind == _INT and is_int(value):
            return True
        if kind == _FLOAT and (is_int(value) or isinstance(value, float)):
            return True
        if isinstance(kind, type) and isinstance(value, kind) and not isinstance(value, bool):
            return True
    return False


def _section_type_problems(where: str, data: dict[str, Any], types: dict[str, tuple[Any, ...]]) -> list[str]:
    def name(kind: Any) -> str:
        return kind if isinstance(kind, str) else ("null" if kind is _NONE else kind.__name__)

    return [
        f"{where}{key} must be {' or '.join(name(k) for k in expected)}, got {data[key]!r:.40}"
        for key, expected in types.items()
        if key in data and not _has_type(data[key], expected)
    ]


def manifest_type_problems(data: dict[str, Any]) -> list[str]:
    """Manifest fields (top level, every shard entry, stats) whose JSON type is wrong; empty when none."""
    problems = _section_type_problems("", data, MANIFEST_FIELD_TYPES)
    if isinstance(data.get("columns"), list) and not all(isinstance(c, str) for c in data["columns"]):
        problems.append("columns must be a list of strings")
    for i, entry in enumerate(data.get("shards") if isinstance(data.get("shards"), list) else []):
        if not isinstance(entry, dict):
            problems.append(f"shards[{i}] must be an object, got {entry!r:.40}")
        else:
            problems += _section_type_problems(f"shards[{i}].", entry, SHARD_FIELD_TYPES)
    if isinstance(data.get("stats"), dict):
        problems += _section_type_problems("stats.", data["stats"], STATS_FIELD_TYPES)
    return problems


@dataclass
class ShardEntry:
    """One committed shard: its file (relative to the store root), part number, size and checksum."""

    file: str
    part: int
    rows: int
    tokens: int  # response tokens
    bytes: int
    sha256: str


@dataclass
class StoreStats:
    """Store-wide statistics, aggregated from the per-part sums at finalize."""

    num_rollouts: int = 0
    num_response_tokens: int = 0
    mean_response_length: float = 0.0
    max_response_length: int = 0
    trunc_rate: float = 0.0
    rep_rate: float | None = None  # None when the store keeps no response text
    num_empty: int = 0
    mean_teacher_minus_behavior_logratio: float | None = None  # None in a 'rollouts' store


@dataclass
class Manifest:
    """The typed ``manifest.json``. Sections given by stage one stay plain dicts (extra keys kept)."""

    format: str
    format_version: str
    writer_version: str
    created_at: str
    store_uuid: str
    store_id: str
    kind: str
    student: dict[str, Any]
    sampling: dict[str, Any]
    horizon: int
    prompt_set: dict[str, Any]
    num_parts: int
    teacher: dict[str, Any] | None = None
    teacher_consistency: dict[str, Any] | None = None
    topk: dict[str, Any] | None = None
    columns: list[str] = field(default_factory=list)
    shards: list[ShardEntry] = field(default_factory=list)
    stats: StoreStats = field(default_factory=StoreStats)
    lineage: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # Since 1.2: how the log-prob columns are stored (None: float32; see ``fixed16_encoding``).
    encoding: dict[str, Any] | None = None

    # -- conversions ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse a manifest dict; unknown keys are warned about and ignored, missing ones raise StoreError."""
        if not isinstance(data, dict):
            raise StoreError(f"manifest must be a JSON object, got {type(data).__name__}")
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise StoreError(
                f"manifest lacks required fields {missing}; the store is damaged, run `lopd store verify`"
            )
        wrong = manifest_type_problems(data)
        if wrong:
            raise StoreError(
                f"manifest fields have the wrong types ({'; '.join(wrong[:5])}); the store is damaged, "
                "run `lopd store verify`"
            )
        data = dict(data)
        try:
            data["shards"] = [from_dict(ShardEntry, s) for s in data.get("shards", [])]
            data["stats"] = from_dict(StoreStats, data.get("stats") or {})
        except TypeError as e:
            raise StoreError(
                f"manifest shard or stats entry is malformed ({e}); run `lopd store verify`"
            ) from e
        return from_dict(cls, data)

    def header(self) -> dict[str, Any]:
        """The identity sections, in the shape stage one passes to the writer."""
        return {key: getattr(self, key) for key in HEADER_KEYS}

    # -- derived ----------------------------------------------------------------------------
    @property
    def topk_k(self) -> int | None:
        return self.topk.get("k") if isinstance(self.topk, dict) else None

    def schema(self) -> pa.Schema:
        """The shards' schema on disk (uint16 log-prob codes in a compact store)."""
        return store_schema(self.kind, **schema_options(self.columns, self.topk_k), encoding=self.encoding)

    def read_schema(self) -> pa.Schema:
        """The schema readers hand out: float32 log-probs whatever the encoding."""
        return store_schema(self.kind, **schema_options(self.columns, self.topk_k))

    # -- validation -------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Everything inconsistent in this manifest (empty when valid)."""
        problems = []
        if self.format != FORMAT_NAME:
            problems.append(f"manifest format must be {FORMAT_NAME!r}, got {self.format!r}")
        try:
            parse_version(self.format_version)
        except StoreVersionError as e:
            problems.append(str(e))
        problems += header_problems(self.header())
        if not self.store_uuid:
            problems.append("manifest store_uuid is empty")
        if not problems and self.store_id != compute_store_id(self.header()):
            problems.append("manifest store_id does not match its identity fields (edited by hand?)")
        if not (is_int(self.num_parts) and self.num_parts >= 1):
            problems.append(f"manifest num_parts must be an int >= 1, got {self.num_parts!r}")
        if self.kind in KINDS and (self.topk_k is None or (is_int(self.topk_k) and self.topk_k >= 1)):
            expected = store_schema(self.kind, **schema_options(self.columns, self.topk_k)).names
            if list(self.columns) != expected:
                problems.append(f"manifest columns {self.columns} do not match the format's {expected}")
        parts = [s.part for s in self.shards]
        if sorted(parts) != list(range(len(parts))) or (
            is_int(self.num_parts) and len(parts) != self.num_parts
        ):
            problems.append(
                f"manifest must list parts 0..{self.num_parts}-1 exactly once, got {sorted(parts)[:20]}"
            )
        for s in self.shards:
            if s.file != shard_file(s.part):
                problems.append(f"shard of part {s.part} must be {shard_file(s.part)!r}, got {s.file!r}")
            if min(s.rows, s.tokens, s.bytes) < 0:
                problems.append(f"shard {s.file} has negative counts")
            if not (isinstance(s.sha256, str) and len(s.sha256) == 64):
                problems.append(f"shard {s.file} has a malformed sha256 {s.sha256!r}")
        if self.stats.num_rollouts != sum(s.rows for s in self.shards):
            problems.append(
                f"stats.num_rollouts {self.stats.num_rollouts} != sum of shard rows {sum(s.rows for s in self.shards)}"
            )
        if self.stats.num_response_tokens != sum(s.tokens for s in self.shards):
            problems.append("stats.num_response_tokens does not match the sum of shard tokens")
        return problems

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise StoreError("invalid manifest: " + "; ".join(problems))
