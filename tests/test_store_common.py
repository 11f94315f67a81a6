"""Shared synthetic-store helpers for the tests/test_store_*.py files, and tests of the format module
(storage_schemas.logprob_store_v1) and of lightning_opd.evaluation.diagnostics.

Other store test files import the helpers with ``from test_store_common import ...``.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_opd.errors import ConfigError, StoreError, StoreVersionError
from lightning_opd.evaluation import diagnostics
from lightning_opd.store.reader import open_store
from lightning_opd.store.writer import StoreWriter
from storage_schemas import logprob_store_v1 as fmt

PROMPTS_PER_PART = 4
SAMPLES = 2


def make_header(kind: str = "scored", topk: int | None = None, **overrides) -> dict:
    """A valid header for a synthetic store; ``overrides`` replace whole top-level sections."""
    scored = kind == fmt.KIND_SCORED
    header = {
        "kind": kind,
        "teacher": {
            "path": "/models/teacher",
            "fingerprint": "t" * 64,
            "tokenizer_fingerprint": "k" * 64,
            "dtype": "bfloat16",
        }
        if scored
        else None,
        "student": {
            "path": "/models/student",
            "fingerprint": "s" * 64,
            "tokenizer_fingerprint": "k" * 64,
            "dtype": "bfloat16",
            "sft_teacher_fingerprint": "t" * 64,
        },
        "teacher_consistency": {"consistent": True, "allowed": False, "note": ""} if scored else None,
        "sampling": {
            "backend": "transformers",
            "backend_version": "5.23",
            "n": SAMPLES,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_new_tokens": 48,
            "seed": 0,
            "behavior_logprobs": "raw_logprobs",
        },
        "horizon": 48,
        "prompt_set": {"source": "synthetic", "content_hash": "c" * 64, "num_prompts": 100},
        "topk": {"k": topk, "tail_treatment": "tail_bucket", "note": "full-vocabulary log-probs"}
        if topk
        else None,
        "extra": {},
    }
    header.update(copy.deepcopy(overrides))
    return header


def make_rows(
    part: int,
    *,
    kind: str = "scored",
    topk: int | None = None,
    with_text: bool = False,
    with_reward: bool = False,
    with_sampling: bool = False,
) -> list[dict]:
    """Deterministic synthetic rows of one part: lengths 0..47 (some empty), mixed finish reasons."""
    rng = np.random.default_rng(1000 + part)
    rows = []
    for p in range(PROMPTS_PER_PART):
        prompt = rng.integers(0, 500, int(rng.integers(1, 12))).astype(np.int32)
        for s in range(SAMPLES):
            length = 0 if (p + s + part) % 7 == 0 else int(rng.integers(1, 48))
            row = {
                "prompt_id": f"q{part:03d}-{p}",
                "sample_index": s,
                "prompt_ids": prompt,
                "response_ids": rng.integers(0, 500, length),
                "behavior_logprobs": -rng.exponential(0.5, length),
                "teacher_logprobs": -rng.exponential(0.6, length) if kind == "scored" else None,
                "finish_reason": "length" if length == 47 or (p + s) % 3 == 0 else "stop",
            }
            if topk:
                row["teacher_topk_ids"] = rng.integers(0, 500, (length, topk))
                row["teacher_topk_logprobs"] = -np.sort(rng.exponential(2.0, (length, topk)), axis=1)
            if with_text:
                row["response_text"] = (
                    "ab" * 3000 if s == 1 and p == 0 else " ".join(map(str, row["response_ids"]))
                )
            if with_reward:
                row["reward"] = float(p % 2) if p != 3 else None
            if with_sampling:
                row[fmt.SAMPLING_COLUMN] = -rng.exponential(0.3, length)
            rows.append(row)
    return rows


def write_store(
    root: Path,
    *,
    num_parts: int = 3,
    kind: str = "scored",
    topk: int | None = None,
    with_text: bool = False,
    with_reward: bool = False,
    with_sampling: bool = False,
    header: dict | None = None,
) -> Path:
    """Write and finalize a complete synthetic store at ``root``."""
    header = header or make_header(kind, topk)
    options = dict(with_text=with_text, with_reward=with_reward, with_sampling=with_sampling)
    writer = StoreWriter(root, header, num_parts=num_parts, topk=topk, **options)
    for part in range(num_parts):
        writer.write_part(part, make_rows(part, kind=kind, topk=topk, **options))
    writer.finalize()
    return root


def read_table(root: Path) -> pa.Table:
    """The whole (small, test-sized) store as one table, in part order, without metadata."""
    store = open_store(root)
    table = pa.Table.from_batches(list(store.iter_batches()), schema=store.schema)
    return table.replace_schema_metadata(None)


def rewrite_shard(path: Path, table: pa.Table) -> None:
    """Overwrite a shard in place with ``table`` (metadata of the original kept), as an attacker/bug would."""
    metadata = pq.read_schema(path).metadata
    pq.write_table(table.replace_schema_metadata(metadata), path)


# ---------------------------------------------------------------------------------------------
# Format module
# ---------------------------------------------------------------------------------------------


def test_schema_options_and_column_names():
    base = fmt.store_schema("scored")
    assert base.names == list(fmt.REQUIRED_COLUMNS)
    assert not base.field("teacher_logprobs").nullable
    assert fmt.store_schema("rollouts").field("teacher_logprobs").nullable
    full = fmt.store_schema("scored", topk=8, with_reward=True, with_text=True)
    assert full.names == [*fmt.REQUIRED_COLUMNS, *fmt.TOPK_COLUMNS, "reward", "response_text"]
    assert full.field("teacher_topk_ids").type == pa.list_(
        pa.field("element", pa.list_(pa.field("element", pa.int32(), nullable=False)), nullable=False)
    )
    assert set(full.names) <= set(fmt.COLUMN_DESCRIPTIONS)
    assert fmt.schema_options(full.names, 8) == {
        "topk": 8,
        "with_reward": True,
        "with_text": True,
        "with_sampling": False,
    }
    with pytest.raises(StoreError, match="got 'online'"):
        fmt.store_schema("online")
    with pytest.raises(StoreError, match="got 0"):
        fmt.store_schema("scored", topk=0)


def test_describe_format_lists_every_column():
    doc = fmt.describe_format()
    for name in fmt.store_schema("scored", topk=1, with_reward=True, with_text=True).names:
        assert f"| `{name}` |" in doc
    assert fmt.FORMAT_VERSION in doc and "BYTE_STREAM_SPLIT" in doc


def test_writer_options_dictionary_only_on_strings_and_split_numeric_leaves(tmp_path):
    schema = fmt.store_schema("scored", topk=4, with_text=True)
    options = fmt.parquet_writer_options(schema)
    assert options["compression"] == "zstd"
    assert sorted(options["use_dictionary"]) == ["finish_reason", "prompt_id", "response_text"]
    assert "behavior_logprobs.list.element" in options["use_byte_stream_split"]
    assert "teacher_topk_logprobs.list.element.list.element" in options["use_byte_stream_split"]
    # pyarrow really applies them: check the encodings recorded in a written file.
    write_store(tmp_path / "s", num_parts=1, topk=4, with_text=True)
    meta = pq.ParquetFile(tmp_path / "s" / fmt.shard_file(0)).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["teacher_logprobs.list.element"]
    assert "BYTE_STREAM_SPLIT" in encodings["teacher_topk_ids.list.element.list.element"]
    assert not any("DICTIONARY" in e for e in encodings["behavior_logprobs.list.element"])
    assert meta.column(0).compression == "ZSTD"


def test_row_group_rows_bounded_by_bytes():
    small = pa.table({"x": pa.array([[1] * 10] * 100)})
    assert fmt.row_group_rows(small) == fmt.ROW_GROUP_MAX_ROWS
    big = pa.table({"x": pa.array([np.zeros(4_000_000, np.float32)] * 3)})  # 16 MB per row
    assert fmt.row_group_rows(big) == fmt.ROW_GROUP_TARGET_BYTES // (16_000_000 + 4) == 4


def test_version_checks():
    fmt.check_format_version("1.0")
    with pytest.raises(StoreVersionError, match=r"2\.0.*upgrade lightning-opd"):
        fmt.check_format_version("2.0")
    with pytest.raises(StoreVersionError, match=r"0\.9.*lopd precompute"):
        fmt.check_format_version("0.9")
    with pytest.warns(UserWarning, match="1.7"):
        fmt.check_format_version("1.7")
    with pytest.raises(StoreVersionError, match="got 'one'"):
        fmt.check_format_version("one")


def test_store_id_depends_on_identity_only():
    header = make_header()
    moved = make_header(student={**header["student"], "path": "/elsewhere"})
    assert fmt.compute_store_id(header) == fmt.compute_store_id(moved)
    hotter = make_header(sampling={**header["sampling"], "temperature": 1.0})
    assert fmt.compute_store_id(header) != fmt.compute_store_id(hotter)
    assert fmt.identity_differences(header, hotter) == ["sampling.temperature"]
    assert len(fmt.compute_store_id(header)) == 64


@pytest.mark.parametrize(
    "override, message",
    [
        ({"kind": "online"}, "got 'online'"),
        ({"teacher": None}, "needs header teacher"),
        ({"horizon": 10}, "horizon must equal"),
        ({"teacher_consistency": {"consistent": False, "allowed": False}}, "not allowed|was not allowed"),
        ({"topk": {"k": 0, "tail_treatment": "renormalize"}}, "header topk"),
        ({"topk": {"k": 2, "tail_treatment": "raw"}}, "tail_bucket"),
        ({"teacher_consistency": {"consistent": "yes", "allowed": False}}, "bool|None"),
        ({"prompt_set": {"num_prompts": 3}}, "content_hash"),
        ({"sampling_params": {}}, "unknown keys"),
    ],
)
def test_header_problems(override, message):
    problems = fmt.header_problems(make_header(**override))
    assert any(re.search(message, p) for p in problems), problems


def test_manifest_round_trip_and_unknown_keys(tmp_path):
    write_store(tmp_path / "s", num_parts=2)
    data = json.loads((tmp_path / "s" / fmt.MANIFEST_FILE).read_text())
    manifest = fmt.Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert manifest.problems() == []
    with pytest.warns(UserWarning, match="future_field"):
        fmt.Manifest.from_dict({**data, "future_field": 1})
    with pytest.raises(StoreError, match="lacks required fields"):
        fmt.Manifest.from_dict({k: v for k, v in data.items() if k != "store_uuid"})
    edited = fmt.Manifest.from_dict(
        {**data, "horizon": 12, "sampling": {**data["sampling"], "max_new_tokens": 12}}
    )
    assert any("store_id does not match" in p for p in edited.problems())


def test_batch_problems_locate_bad_values():
    rows = make_rows(0)
    rows[3]["teacher_logprobs"] = rows[3]["teacher_logprobs"].copy()
    rows[3]["teacher_logprobs"][2] = np.nan
    from lightning_opd.store.arrow import rows_to_table

    table = rows_to_table(rows, fmt.store_schema("scored"), None)
    problems = fmt.batch_problems(table, kind="scored", topk=None)
    assert len(problems) == 1
    assert f"prompt_id={rows[3]['prompt_id']!r} position 2" in problems[0]


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


def test_diagnostics():
    assert diagnostics.is_truncated("length") and not diagnostics.is_truncated("stop")
    assert diagnostics.trunc_rate(["length", "stop", "stop", "length"]) == 0.5
    assert diagnostics.trunc_rate([]) == 0.0
    loop = "the answer is " * 2000
    prose = " ".join(str(i * 7919 % 10007) for i in range(3000))
    assert diagnostics.is_repetitive(loop)
    assert not diagnostics.is_repetitive(prose)
    assert not diagnostics.is_repetitive("") and not diagnostics.is_repetitive(None)
    # Only the last window counts: a loop at the start followed by prose is not repetitive.
    assert not diagnostics.is_repetitive(loop + prose, window_chars=len(prose))
    assert diagnostics.rep_rate([loop, prose, prose, loop]) == 0.5
    with pytest.raises(ConfigError, match="got 0"):
        diagnostics.is_repetitive("x", window_chars=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert diagnostics.compression_ratio("") == 0.0
