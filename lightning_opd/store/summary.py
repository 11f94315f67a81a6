"""One-screen summary of a store, from its manifest alone (no shard is read), and per-position
statistics (``position_stats``), which stream the log-prob columns shard by shard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

from lightning_opd.errors import StoreError
from lightning_opd.store.reader import LogprobStore, open_store
from storage_schemas import logprob_store_v1 as fmt

FINGERPRINT_CHARS = 12
# Default bucketing for `inspect --positions`: about this many rows in the table, whatever the horizon.
DEFAULT_POSITION_BUCKETS = 16
POSITION_BATCH_SIZE = 256


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
        # Compact stores (format 1.2+) say how log-probs are stored and the largest error that costs.
        "logprob_encoding": (
            f"{m.encoding['logprobs']} (max error {m.encoding['max_abs_error']:.3g} nats on "
            f"[{m.encoding['min_logprob']:.4f}, 0]"
            + (
                f"; top-k sorted by id, max error {m.encoding['topk_max_abs_error']:.3g} nats)"
                if fmt.sorted_topk(m.encoding)
                else ")"
            )
            if m.encoding
            else "float32"
        ),
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


# ---------------------------------------------------------------------------------------------
# Per-position statistics
# ---------------------------------------------------------------------------------------------


def default_bucket(horizon: int) -> int:
    """Bucket width giving about DEFAULT_POSITION_BUCKETS buckets over ``horizon`` positions."""
    return max(1, math.ceil(horizon / DEFAULT_POSITION_BUCKETS))


def _positions(array: pa.ListArray) -> np.ndarray:
    """Response position (0-based) of every element of a list column, in flattened order."""
    lengths = fmt.list_lengths(array)
    starts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)


def _add(total: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``total + values`` after padding the shorter one with zeros (bucket counts grow with the data)."""
    if len(values) > len(total):
        total = np.pad(total, (0, len(values) - len(total)))
    total[: len(values)] += values
    return total


def position_stats(store: LogprobStore | str | Path, bucket: int | None = None) -> list[dict[str, Any]]:
    """Token-weighted means per response-position bucket, streamed over the log-prob columns.

    One dict per bucket ``[start, end)``: ``tokens`` (response tokens at those positions),
    ``mean_teacher_logprob``, ``mean_behavior_logprob`` and ``mean_logratio`` (teacher − behaviour,
    the Lightning-OPD advantage at step 0). Teacher means are None in a 'rollouts' store. Sums are
    float64 so that a long store does not lose precision; memory is one record batch.
    """
    if not isinstance(store, LogprobStore):
        store = open_store(store)
    bucket = default_bucket(int(store.manifest.horizon)) if bucket is None else bucket
    if not (isinstance(bucket, int) and bucket >= 1):
        raise StoreError(f"--bucket must be an int >= 1, got {bucket!r}")
    scored = store.kind == fmt.KIND_SCORED
    columns = ["behavior_logprobs", "teacher_logprobs"] if scored else ["behavior_logprobs"]
    tokens = np.zeros(0, np.float64)
    behavior = np.zeros(0, np.float64)
    teacher = np.zeros(0, np.float64)
    for batch in store.iter_batches(columns, batch_size=POSITION_BATCH_SIZE):
        column = batch.column("behavior_logprobs")
        index = _positions(column) // bucket
        values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        tokens = _add(tokens, np.bincount(index).astype(np.float64))
        behavior = _add(behavior, np.bincount(index, weights=values))
        if scored:
            # Same lengths as behaviour (a row invariant), so the same bucket index applies.
            values = batch.column("teacher_logprobs").flatten().to_numpy(zero_copy_only=False)
            teacher = _add(teacher, np.bincount(index, weights=values.astype(np.float64)))
    rows = []
    for i, count in enumerate(tokens):
        mean_behavior = behavior[i] / count if count else None
        mean_teacher = teacher[i] / count if scored and count else None
        rows.append(
            {
                "start": i * bucket,
                "end": (i + 1) * bucket,
                "tokens": int(count),
                "mean_teacher_logprob": mean_teacher,
                "mean_behavior_logprob": mean_behavior,
                "mean_logratio": mean_teacher - mean_behavior if mean_teacher is not None else None,
            }
        )
    return rows


def format_position_stats(rows: list[dict[str, Any]]) -> str:
    """The buckets as an aligned table (one line per bucket)."""
    header = ("positions", "tokens", "teacher", "behavior", "teacher-behavior")
    lines = [
        (
            f"{row['start']}-{row['end'] - 1}",
            str(row["tokens"]),
            _cell(row["mean_teacher_logprob"]),
            _cell(row["mean_behavior_logprob"]),
            _cell(row["mean_logratio"]),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in [header, *lines])
