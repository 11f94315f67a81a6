"""The streaming shuffle of one epoch of one store, planned from row sizes before any row is decoded.

A reservoir of rows is filled in read order; once it is full (``max_rows`` rows, or ``max_bytes`` of
decoded rows), each arriving row takes the slot of a random held row, which is emitted; rows are
emitted at random until the held bytes fit again; the rest drains in random order at the end of the
epoch. The order depends only on the rows' sizes and the RNG, so it can be computed from a few small
columns (``response_ids`` lengths, ``prompt_id``), and each process of a distributed run then decodes
only the rows it trains on. With ``max_bytes`` not binding, the order is the row-count reservoir's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage_schemas import logprob_store_v1 as fmt

# What a decoded row costs beyond its arrays' payload: the dict, one numpy header per column.
ROW_OVERHEAD_BYTES = 512
DECODED_ITEM_BYTES = 4  # ids are int32 and log-probs float32 once decoded, whatever the encoding


def size_columns(emit: list[str]) -> list[str]:
    """The columns ``row_nbytes`` reads: the lengths behind every emitted column's size."""
    columns = ["response_ids"]
    if "prompt_ids" in emit:
        columns.append("prompt_ids")
    if fmt.TEXT_COLUMN in emit:
        columns.append(fmt.TEXT_COLUMN)
    return columns


def row_nbytes(batch: pa.RecordBatch, emit: list[str], schema: pa.Schema, topk: int | None) -> np.ndarray:
    """Bytes each row of ``batch`` takes once decoded with the ``emit`` columns (``batch`` holds at
    least ``size_columns``): per-token columns at 4 B a token, top-k columns at 4 B x k a token."""
    response = fmt.list_lengths(batch.column("response_ids"))
    total = np.full(batch.num_rows, ROW_OVERHEAD_BYTES, dtype=np.int64)
    for name in emit:
        kind = schema.field(name).type
        if pa.types.is_list(kind) and pa.types.is_list(kind.value_type):
            total += response * (topk or 0) * DECODED_ITEM_BYTES
        elif pa.types.is_list(kind):
            lengths = fmt.list_lengths(batch.column(name)) if name == "prompt_ids" else response
            total += lengths * DECODED_ITEM_BYTES
        elif name == fmt.TEXT_COLUMN:
            total += pc.fill_null(pc.binary_length(batch.column(name)), 0).to_numpy(zero_copy_only=False)
    return total


@dataclass
class ShuffleOrder:
    order: np.ndarray  # emission k -> arrival index (read order of the kept rows)
    peak_rows: int  # the most rows the reservoir held
    peak_bytes: int  # the most bytes it held


def shuffle_order(
    sizes: np.ndarray, rng: np.random.Generator, max_rows: int, max_bytes: int | None
) -> ShuffleOrder:
    """Emission order of rows arriving with ``sizes`` through a reservoir of ``max_rows`` rows and
    ``max_bytes`` bytes (None: rows only). A row larger than ``max_bytes`` is held alone."""
    limit = float("inf") if max_bytes is None else max_bytes
    buffer: list[int] = []
    held = peak_rows = peak_bytes = 0
    out: list[int] = []
    for arrival, size in enumerate(sizes.tolist()):
        if buffer and (len(buffer) >= max_rows or held + size > limit):
            slot = int(rng.integers(len(buffer)))
            out.append(buffer[slot])
            held += size - int(sizes[buffer[slot]])
            buffer[slot] = arrival
            while held > limit and len(buffer) > 1:  # a large newcomer: make room for it
                slot = int(rng.integers(len(buffer)))
                out.append(buffer[slot])
                held -= int(sizes[buffer[slot]])
                buffer[slot] = buffer[-1]
                buffer.pop()
        else:
            buffer.append(arrival)
            held += size
        peak_rows, peak_bytes = max(peak_rows, len(buffer)), max(peak_bytes, held)
    out.extend(buffer[slot] for slot in rng.permutation(len(buffer)))
    return ShuffleOrder(np.asarray(out, dtype=np.int64), peak_rows, peak_bytes)
