"""Row invariants, checked at write time and by ``lopd store verify``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .layout import FINISH_REASONS, KIND_ROLLOUTS, KIND_SCORED, LOGPROB_TOLERANCE
from .schema import REQUIRED_COLUMNS, REWARD_COLUMN, SAMPLING_COLUMN, TEXT_COLUMN, TOPK_COLUMNS

# ---------------------------------------------------------------------------------------------
# Row invariants (checked at write time and by verify)
# ---------------------------------------------------------------------------------------------


def list_lengths(array: pa.Array) -> np.ndarray:
    """Lengths of a list column as int64 numpy (null lists count as 0)."""
    return pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _locate(flat_index: int, lengths: np.ndarray) -> tuple[int, int]:
    """Row and position of an element of a flattened list column."""
    ends = np.cumsum(lengths)
    row = int(np.searchsorted(ends, flat_index, side="right"))
    start = int(ends[row] - lengths[row])
    return row, flat_index - start


def _value_problems(
    name: str,
    values: np.ndarray,
    lengths: np.ndarray,
    ids: list[str],
    *,
    nonpositive: bool,
    per_position: int = 1,
) -> list[str]:
    """Non-finite (or, for log-probs, positive) values of a flattened column, located by row and position."""
    problems = []
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.argmax(bad))
        row, pos = _locate(i // per_position, lengths)
        problems.append(
            f"{name} holds {int(bad.sum())} non-finite value(s); first {values[i]} at prompt_id={ids[row]!r} position {pos}"
        )
    if nonpositive:
        high = values > LOGPROB_TOLERANCE
        if high.any():
            i = int(np.argmax(high))
            row, pos = _locate(i // per_position, lengths)
            problems.append(
                f"{name} holds {int(high.sum())} value(s) > 0 (log-probs must be <= 0); first {values[i]} "
                f"at prompt_id={ids[row]!r} position {pos}"
            )
    else:
        negative = values < 0
        if negative.any():
            i = int(np.argmax(negative))
            row, pos = _locate(i // per_position, lengths)
            problems.append(
                f"{name} holds negative token ids; first {values[i]} at prompt_id={ids[row]!r} position {pos}"
            )
    return problems


def _null_problems(batch: pa.RecordBatch, kind: str, ids: list[str]) -> list[str]:
    problems = []
    for name in batch.schema.names:
        optional = name in (REWARD_COLUMN, TEXT_COLUMN)
        absent_in_rollouts = kind == KIND_ROLLOUTS and (name == "teacher_logprobs" or name in TOPK_COLUMNS)
        column = batch.column(name)
        if not (optional or absent_in_rollouts) and column.null_count:
            row = int(np.argmax(column.is_null().to_numpy(zero_copy_only=False)))
            problems.append(f"{name} is null at prompt_id={ids[row]!r}")
    return problems


def _scalar_problems(batch: pa.RecordBatch, ids: list[str], prompt_lengths: np.ndarray) -> list[str]:
    problems = []
    reasons = batch.column("finish_reason").to_pylist()
    bad = next((row for row, reason in enumerate(reasons) if reason not in FINISH_REASONS), None)
    if bad is not None:
        problems.append(
            f"finish_reason must be one of {FINISH_REASONS}, got {reasons[bad]!r} at prompt_id={ids[bad]!r}"
        )
    sample_index = batch.column("sample_index").to_numpy(zero_copy_only=False)
    if (sample_index < 0).any():
        row = int(np.argmax(sample_index < 0))
        problems.append(f"sample_index must be >= 0, got {sample_index[row]} at prompt_id={ids[row]!r}")
    if (prompt_lengths == 0).any():
        row = int(np.argmax(prompt_lengths == 0))
        problems.append(
            f"prompt_ids is empty at prompt_id={ids[row]!r}; a response needs a prompt to condition on"
        )
    return problems


def _length_problem(
    name: str, lengths: np.ndarray, response_lengths: np.ndarray, ids: list[str]
) -> str | None:
    if (lengths == response_lengths).all():
        return None
    row = int(np.argmax(lengths != response_lengths))
    return (
        f"{name} has {lengths[row]} entries but response_ids has {response_lengths[row]} tokens "
        f"at prompt_id={ids[row]!r}"
    )


def _topk_row_problems(
    batch: pa.RecordBatch, topk: int, response_lengths: np.ndarray, ids: list[str]
) -> list[str]:
    problems = []
    for name in TOPK_COLUMNS:
        if name not in batch.schema.names:
            problems.append(f"column {name!r} is missing")
            continue
        column = batch.column(name)
        lengths = list_lengths(column)
        mismatch = _length_problem(name, lengths, response_lengths, ids)
        if mismatch:
            problems.append(mismatch)
            continue
        inner = column.flatten()
        inner_lengths = list_lengths(inner)
        if (inner_lengths != topk).any():
            i = int(np.argmax(inner_lengths != topk))
            row, pos = _locate(i, lengths)
            problems.append(
                f"{name} must hold exactly k={topk} entries per position, got {inner_lengths[i]} "
                f"at prompt_id={ids[row]!r} position {pos}"
            )
            continue
        values = inner.flatten().to_numpy(zero_copy_only=False)
        is_logprob = name == "teacher_topk_logprobs"
        problems += _value_problems(name, values, lengths, ids, nonpositive=is_logprob, per_position=topk)
    return problems


def batch_problems(batch: pa.RecordBatch | pa.Table, *, kind: str, topk: int | None) -> list[str]:
    """Violations of the row invariants in a batch, each naming the prompt_id (and position).

    Invariants: required values present; finish_reason known; sample_index >= 0; prompts non-empty;
    ids >= 0; behaviour, sampling (when present), teacher and top-k columns as long as response_ids; teacher log-probs present
    in a 'scored' store and absent in a 'rollouts' store; top-k rows of exactly k; every log-prob
    finite and <= 0 (within LOGPROB_TOLERANCE). Empty responses are valid.
    """
    if isinstance(batch, pa.Table):
        empty = pa.RecordBatch.from_pylist([], schema=batch.schema)
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else empty
    missing = [f"column {name!r} is missing" for name in REQUIRED_COLUMNS if name not in batch.schema.names]
    if missing or batch.num_rows == 0:
        return missing
    ids = [str(x) for x in batch.column("prompt_id").to_pylist()]
    problems = _null_problems(batch, kind, ids)
    if problems:
        return problems  # the checks below assume no missing values

    prompt_lengths = list_lengths(batch.column("prompt_ids"))
    response_lengths = list_lengths(batch.column("response_ids"))
    problems += _scalar_problems(batch, ids, prompt_lengths)
    for name, lengths in (("prompt_ids", prompt_lengths), ("response_ids", response_lengths)):
        values = batch.column(name).flatten().to_numpy(zero_copy_only=False)
        problems += _value_problems(name, values, lengths, ids, nonpositive=False)

    teacher = batch.column("teacher_logprobs")
    checked = ["behavior_logprobs"] + ([SAMPLING_COLUMN] if SAMPLING_COLUMN in batch.schema.names else [])
    if kind == KIND_SCORED:
        checked.append("teacher_logprobs")
    elif teacher.null_count != len(teacher):
        row = int(np.argmax(teacher.is_valid().to_numpy(zero_copy_only=False)))
        problems.append(
            f"teacher_logprobs must be null in a 'rollouts' store, got a value at prompt_id={ids[row]!r}"
        )
    for name in checked:
        lengths = list_lengths(batch.column(name))
        mismatch = _length_problem(name, lengths, response_lengths, ids)
        if mismatch:
            problems.append(mismatch)
            continue
        values = batch.column(name).flatten().to_numpy(zero_copy_only=False)
        problems += _value_problems(name, values, lengths, ids, nonpositive=True)

    if topk is not None and kind == KIND_SCORED:
        problems += _topk_row_problems(batch, topk, response_lengths, ids)
    return problems
