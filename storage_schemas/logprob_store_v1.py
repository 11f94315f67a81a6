"""Logprob store, format v1: the single definition of what a store on disk is.

A store is a directory::

    manifest.json                    the only thing readers trust (written last, atomically)
    data/part-000000.parquet         one shard per part; one row per rollout
    commits/header.json              identity of the store, written when the first writer opens it
    commits/part-000000.json         commit marker: a part finished (rows, bytes, sha256, stat sums)
    locks/                           flock files; two writers never write the same part

Everything else in lightning-opd imports the names below instead of repeating them: the version,
the explicit Arrow schema (never inferred), the Parquet writer options, the path templates, the
typed manifest and the invariants every row satisfies (used both when writing and by ``verify``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_opd.config import from_dict, to_dict
from lightning_opd.errors import StoreError, StoreVersionError

FORMAT_NAME = "lightning-opd-logprob-store"
FORMAT_VERSION = "1.3"  # major.minor: a new major breaks readers, a new minor only adds
# 1.1 added the optional sampling_logprobs column (1.0 stores lack it and stay readable).
# 1.2 added the optional compact log-prob encoding (manifest ``encoding``; 1.0/1.1 stores have none).
# 1.3 added the optional compact top-k layout (``encoding.topk_scale``): sorted ids stored as gaps and
# coarser top-k log-probs. A 1.2 reader refuses such a manifest (its ``encoding`` check wants the exact
# 1.2 section) instead of misreading the columns; 1.3 stores without it read as 1.2 stores do.

MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
COMMITS_DIR = "commits"
LOCKS_DIR = "locks"
# `lopd precompute` keeps its intermediate rollouts store here, inside the final store's directory.
ROLLOUTS_SUBDIR = "_rollouts"
SHARD_TEMPLATE = "data/part-{part:06d}.parquet"
COMMIT_TEMPLATE = "commits/part-{part:06d}.json"
HEADER_FILE = "commits/header.json"
PART_LOCK_TEMPLATE = "locks/part-{part:06d}.lock"
STORE_LOCK_FILE = "locks/store.lock"
HEADER_LOCK_FILE = "locks/header.lock"
# Temporary shard names start with a dot so that `data/*.parquet` globs (polars, duckdb, datasets)
# never pick up a half-written file.
TEMP_SHARD_TEMPLATE = "data/.part-{part:06d}.parquet.tmp-{pid}"

KIND_ROLLOUTS = "rollouts"  # sampled by the student, not yet scored by the teacher
KIND_SCORED = "scored"  # every sampled token carries the teacher's log-prob
KINDS = (KIND_ROLLOUTS, KIND_SCORED)
FINISH_REASONS = ("stop", "length")
# How a consumer should treat the teacher's mass outside the stored top-k (METHODS.md §7): rescale the
# k log-probs to sum to one, or keep 1 - sum(top-k) as one extra "tail" bucket. The stored values
# are full-vocabulary log-probs either way, so the tail mass is always recoverable.
TOPK_TAIL_TREATMENTS = ("renormalize", "tail_bucket")

# Log-probs computed in fp32 can land a hair above zero (log-sum-exp rounding); anything larger
# means a bug upstream (e.g. a bf16 log-softmax, or logits stored instead of log-probs).
LOGPROB_TOLERANCE = 1e-4

# Keys of the Parquet key-value metadata in every shard: a shard copied in from another store is
# detected by its store_uuid even when its schema matches.
META_FORMAT = b"lopd.format"
META_FORMAT_VERSION = b"lopd.format_version"
META_STORE_UUID = b"lopd.store_uuid"
META_PART = b"lopd.part"

# ---------------------------------------------------------------------------------------------
# Columns and the Arrow schema
# ---------------------------------------------------------------------------------------------

REQUIRED_COLUMNS = (
    "prompt_id",
    "sample_index",
    "prompt_ids",
    "response_ids",
    "behavior_logprobs",
    "teacher_logprobs",
    "finish_reason",
)
TOPK_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs")
REWARD_COLUMN = "reward"
TEXT_COLUMN = "response_text"
SAMPLING_COLUMN = "sampling_logprobs"  # since 1.1
# What the manifest's sampling section records for the two sampler log-prob columns (vLLM's
# LogprobsMode names for the same quantities).
BEHAVIOR_LOGPROBS_MODE = "raw_logprobs"
SAMPLING_LOGPROBS_MODE = "processed_logprobs"

COLUMN_DESCRIPTIONS: dict[str, str] = {
    "prompt_id": "Stable id of the prompt in the prompt set (the same id for all n samples of a prompt).",
    "sample_index": "Index of this sample among the n samples drawn for the prompt (0-based).",
    "prompt_ids": "Token ids of the prompt exactly as fed to the student (chat template applied).",
    "response_ids": "Token ids the student sampled, exactly as sampled (never re-tokenised); may be empty.",
    "behavior_logprobs": (
        "Raw log-prob of each sampled token under the sampling model (log-softmax of its logits at "
        "temperature 1 over the full vocabulary, before temperature/top-p; the manifest's "
        "sampling.behavior_logprobs says 'raw_logprobs'): what OPD's reverse-KL advantage and a trust "
        "region around pi_ref use."
    ),
    SAMPLING_COLUMN: (
        "Optional (format 1.1+): log-prob of each sampled token under the distribution it was drawn "
        "from: temperature and top-p applied, renormalised over the nucleus; 0 for greedy (temperature "
        "0). What an importance ratio to the sampler uses; the manifest's sampling.sampling_logprobs "
        "says 'processed_logprobs'."
    ),
    "teacher_logprobs": (
        "Teacher log-prob (temperature 1, full vocabulary) of each sampled token given the prompt and "
        "the preceding response tokens; null in a 'rollouts' store, never null in a 'scored' store."
    ),
    "finish_reason": "'stop' (the student emitted EOS) or 'length' (cut at the horizon without EOS).",
    "teacher_topk_ids": "Per response position, the ids of the teacher's k most likely next tokens.",
    "teacher_topk_logprobs": (
        "Per response position, the teacher's full-vocabulary log-probs of those k tokens, in the "
        "same order; the manifest's topk.tail_treatment says how mass outside the top-k is handled."
    ),
    "reward": "Optional scalar reward of the rollout (e.g. answer correctness); null when unknown.",
    "response_text": "Optional detokenised response, kept for inspection and the repetition diagnostic.",
}


def _list_of(value_type: pa.DataType) -> pa.DataType:
    # Elements are never null: a log-prob or id that is unknown is an error, not a hole.
    return pa.list_(pa.field("element", value_type, nullable=False))


def store_schema(
    kind: str = KIND_SCORED,
    *,
    topk: int | None = None,
    with_reward: bool = False,
    with_text: bool = False,
    with_sampling: bool = False,
    encoding: dict[str, Any] | None = None,
) -> pa.Schema:
    """The exact Arrow schema of a store's shards for the given options (column order is fixed).

    ``encoding`` (a manifest ``encoding`` section, format 1.2+) gives the on-disk schema of a compact
    store: its log-prob columns hold uint16 codes (``decode_logprobs``); None gives float32 log-probs,
    which is also what every reader hands out.
    """
    if kind not in KINDS:
        raise StoreError(f"store kind must be one of {KINDS}, got {kind!r}")
    logprob = pa.float32() if encoding is None else pa.uint16()
    if topk is not None and (not isinstance(topk, int) or topk < 1):
        raise StoreError(f"top-k must be a positive int or None, got {topk!r}")
    fields = [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("prompt_ids", _list_of(pa.int32()), nullable=False),
        pa.field("response_ids", _list_of(pa.int32()), nullable=False),
        pa.field("behavior_logprobs", _list_of(logprob), nullable=False),
        *([pa.field(SAMPLING_COLUMN, _list_of(logprob), nullable=False)] if with_sampling else []),
        pa.field("teacher_logprobs", _list_of(logprob), nullable=kind == KIND_ROLLOUTS),
        pa.field("finish_reason", pa.string(), nullable=False),
    ]
    if topk is not None:
        fields.append(
            pa.field("teacher_topk_ids", _list_of(_list_of(pa.int32())), nullable=kind == KIND_ROLLOUTS)
        )
        fields.append(
            pa.field("teacher_topk_logprobs", _list_of(_list_of(logprob)), nullable=kind == KIND_ROLLOUTS)
        )
    if with_reward:
        fields.append(pa.field(REWARD_COLUMN, pa.float32(), nullable=True))
    if with_text:
        fields.append(pa.field(TEXT_COLUMN, pa.string(), nullable=True))
    return pa.schema(fields)


def describe_format() -> str:
    """Markdown reference of the format (layout, columns, encodings), generated from the definitions here."""
    schema = store_schema(KIND_SCORED, topk=1, with_reward=True, with_text=True, with_sampling=True)
    optional = {*TOPK_COLUMNS, REWARD_COLUMN, TEXT_COLUMN, SAMPLING_COLUMN}
    lines = [
        f"# {FORMAT_NAME}, format {FORMAT_VERSION}",
        "",
        "```",
        f"{MANIFEST_FILE}   {HEADER_FILE}   {SHARD_TEMPLATE}   {COMMIT_TEMPLATE}   {LOCKS_DIR}/",
        "```",
        "",
        "| column | type | nullable | required | description |",
        "|---|---|---|---|---|",
    ]
    for f in schema:
        nullable = "in 'rollouts' stores" if f.name == "teacher_logprobs" else ("yes" if f.nullable else "no")
        required = "optional" if f.name in optional else "required"
        lines.append(f"| `{f.name}` | `{f.type}` | {nullable} | {required} | {COLUMN_DESCRIPTIONS[f.name]} |")
    options = parquet_writer_options(schema)
    lines += [
        "",
        f"Parquet: {options['compression']} (level {options['compression_level']}), dictionary encoding only on "
        f"string columns, BYTE_STREAM_SPLIT on numeric list leaves, row groups of about "
        f"{ROW_GROUP_TARGET_BYTES // 2**20} MiB decoded (at most {ROW_GROUP_MAX_ROWS} rows). Footer key-value "
        f"metadata: {', '.join(k.decode() for k in (META_FORMAT, META_FORMAT_VERSION, META_STORE_UUID, META_PART))}.",
        "",
        "Compact stores (format 1.2+, opt-in: `lopd precompute --compact-logprobs`, `lopd store compact`): the "
        f"log-prob columns ({', '.join(f'`{c}`' for c in LOGPROB_COLUMNS)}) hold `uint16` codes instead of "
        "`float32`, decoded as value = -code / scale nats. The manifest's `encoding` section states it: "
        f"`{json.dumps(fixed16_encoding())}`. Outside [min_logprob, 0] a value is clamped (the error bound "
        "holds only inside the range). Readers decode transparently; a store is compact or not as a whole. "
        "`encoding` joins the store's identity only when set, so older stores keep their ids.",
        "",
        "Compact top-k (format 1.3+, opt-in on top of the above: `--compact-topk-scale N`, `lopd store compact "
        "--topk-scale N`): `teacher_topk_ids` holds each position's ids sorted ascending as the first id, then "
        "the gaps to the previous id; `teacher_topk_logprobs` holds their log-probs in that id order as "
        "`uint16` codes at the coarser `topk_scale` (value = -code / topk_scale, |error| <= "
        "`topk_max_abs_error` = 0.5 / topk_scale). The rank order is not stored: readers sort each position "
        "by decreasing decoded log-prob, ties by increasing id, so entries whose codes tie may come back in "
        "another order than written (the top-k objectives are sums over the k entries and do not see it). "
        "With N = 32: "
        f"`{json.dumps({k: v for k, v in fixed16_encoding(topk_scale=SUGGESTED_TOPK_SCALE).items() if k.startswith('topk')})}`"
        " (other keys as above). A 1.2 reader refuses such a manifest; a 1.3 store without `topk_scale` "
        "is read by 1.2 as before.",
    ]
    return "\n".join(lines) + "\n"


def schema_options(columns: list[str] | tuple[str, ...], topk: int | None) -> dict[str, Any]:
    """The ``store_schema`` keyword options that produce exactly ``columns``."""
    return {
        "topk": topk,
        "with_reward": REWARD_COLUMN in columns,
        "with_text": TEXT_COLUMN in columns,
        "with_sampling": SAMPLING_COLUMN in columns,
    }


# ---------------------------------------------------------------------------------------------
# Parquet writer options
# ---------------------------------------------------------------------------------------------

COMPRESSION = "zstd"
# Higher zstd levels buy <1% on this data (byte-stream-split already exposes the redundancy) and
# cost 2-3x write time; see benchmarks/bench_store.py.
COMPRESSION_LEVEL = 1
# Row groups are the unit of streaming reads: a reader holds one decoded row group at a time. A
# 16k-token rollout with top-20 is ~2.6 MB in memory, so the size is bounded in bytes, not rows.
ROW_GROUP_TARGET_BYTES = 64 * 1024 * 1024
ROW_GROUP_MAX_ROWS = 2048


def _leaf_paths(f: pa.Field, prefix: str = "") -> list[tuple[str, pa.DataType]]:
    """Parquet column paths of the leaves under an Arrow field (lists become ``name.list.element``)."""
    path = f"{prefix}{f.name}"
    if pa.types.is_list(f.type):
        return _leaf_paths(f.type.value_field, f"{path}.list.")
    return [(path, f.type)]


def parquet_writer_options(schema: pa.Schema) -> dict[str, Any]:
    """Keyword arguments for ``pq.ParquetWriter`` (and ``pq.write_table``) for a store schema.

    - zstd everywhere.
    - Dictionary encoding only on string columns: on float/int lists of high-entropy values the
      dictionary overflows, falls back to plain, and costs ~40% more bytes (ANCHORS.md: 12.3 ->
      8.6 B/token).
    - BYTE_STREAM_SPLIT on every numeric list leaf, floats *and* int32 ids: splitting the bytes of
      each value into separate streams lets zstd see that high bytes barely vary. Measured here:
      -9% on log-probs, -20..25% on token ids (pyarrow, polars and duckdb read it).
    - Statistics only on the small scalar columns; min/max of token ids are useless for pruning.
    """
    leaves = [leaf for f in schema for leaf in _leaf_paths(f)]
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    split = [
        path for path, t in leaves if ".list." in path and (pa.types.is_floating(t) or pa.types.is_integer(t))
    ]
    stats = [f.name for f in schema if not pa.types.is_list(f.type)]
    return {
        "compression": COMPRESSION,
        "compression_level": COMPRESSION_LEVEL,
        "use_dictionary": strings,
        "use_byte_stream_split": split,
        "write_statistics": stats,
    }


def row_group_rows(table: pa.Table) -> int:
    """Rows per row group for ``table``: about ROW_GROUP_TARGET_BYTES decoded, at most ROW_GROUP_MAX_ROWS."""
    if table.num_rows == 0:
        return 1
    bytes_per_row = max(1, table.nbytes // table.num_rows)
    return int(max(1, min(ROW_GROUP_MAX_ROWS, ROW_GROUP_TARGET_BYTES // bytes_per_row)))


def shard_metadata(store_uuid: str, part: int) -> dict[bytes, bytes]:
    """Key-value metadata written into every shard's footer."""
    return {
        META_FORMAT: FORMAT_NAME.encode(),
        META_FORMAT_VERSION: FORMAT_VERSION.encode(),
        META_STORE_UUID: store_uuid.encode(),
        META_PART: str(part).encode(),
    }


