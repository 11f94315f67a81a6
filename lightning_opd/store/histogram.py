"""Token-level distributions of a store, streamed (notebooks, `lopd store plot`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_opd.errors import StoreError
from lightning_opd.store.derive import (
    BATCH_SIZE,
)
from lightning_opd.store.reader import LogprobStore, open_store
from storage_schemas import logprob_store_v1 as fmt

DEFAULT_LOGRATIO_EDGES = tuple(np.linspace(-8.0, 8.0, 65).tolist())


@dataclass
class Histogram:
    edges: list[float]
    counts: list[int]
    below: int = 0  # values under edges[0] (counted in the first bin too)
    above: int = 0  # values over edges[-1] (counted in the last bin too)
    total: int = 0
    mean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def logratio_histogram(store: LogprobStore | str | Path, edges: tuple[float, ...] | None = None) -> Histogram:
    """Histogram of per-token teacher − behaviour log-ratios (the step-0 Lightning-OPD advantage), streamed.

    Values outside ``edges`` are clipped into the end bins and counted in ``below``/``above``.
    """
    if not isinstance(store, LogprobStore):
        store = open_store(store)
    if store.kind != fmt.KIND_SCORED:
        raise StoreError(f"{store.root} is a rollouts store; it has no teacher log-probs to compare")
    edges_array = np.asarray(edges if edges is not None else DEFAULT_LOGRATIO_EDGES, dtype=np.float64)
    counts = np.zeros(len(edges_array) - 1, dtype=np.int64)
    below = above = total = 0
    total_sum = 0.0
    for batch in store.iter_batches(["behavior_logprobs", "teacher_logprobs"], batch_size=BATCH_SIZE):
        teacher = batch.column("teacher_logprobs").flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        behavior = (
            batch.column("behavior_logprobs").flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        )
        ratio = teacher - behavior
        below += int((ratio < edges_array[0]).sum())
        above += int((ratio > edges_array[-1]).sum())
        total += len(ratio)
        total_sum += float(ratio.sum())
        counts += np.histogram(np.clip(ratio, edges_array[0], edges_array[-1]), bins=edges_array)[0]
    return Histogram(
        edges=edges_array.tolist(),
        counts=counts.tolist(),
        below=below,
        above=above,
        total=total,
        mean=total_sum / total if total else None,
    )
