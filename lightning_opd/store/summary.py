"""One-screen summary of a store, from its manifest alone (no shard is read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TextIO

from lightning_opd.store.reader import LogprobStore, open_store

FINGERPRINT_CHARS = 12


def _short(fingerprint: Any) -> str | None:
    return str(fingerprint)[:FINGERPRINT_CHARS] if fingerprint else None


def _model(section: dict[str, Any] | None) -> dict[str, Any] | None:
    if not section:
        return None
    return {
        "path": section.get("path"),
        "fingerprint": _short(section.get("fingerprint")),
        "dtype": section.get("dtype"),
    }


def summarize_store(store: LogprobStore | str | Path, *, out: TextIO | None = None) -> dict[str, Any]:
    """Identity and size statistics of a store as a flat-ish dict; printed as a table to ``out`` if given."""
    if not isinstance(store, LogprobStore):
        store = open_store(store)
    m = store.manifest
    total_bytes = sum(s.bytes for s in m.shards)
    tokens = m.stats.num_response_tokens
    sampling = m.sampling
    summary = {
        "root": str(store.root),
        "store_id": m.store_id[:FINGERPRINT_CHARS],
        "kind": m.kind,
        "format_version": m.format_version,
        "created_at": m.created_at,
        "teacher": _model(m.teacher),
        "student": _model(m.student),
        "sft_teacher": _short(m.student.get("sft_teacher_fingerprint")),
        "teacher_consistent": (m.teacher_consistency or {}).get("consistent"),
        "sampling": (
            f"{sampling.get('backend')} n={sampling.get('n')} T={sampling.get('temperature')} "
            f"top_p={sampling.get('top_p')} seed={sampling.get('seed')}"
        ),
        "horizon": m.horizon,
        "prompts": m.prompt_set.get("num_prompts"),
        "rows": m.stats.num_rollouts,
        "tokens": tokens,
        "mean_response_length": m.stats.mean_response_length,
        "max_response_length": m.stats.max_response_length,
        "trunc_rate": m.stats.trunc_rate,
        "rep_rate": m.stats.rep_rate,
        "num_empty": m.stats.num_empty,
        "mean_teacher_minus_behavior_logratio": m.stats.mean_teacher_minus_behavior_logratio,
        "shards": len(m.shards),
        "bytes": total_bytes,
        "bytes_per_token": total_bytes / tokens if tokens else None,
        "topk": m.topk,
        "columns": m.columns,
    }
    if out is not None:
        print(format_summary(summary), file=out)
    return summary


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items() if v not in (None, ""))
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """Two aligned columns, one line per field."""
    width = max(len(key) for key in summary)
    return "\n".join(f"{key.ljust(width)}  {_cell(value)}" for key, value in summary.items())
