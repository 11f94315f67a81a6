"""The columns and the explicit Arrow schema of a shard, and the Parquet options it is written with."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from lightning_opd.errors import StoreError

from .layout import KIND_ROLLOUTS, KIND_SCORED, KINDS

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


def list_of(value_type: pa.DataType) -> pa.DataType:
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
        pa.field("prompt_ids", list_of(pa.int32()), nullable=False),
        pa.field("response_ids", list_of(pa.int32()), nullable=False),
        pa.field("behavior_logprobs", list_of(logprob), nullable=False),
        *([pa.field(SAMPLING_COLUMN, list_of(logprob), nullable=False)] if with_sampling else []),
        pa.field("teacher_logprobs", list_of(logprob), nullable=kind == KIND_ROLLOUTS),
        pa.field("finish_reason", pa.string(), nullable=False),
    ]
    if topk is not None:
        fields.append(
            pa.field("teacher_topk_ids", list_of(list_of(pa.int32())), nullable=kind == KIND_ROLLOUTS)
        )
        fields.append(
            pa.field("teacher_topk_logprobs", list_of(list_of(logprob)), nullable=kind == KIND_ROLLOUTS)
        )
    if with_reward:
        fields.append(pa.field(REWARD_COLUMN, pa.float32(), nullable=True))
    if with_text:
        fields.append(pa.field(TEXT_COLUMN, pa.string(), nullable=True))
    return pa.schema(fields)


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
