"""Compact log-prob encodings (format 1.2+ fixed16, 1.3+ sorted top-k): encode on write, decode on read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_opd.errors import StoreError

from .layout import is_int
from .schema import SAMPLING_COLUMN, TOPK_COLUMNS, list_of

# ---------------------------------------------------------------------------------------------
# Compact log-prob encoding (format 1.2+, opt-in: `lopd precompute --compact-logprobs`, `lopd store compact`)
# ---------------------------------------------------------------------------------------------
#
# A compact store keeps every log-prob column as unsigned 16-bit fixed point: code = round(-x * scale),
# decoded value = -code / scale nats. With scale 2048 the codes cover [-65535/2048, 0] = [-31.9995, 0]
# with an absolute error of at most 1/4096 = 2.44e-4 nats (decoding is exact in float32: a 16-bit
# integer over a power of two). Below the range a value is clamped to -31.9995 (a teacher probability
# under 1.3e-14: its exact size no longer changes a clipped update much, but the clamped error is not
# bounded; `lopd store compact` reports how many values it clamped). Values in (0, LOGPROB_TOLERANCE]
# become 0. Readers decode transparently (``decode_batch``), so stage two and every tool see float32.
# The manifest's ``encoding`` section states codec, scale, range and maximum error; a store is compact
# or not as a whole (the writer refuses to mix, verify checks every shard's schema).
# Top-k log-probs come sorted (rank 1 first), so neighbouring codes are close: each position's codes
# are stored as rank 1's code, then differences from the previous rank (mod 2^16, lossless whatever
# the order). On Gemma-3-270M's top-20 this takes them from 38.7 to 29.5 bytes per response token.
#
# Compact top-k (format 1.3+, opt-in on top of fixed16: ``topk_scale``, `--compact-topk-scale`). The
# ids of a top-k list are a set plus an order, and the order is already in the log-probs (rank r has
# the r-th largest), so storing both in rank order pays for the order twice (~log2(k!) bits, 7.6 B at
# k = 20). Instead each position's ids are sorted ascending and stored as the first id, then the
# (positive) gaps; its log-probs follow in that id order as codes at the coarser ``topk_scale``
# (|error| <= 0.5 / topk_scale nats). Readers restore rank order by sorting on the decoded log-prob
# (ties: smaller id first), so only the order among entries whose codes tie is not kept; every
# consumer (the top-k objectives' sums and log-sum-exps over k) ignores that order. Why a coarser step
# is acceptable: scorers run in bf16 on GPUs (modeling.default_dtype), and Gemma-3-270M in bf16 moves
# its own top-20 log-probs from fp32's by a median 0.063 nats, 4x the 1/64 of topk_scale 32. Measured
# on its top-20 (BENCHMARKS.md): top-k columns 54.8 -> 33.3 bytes per response token (1.2 -> 1.3).

LOGPROB_COLUMNS = ("behavior_logprobs", SAMPLING_COLUMN, "teacher_logprobs", "teacher_topk_logprobs")
ENCODING_FIXED16 = "fixed16"
FIXED16_SCALE = 2048
FIXED16_MAX_CODE = 2**16 - 1


SUGGESTED_TOPK_SCALE = 32  # |error| <= 1/64 nats on the top-k log-probs (see above)


def fixed16_encoding(scale: int = FIXED16_SCALE, topk_scale: int | None = None) -> dict[str, Any]:
    """The manifest ``encoding`` section of a compact store (``topk_scale``: the 1.3 compact top-k)."""
    encoding = {
        "logprobs": ENCODING_FIXED16,
        "scale": scale,
        "min_logprob": -FIXED16_MAX_CODE / scale,
        "max_abs_error": 0.5 / scale,
        "below_min": "clamped to min_logprob",
        "teacher_topk_logprobs": "per position: rank 1's code, then differences from the previous rank mod 2^16",
    }
    if topk_scale is None:
        return encoding  # exactly the 1.2 section: such stores stay readable by 1.2
    return {
        **encoding,
        "teacher_topk_ids": "per position sorted ascending: the first id, then differences from the previous id",
        "teacher_topk_logprobs": "per position in teacher_topk_ids' (ascending id) order, codes at topk_scale",
        "topk_scale": topk_scale,
        "topk_min_logprob": -FIXED16_MAX_CODE / topk_scale,
        "topk_max_abs_error": 0.5 / topk_scale,
        "topk_order": "read back by decreasing decoded log-prob, ties by increasing id",
    }


def _power_of_two(value: Any, high: int) -> bool:
    return is_int(value) and 1 <= value <= high and value & (value - 1) == 0


def encoding_problems(encoding: Any) -> list[str]:
    """What is wrong with a manifest ``encoding`` section (None = plain float32 log-probs)."""
    if encoding is None:
        return []
    if not isinstance(encoding, dict) or encoding.get("logprobs") != ENCODING_FIXED16:
        return [
            f"encoding must be None or {{logprobs: {ENCODING_FIXED16!r}, scale: ...}}, got {encoding!r:.80}; "
            "a newer lightning-opd may know it (pip install -U lightning-opd)"
        ]
    scale, topk_scale = encoding.get("scale"), encoding.get("topk_scale")
    if not _power_of_two(scale, FIXED16_MAX_CODE):
        return [f"encoding.scale must be a power of two (decoding is then exact), got {scale!r}"]
    if topk_scale is not None and not _power_of_two(topk_scale, scale):
        return [f"encoding.topk_scale must be a power of two <= scale {scale}, got {topk_scale!r}"]
    expected = fixed16_encoding(scale, topk_scale)
    if encoding != expected:
        return [f"encoding {encoding} does not match its scales' {expected} (edited by hand?)"]
    return []


def encode_logprobs(values: np.ndarray, scale: int = FIXED16_SCALE) -> np.ndarray:
    """float log-probs -> uint16 codes (clamped to [min_logprob, 0]); values must be finite."""
    codes = np.rint(-np.asarray(values, dtype=np.float64) * scale)
    return np.clip(codes, 0, FIXED16_MAX_CODE).astype(np.uint16)


def decode_logprobs(codes: np.ndarray, scale: int = FIXED16_SCALE) -> np.ndarray:
    """uint16 codes -> float32 log-probs (exact: -code / scale)."""
    return (-np.asarray(codes, dtype=np.float32)) / np.float32(scale)


def _delta_encode(codes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Within each list ``offsets[i]:offsets[i+1]`` of ``codes``: the first code, then differences mod 2^16."""
    out = codes.copy()
    lo, hi = int(offsets[0]), int(offsets[-1])
    c = codes[lo:hi].astype(np.int64)
    d = c.copy()
    d[1:] -= c[:-1]
    starts = (offsets[:-1] - lo)[np.diff(offsets) > 0]
    d[starts] = c[starts]
    out[lo:hi] = (d % 2**16).astype(np.uint16)
    return out