def shard_file(part: int) -> str:
    return SHARD_TEMPLATE.format(part=part)


def commit_file(part: int) -> str:
    return COMMIT_TEMPLATE.format(part=part)


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
    return _is_int(value) and 1 <= value <= high and value & (value - 1) == 0


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
            f = pa.field(f.name, _list_of(_list_of(leaf)) if nested else _list_of(leaf), nullable=f.nullable)
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
    lists = pa.ListArray.from_arrays(pa.array(inner), pa.array(leaves, leaf), type=_list_of(leaf))
    return pa.ListArray.from_arrays(pa.array(outer), lists, type=_list_of(_list_of(leaf)), mask=mask)


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


# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------


def parse_version(version: Any) -> tuple[int, int]:
    """'1.0' -> (1, 0); anything else raises StoreVersionError."""
    parts = str(version).split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise StoreVersionError(f"store format version must look like 'MAJOR.MINOR', got {version!r}")
    return int(parts[0]), int(parts[1])


def check_format_version(found: Any, *, where: str = "store") -> None:
    """Refuse another major version (saying what to do); warn about a newer minor version."""
    major, minor = parse_version(found)
    our_major, our_minor = parse_version(FORMAT_VERSION)
    if major > our_major:
        raise StoreVersionError(
            f"{where} uses logprob store format {found}, this lightning-opd reads {our_major}.x; "
            "upgrade lightning-opd (pip install -U lightning-opd) to read it"
        )
    if major < our_major:
        raise StoreVersionError(
            f"{where} uses logprob store format {found}, this lightning-opd reads {our_major}.x; "
            "re-run `lopd precompute` to rebuild it with this version"
        )
    if minor > our_minor:
        warnings.warn(
            f"{where} uses logprob store format {found}, newer than {FORMAT_VERSION}; reading it, "
            "but columns or manifest fields added since will be ignored (upgrade lightning-opd)",
            stacklevel=2,
        )


