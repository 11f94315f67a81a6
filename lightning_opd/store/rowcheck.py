"""The check stage two runs on every row it reads, before the row reaches a tensor.

``lopd store verify`` checks the same invariants once per store, but a store can change after it
was verified (or was never verified), and what matters to training also depends on the student: a
token id is only valid inside the student's vocabulary. A bad value must stop the run with the
store and row named, not turn into an index error deep in the model or a loss that trains on ``+5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_opd.errors import StoreError
from storage_schemas.logprob_store_v1 import LOGPROB_TOLERANCE, SAMPLING_COLUMN

ID_COLUMNS = ("prompt_ids", "response_ids", "teacher_topk_ids")
LOGPROB_COLUMNS = ("behavior_logprobs", SAMPLING_COLUMN, "teacher_logprobs", "teacher_topk_logprobs")


def row_problem(row: dict[str, Any], vocab_size: int) -> str | None:
    """What is wrong with one stream row (None when nothing is): ids outside ``[0, vocab_size)``,
    non-finite log-probs, log-probs above 0 (beyond fp rounding), or per-token columns whose length
    differs from ``response_ids``."""
    num_tokens = len(row["response_ids"])
    for name in ID_COLUMNS:
        if row.get(name) is None:
            continue
        ids = np.asarray(row[name])
        outside = (ids < 0) | (ids >= vocab_size)
        if outside.any():
            return (
                f"{name} holds id {ids[outside].flat[0]} outside the student's vocabulary [0, {vocab_size})"
            )
    for name in LOGPROB_COLUMNS:
        if row.get(name) is None:
            continue
        values = np.asarray(row[name], dtype=np.float64)
        if len(values) != num_tokens:
            return f"{name} has {len(values)} positions but response_ids has {num_tokens} tokens"
        if not np.isfinite(values).all():
            return f"{name} holds a non-finite value ({values[~np.isfinite(values)].flat[0]})"
        if (values > LOGPROB_TOLERANCE).any():
            return f"{name} holds {values.max():.4g} > 0; log-probs must be <= 0"
    return None


def check_rows(rows: Sequence[dict[str, Any]], stores: Sequence[Any], vocab_size: int) -> None:
    """Raise StoreError naming the store and the row (prompt_id, sample_index) of the first bad row.

    ``stores``: the stream's sources in order (a row's ``store_index`` picks its store).
    """
    for row in rows:
        problem = row_problem(row, vocab_size)
        if problem is None:
            continue
        root = stores[int(row.get("store_index", 0))].root
        raise StoreError(
            f"store {root}, row prompt_id={row['prompt_id']!r} sample_index={row['sample_index']}: {problem}; "
            f"the store is damaged or was written for another model, run `lopd store verify {root}`"
        )
