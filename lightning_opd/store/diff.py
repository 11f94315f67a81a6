"""`lopd store diff`: what differs between two stores' manifests, identity fields marked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_opd.store.reader import open_store
from storage_schemas import logprob_store_v1 as fmt

# Sections in display order; shards and store_uuid always differ and say nothing about content.
DIFF_SECTIONS = (
    "format", "format_version", "writer_version", "created_at", "store_id", "kind", "teacher", "student",
    "teacher_consistency", "sampling", "horizon", "prompt_set", "topk", "encoding", "columns", "num_parts", "stats", "extra",
)  # fmt: skip


@dataclass
class DiffRow:
    field: str
    a: Any
    b: Any
    identity: bool = False  # part of the store_id

    @property
    def same(self) -> bool:
        return self.a == self.b


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out)
    else:
        out[prefix] = value


def _flat_manifest(manifest: fmt.Manifest) -> dict[str, Any]:
    data = manifest.to_dict()
    out: dict[str, Any] = {}
    for section in DIFF_SECTIONS:
        _flatten(data.get(section), section, out)
    return out


def diff_manifests(a: fmt.Manifest, b: fmt.Manifest) -> list[DiffRow]:
    """Every manifest field of either store (dotted), with both values; ``same`` tells equal ones apart."""
    fa, fb = _flat_manifest(a), _flat_manifest(b)
    names = list(fa) + [n for n in fb if n not in fa]
    identity = set(fmt.IDENTITY_FIELDS)
    optional = set(fmt.OPTIONAL_IDENTITY_FIELDS)  # part of the id when set (e.g. encoding.scale)
    return [
        DiffRow(n, fa.get(n), fb.get(n), identity=n in identity or n.split(".")[0] in optional) for n in names
    ]


def diff_stores(a: str | Path, b: str | Path) -> list[DiffRow]:
    return diff_manifests(open_store(a).manifest, open_store(b).manifest)


def _cell(value: Any, width: int = 40) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def format_diff(rows: list[DiffRow], a: str, b: str, *, show_all: bool = False) -> str:
    """The differing fields (all with ``show_all``) as an aligned table; '*' marks identity fields."""
    shown = [r for r in rows if show_all or not r.same]
    differing = sum(not r.same for r in rows)
    lines = [f"A = {a}", f"B = {b}", f"{differing} of {len(rows)} fields differ ('*': part of the store_id)"]
    if not shown:
        return "\n".join(lines)
    table = [("field", "A", "B")] + [
        (("* " if r.identity else "  ") + r.field, _cell(r.a), _cell(r.b)) for r in shown
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)