# ---------------------------------------------------------------------------------------------
# Identity: the header stage one passes in, and the content id derived from it
# ---------------------------------------------------------------------------------------------

SAMPLING_KEYS = ("backend", "n", "temperature", "top_p", "max_new_tokens", "seed")
HEADER_KEYS = (
    "kind",
    "teacher",
    "student",
    "teacher_consistency",
    "sampling",
    "horizon",
    "prompt_set",
    "topk",
    "extra",
    "encoding",  # since 1.2; optional (None: float32 log-probs)
)

# What the behaviour log-probs are (manifest ``sampling.behavior_logprobs``): both samplers write the
# raw log-prob of the sampled token under the model's unmodified distribution (temperature 1, no
# top-p), whatever temperature/top-p they sampled with (vLLM's ``logprobs_mode`` of the same name).
BEHAVIOR_LOGPROBS_DISTRIBUTION = "raw_logprobs"
# What the optional sampling log-probs are (manifest ``sampling.sampling_logprobs``): vLLM's name for
# log-probs after temperature and top-p, renormalised over the nucleus; the distribution drawn from.
SAMPLING_LOGPROBS_DISTRIBUTION = SAMPLING_LOGPROBS_MODE


# The inference engine's scale settings, recorded where an engine ran: ``sampling.engine`` for the
# rollout sampler and ``extra.scoring_engine`` for the teacher scorer; null for the transformers
# backend (not applicable), absent in stores written before they were recorded. They say how a
# store was made, not what it holds: they are not identity fields. Values are what was handed to the
# engine; a null inside means the engine chose (its hardware default, the model's context length).
ENGINE_KEYS = ("tensor_parallel_size", "max_num_seqs", "gpu_memory_utilization", "max_model_len")
SCORING_ENGINE_KEY = "scoring_engine"  # in manifest.extra, next to "scoring_backend"