def _delta_decode(deltas: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Inverse of ``_delta_encode``: a running sum mod 2^16 restarted at each list."""
    out = deltas.copy()
    lo, hi = int(offsets[0]), int(offsets[-1])
    if hi == lo:
        return out
    sums = np.cumsum(deltas[lo:hi].astype(np.int64))
    start = np.repeat(offsets[:-1] - lo, np.diff(offsets))
    before = np.where(start > 0, sums[start - 1], 0)
    out[lo:hi] = ((sums - before) % 2**16).astype(np.uint16)
    return out


LeafFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (leaf values, innermost list offsets) -> values


def _map_leaves(array: pa.Array, fn: LeafFn, target: pa.DataType) -> pa.Array:
    """``array`` (a list, or list of lists) as ``target`` with ``fn`` applied to its leaf values; offsets
    and nulls kept."""
    if pa.types.is_list(array.type.value_type):
        values = _map_leaves(array.values, fn, target.value_type)
    else:
        leaf = array.values.to_numpy(zero_copy_only=False)
        values = pa.array(fn(leaf, array.offsets.to_numpy()), type=target.value_type)
    mask = array.is_null() if array.null_count else None
    # array.offsets already accounts for a sliced array's offset into the (unsliced) values.
    return pa.ListArray.from_arrays(array.offsets, values, type=target, mask=mask)


def _transcode(
    data: pa.Table | pa.RecordBatch, schema: pa.Schema, fns: dict[str, LeafFn]
) -> pa.Table | pa.RecordBatch:
    columns = []
    for name in data.schema.names:
        column = data.column(name)
        if name in fns:
            fn = fns[name]
            target = schema.field(name).type
            if isinstance(column, pa.ChunkedArray):
                column = pa.chunked_array([_map_leaves(c, fn, target) for c in column.chunks], target)
            else:
                column = _map_leaves(column, fn, target)
        columns.append(column)
    target_schema = schema.with_metadata(data.schema.metadata)
    if isinstance(data, pa.Table):
        return pa.Table.from_arrays(columns, schema=target_schema)
    return pa.RecordBatch.from_arrays(columns, schema=target_schema)


def _logprob_schema(data: pa.Table | pa.RecordBatch, leaf: pa.DataType) -> pa.Schema:
    fields = []
    for f in data.schema:
        if f.name in LOGPROB_COLUMNS:
            nested = pa.types.is_list(f.type.value_type)
            f = pa.field(f.name, list_of(list_of(leaf)) if nested else list_of(leaf), nullable=f.nullable)
        fields.append(f)
    return pa.schema(fields)


def _topk_lists(
    data: pa.Table | pa.RecordBatch,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Any]:
    """The two top-k columns as (outer offsets, inner offsets, ids, log-prob leaves, outer null mask);
    offsets start at 0 whatever the slicing or chunking, and both columns must share their shape."""
    arrays = []
    for name in TOPK_COLUMNS:
        column = data.column(name)
        arrays.append(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    ids, logprobs = arrays
    shapes = []
    for array in arrays:
        inner = pc.list_flatten(array)  # skips null rows, honours slicing
        outer_lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
        inner_lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
        shapes.append((outer_lengths, inner_lengths, pc.list_flatten(inner).to_numpy(zero_copy_only=False)))
    (outer, inner, id_leaves), (outer_lp, inner_lp, lp_leaves) = shapes
    if not (np.array_equal(outer, outer_lp) and np.array_equal(inner, inner_lp)):
        raise StoreError("teacher_topk_ids and teacher_topk_logprobs differ in shape; cannot (de)code top-k")
    mask = ids.is_null() if ids.null_count else None
    offsets = [np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (outer, inner)]
    return offsets[0], offsets[1], id_leaves, lp_leaves, mask


def _nested(
    outer: np.ndarray, inner: np.ndarray, leaves: np.ndarray, leaf: pa.DataType, mask: Any
) -> pa.Array:
    lists = pa.ListArray.from_arrays(pa.array(inner), pa.array(leaves, leaf), type=list_of(leaf))
    return pa.ListArray.from_arrays(pa.array(outer), lists, type=list_of(list_of(leaf)), mask=mask)


def _with_topk(data: pa.Table | pa.RecordBatch, ids: pa.Array, logprobs: pa.Array):
    for name, array in zip(TOPK_COLUMNS, (ids, logprobs)):
        i = data.schema.get_field_index(name)
        field = data.schema.field(i).with_type(array.type)
        data = data.set_column(i, field, pa.chunked_array([array]) if isinstance(data, pa.Table) else array)
    return data


def _sorted_topk_encode(data: pa.Table | pa.RecordBatch, topk_scale: int):
    """float32 top-k in rank order -> per position: ascending ids as first id + gaps, codes in id order."""
    outer, inner, ids, logprobs, mask = _topk_lists(data)
    position = np.repeat(np.arange(len(inner) - 1), np.diff(inner))
    order = np.lexsort((ids, position))  # by position, then id
    ids, codes = ids[order].astype(np.int64), encode_logprobs(logprobs[order], topk_scale)
    gaps = ids.copy()
    gaps[1:] -= ids[:-1]
    starts = inner[:-1][np.diff(inner) > 0]
    gaps[starts] = ids[starts]
    return _with_topk(
        data,
        _nested(outer, inner, gaps.astype(np.int32), pa.int32(), mask),
        _nested(outer, inner, codes, pa.uint16(), mask),
    )


def _sorted_topk_decode(data: pa.Table | pa.RecordBatch, topk_scale: int):
    """Inverse of ``_sorted_topk_encode`` up to the order among tied codes: rank order by decreasing
    decoded log-prob, ties by increasing id."""
    outer, inner, gaps, codes, mask = _topk_lists(data)
    position = np.repeat(np.arange(len(inner) - 1), np.diff(inner))
    sums = np.cumsum(gaps.astype(np.int64))
    before = np.concatenate([[0], sums])[inner[:-1]]  # the running sum before each position's first gap
    ids = sums - np.repeat(before, np.diff(inner))
    logprobs = decode_logprobs(codes, topk_scale)
    order = np.lexsort((ids, -logprobs, position))  # by position, then decreasing log-prob, then id
    return _with_topk(
        data,
        _nested(outer, inner, ids[order].astype(np.int32), pa.int32(), mask),
        _nested(outer, inner, logprobs[order], pa.float32(), mask),
    )


def sorted_topk(encoding: dict[str, Any] | None) -> bool:
    """Whether ``encoding`` stores top-k sorted by id (format 1.3): then the two top-k columns decode together."""
    return encoding is not None and encoding.get("topk_scale") is not None


def columns_to_read(columns: list[str], encoding: dict[str, Any] | None) -> list[str]:
    """``columns`` plus what decoding them needs: under a sorted top-k, either top-k column needs both."""
    if sorted_topk(encoding) and any(c in columns for c in TOPK_COLUMNS):
        return [*columns, *(c for c in TOPK_COLUMNS if c not in columns)]
    return list(columns)


def encode_table(table: pa.Table, encoding: dict[str, Any] | None) -> pa.Table:
    """A float32 store table as stored under ``encoding`` (unchanged when None)."""
    if encoding is None:
        return table
    scale = encoding["scale"]
    fns: dict[str, LeafFn] = {name: lambda v, _: encode_logprobs(v, scale) for name in LOGPROB_COLUMNS}
    fns["teacher_topk_logprobs"] = lambda v, offsets: _delta_encode(encode_logprobs(v, scale), offsets)
    if sorted_topk(encoding) and "teacher_topk_ids" in table.column_names:
        table = _sorted_topk_encode(table, encoding["topk_scale"])
        del fns["teacher_topk_logprobs"]  # already codes
    return _transcode(table, _logprob_schema(table, pa.uint16()), fns)


def decode_batch(data: pa.RecordBatch | pa.Table, encoding: dict[str, Any] | None):
    """Shard data as read from disk -> float32 log-probs (unchanged when ``encoding`` is None). Under a
    sorted top-k (``sorted_topk``) both top-k columns must be present (``columns_to_read``)."""
    if encoding is None:
        return data
    scale = encoding["scale"]
    fns: dict[str, LeafFn] = {name: lambda c, _: decode_logprobs(c, scale) for name in LOGPROB_COLUMNS}
    fns["teacher_topk_logprobs"] = lambda c, offsets: decode_logprobs(_delta_decode(c, offsets), scale)
    if sorted_topk(encoding) and any(c in data.schema.names for c in TOPK_COLUMNS):
        data = _sorted_topk_decode(data, encoding["topk_scale"])
        del fns["teacher_topk_logprobs"]  # already float32
    return _transcode(data, _logprob_schema(data, pa.float32()), fns)


def count_clamped(table: pa.Table, encoding: dict[str, Any] | None) -> int:
    """Log-prob values of a float32 table below the encoding's range (stored as its minimum)."""
    if encoding is None:
        return 0
    total = 0
    for name in LOGPROB_COLUMNS:
        if name in table.column_names:
            low = encoding["min_logprob"] - encoding["max_abs_error"]
            if name == "teacher_topk_logprobs" and sorted_topk(encoding):
                low = encoding["topk_min_logprob"] - encoding["topk_max_abs_error"]
            column = table.column(name)
            while pa.types.is_list(column.type):
                column = pc.list_flatten(column)
            total += int(np.count_nonzero(column.to_numpy() < low))
    return total