def engine_section(
    *,
    tensor_parallel_size: int,
    max_num_seqs: int | None,
    gpu_memory_utilization: float | None,
    max_model_len: int | None,
) -> dict[str, Any]:
    """One engine record (``sampling.engine`` / ``extra.scoring_engine``)."""
    return {
        "tensor_parallel_size": tensor_parallel_size,
        "max_num_seqs": max_num_seqs,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
    }


def sampling_section(
    backend: str, backend_version: str, config: Any, engine: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest's ``sampling`` section, from any config with n/temperature/top_p/max_new_tokens/seed;
    ``engine`` is the sampler engine's ``engine_section`` (None: the backend has no such settings)."""
    return {
        "backend": backend,
        "backend_version": backend_version,
        "n": config.n,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        # Which sampler log-prob column holds what (vLLM's LogprobsMode names): raw (temperature 1,
        # full vocabulary) vs the distribution each token was drawn from (temperature + top-p).
        "behavior_logprobs": BEHAVIOR_LOGPROBS_DISTRIBUTION,
        "sampling_logprobs": SAMPLING_LOGPROBS_DISTRIBUTION,
        "engine": engine,
    }


def prompt_set_section(
    source: str, *, content_hash: str, num_prompts: int, skipped: int, part_size: int
) -> dict[str, Any]:
    """The manifest's ``prompt_set`` section: where the prompts came from and their content hash."""
    return {
        "source": source,
        "content_hash": content_hash,
        "num_prompts": num_prompts,
        "skipped_prompts": skipped,
        "part_size": part_size,
    }


# What makes two stores hold the same content. Paths are left out (moving a model does not change
# its outputs); the backend version is left out (a patch release must not orphan a half-written store).
IDENTITY_FIELDS = (
    "kind",
    "teacher.fingerprint",
    "teacher.tokenizer_fingerprint",
    "teacher.dtype",
    "student.fingerprint",
    "student.tokenizer_fingerprint",
    "student.dtype",
    "prompt_set.content_hash",
    "prompt_set.num_prompts",
    "sampling.backend",
    "sampling.n",
    "sampling.temperature",
    "sampling.top_p",
    "sampling.max_new_tokens",
    "sampling.seed",
    "horizon",
    "topk.k",
    "topk.tail_treatment",
)
# Identity fields that count only when set: a 1.0/1.1 store (no encoding) keeps the id it always had,
# and a compact store of the same content gets another id (its values differ by up to the stated error).
OPTIONAL_IDENTITY_FIELDS = ("encoding",)


def _get_dotted(data: dict[str, Any], dotted: str) -> Any:
    value: Any = data
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def identity(header: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of a header, flat and dotted (missing ones are None; optional ones left out)."""
    fields = {name: _get_dotted(header, name) for name in IDENTITY_FIELDS}
    fields.update({name: header[name] for name in OPTIONAL_IDENTITY_FIELDS if header.get(name) is not None})
    return fields


def compute_store_id(header: dict[str, Any]) -> str:
    """Content id of a store: sha256 of the canonical JSON of its identity fields."""
    canonical = json.dumps(identity(header), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted names of the identity fields on which two headers differ."""
    ia, ib = identity(a), identity(b)
    return [name for name in (*IDENTITY_FIELDS, *OPTIONAL_IDENTITY_FIELDS) if ia.get(name) != ib.get(name)]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _model_problems(kind: Any, student: Any, teacher: Any, consistency: Any) -> list[str]:
    problems = []
    if not isinstance(student, dict) or not student.get("fingerprint"):
        problems.append(f"header student must be a dict with a 'fingerprint', got {student!r}")
    if teacher is not None and not isinstance(teacher, dict):
        problems.append(f"header teacher must be a dict or None, got {teacher!r}")
    if kind != KIND_SCORED:
        return problems
    if not isinstance(teacher, dict) or not teacher.get("fingerprint"):
        problems.append(f"a 'scored' store needs header teacher with a 'fingerprint', got {teacher!r}")
    # consistent is None when nothing records who wrote the SFT data (the note says so).
    if (
        not isinstance(consistency, dict)
        or consistency.get("consistent") not in (True, False, None)
        or not isinstance(consistency.get("allowed"), bool)
    ):
        problems.append(
            f"a 'scored' store needs teacher_consistency {{consistent: bool|None, allowed: bool}}, got {consistency!r}"
        )
    elif consistency.get("consistent") is False and not consistency["allowed"]:
        problems.append(
            "teacher_consistency says the scoring teacher is not the SFT teacher and it was not allowed"
        )
    return problems


def _sampling_problems(sampling: Any, horizon: Any) -> list[str]:
    if not isinstance(sampling, dict):
        return [f"header sampling must be a dict, got {sampling!r}"]
    problems = [f"header sampling lacks {key!r}" for key in SAMPLING_KEYS if key not in sampling]
    rules = {
        "n": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
        "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
        "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]"),
        "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    }
    for key, (ok, expected) in rules.items():
        if key in sampling and not ok(sampling[key]):
            problems.append(f"sampling.{key} must be {expected}, got {sampling[key]!r}")
    if not (_is_int(horizon) and horizon >= 1):
        problems.append(f"header horizon must be an int >= 1, got {horizon!r}")
    elif "max_new_tokens" in sampling and horizon != sampling["max_new_tokens"]:
        problems.append(
            f"header horizon must equal sampling.max_new_tokens, got {horizon} vs {sampling['max_new_tokens']}"
        )
    return problems


def _topk_problems(kind: Any, topk: Any) -> list[str]:
    if topk is None:
        return []
    if kind == KIND_ROLLOUTS:
        return [f"header topk applies to 'scored' stores only (the teacher writes it), got {topk!r}"]
    if (
        not isinstance(topk, dict)
        or not (_is_int(topk.get("k")) and topk["k"] >= 1)
        or topk.get("tail_treatment") not in TOPK_TAIL_TREATMENTS
    ):
        return [
            f"header topk must be None or {{k: int >= 1, tail_treatment: one of {TOPK_TAIL_TREATMENTS}}}, got {topk!r}"
        ]
    return []


def _engine_problems(where: str, engine: Any) -> list[str]:
    """An engine record is absent/None or exactly ``ENGINE_KEYS``, each a positive number or None."""
    if engine is None:
        return []
    if not isinstance(engine, dict) or sorted(engine) != sorted(ENGINE_KEYS):
        return [f"header {where} must be None or a dict with keys {list(ENGINE_KEYS)}, got {engine!r:.80}"]
    return [
        f"{where}.{key} must be a positive number or None, got {value!r}"
        for key, value in engine.items()
        if value is not None and not (_is_number(value) and value > 0)
    ]


def header_problems(header: dict[str, Any]) -> list[str]:
    """What is wrong with a store header (the identity sections); empty when it is valid."""
    if not isinstance(header, dict):
        return [f"store header must be a dict, got {type(header).__name__}"]
    problems = []
    unknown = sorted(set(header) - set(HEADER_KEYS))
    if unknown:
        problems.append(f"header has unknown keys {unknown}; known keys are {list(HEADER_KEYS)}")
    kind = header.get("kind")
    if kind not in KINDS:
        problems.append(f"header kind must be one of {KINDS}, got {kind!r}")
    problems += _model_problems(
        kind, header.get("student"), header.get("teacher"), header.get("teacher_consistency")
    )
    problems += _sampling_problems(header.get("sampling"), header.get("horizon"))
    prompt_set = header.get("prompt_set")
    if not isinstance(prompt_set, dict) or not prompt_set.get("content_hash"):
        problems.append(f"header prompt_set must be a dict with a 'content_hash', got {prompt_set!r}")
    elif not (_is_int(prompt_set.get("num_prompts")) and prompt_set["num_prompts"] >= 0):
        problems.append(f"prompt_set.num_prompts must be an int >= 0, got {prompt_set.get('num_prompts')!r}")
    problems += _topk_problems(kind, header.get("topk"))
    problems += encoding_problems(header.get("encoding"))
    if header.get("extra") is not None and not isinstance(header.get("extra"), dict):
        problems.append(f"header extra must be a dict, got {header.get('extra')!r}")
    for section, key in (("sampling", "engine"), ("extra", SCORING_ENGINE_KEY)):
        if isinstance(header.get(section), dict):
            problems += _engine_problems(f"{section}.{key}", header[section].get(key))
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        problems.append(f"header must be plain JSON (str/int/float/bool/None/list/dict): {e}")
    return problems


def topk_of(header: dict[str, Any]) -> int | None:
    topk = header.get("topk")
    return topk.get("k") if isinstance(topk, dict) else None


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
        if kind == _INT and _is_int(value):
            return True
        if kind == _FLOAT and (_is_int(value) or isinstance(value, float)):
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
        if not (_is_int(self.num_parts) and self.num_parts >= 1):
            problems.append(f"manifest num_parts must be an int >= 1, got {self.num_parts!r}")
        if self.kind in KINDS and (self.topk_k is None or (_is_int(self.topk_k) and self.topk_k >= 1)):
            expected = store_schema(self.kind, **schema_options(self.columns, self.topk_k)).names
            if list(self.columns) != expected:
                problems.append(f"manifest columns {self.columns} do not match the format's {expected}")
        parts = [s.part for s in self.shards]
        if sorted(parts) != list(range(len(parts))) or (
            _is_int(self.num_parts) and len(parts) != self.num_parts
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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------
# Derived stores (lopd store filter / merge / export): identity, lineage, merge rules
# ---------------------------------------------------------------------------------------------
#
# Identity: a derived store's ``prompt_set.content_hash`` is replaced by ``derived_content_hash``
# (operation, source store ids, parameters), so its store_id differs from every source and the same
# command on the same sources always yields the same id.
#
# Lineage: the writer does not pass ``Manifest.lineage`` through (it writes ``[]``), so the record of
# how a store was derived lives in ``manifest.extra[LINEAGE_KEY]``: one entry per operation, each
# naming its sources (store_id, path, manifest sha256, and their own lineage, nested).
#
# Merge rules (checked field by field, refusing with both values named): ``MERGE_MUST_MATCH`` below —
# same format major, kind 'scored', teacher and student (fingerprint, tokenizer fingerprint, dtype),
# teacher_consistency, top-k (k, tail treatment), sampling temperature and top_p, horizon (stage two
# cuts every store at one horizon) and columns. Prompt sets, sampling seed, n and backend may differ;
# each source's values are kept in its lineage entry. The merged header records ``sampling.seed`` /
# ``backend`` as a list when they differ, and ``sampling.n`` as the most samples any prompt set now
# has. Sources sharing a prompt set get their ``sample_index`` shifted by the n of earlier sources
# with that prompt set, so (prompt_id, sample_index) stays unique; prompt ids of different prompt
# sets are kept as they are (lineage maps each output part to its source).

LINEAGE_KEY = "lineage"  # in manifest.extra
DERIVED_HASH_PREFIX = "derived1:"
EXPORT_MANIFEST = "lopd_manifest.json"  # the manifest's name in a `lopd store export --to parquet` copy


def derived_content_hash(op: str, source_ids: list[str], params: dict[str, Any]) -> str:
    """The prompt_set.content_hash of a derived store: a function of what it was derived from."""
    canonical = json.dumps(
        {"op": op, "sources": source_ids, "params": params}, sort_keys=True, separators=(",", ":")
    )
    return DERIVED_HASH_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


# (field name in messages, how to read it from a manifest); every source must agree on each.
MERGE_MUST_MATCH: tuple[tuple[str, Callable[[Manifest], Any]], ...] = (
    ("format major version", lambda m: parse_version(m.format_version)[0]),
    ("kind", lambda m: m.kind),
    *(
        (f"{section}.{key}", lambda m, s=section, k=key: (getattr(m, s) or {}).get(k))
        for section in ("teacher", "student")
        for key in ("fingerprint", "tokenizer_fingerprint", "dtype")
    ),
    ("teacher_consistency.consistent", lambda m: (m.teacher_consistency or {}).get("consistent")),
    ("teacher_consistency.allowed", lambda m: (m.teacher_consistency or {}).get("allowed")),
    ("topk.k", lambda m: m.topk_k),
    ("topk.tail_treatment", lambda m: (m.topk or {}).get("tail_treatment")),
    ("sampling.temperature", lambda m: m.sampling.get("temperature")),
    ("sampling.top_p", lambda m: m.sampling.get("top_p")),
    ("horizon", lambda m: m.horizon),
    ("columns", lambda m: list(m.columns)),
    # Parts of one store share one encoding: convert with `lopd store compact` first.
    ("encoding", lambda m: m.encoding),
)


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
