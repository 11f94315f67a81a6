"""The optional sampling_logprobs column (format 1.1): validation, store tools, reading 1.0 stores, training.

``behavior_logprobs`` are raw (temperature 1, full vocabulary); ``sampling_logprobs`` are under the
distribution each token was drawn from (temperature + top-p, renormalised). The samplers' values are
tested against naive recomputes in test_rollout.py (transformers) and test_vllm.py (vLLM).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store_common import make_header, make_rows, read_table, rewrite_shard, write_store

from lightning_opd.stage2.batch import collate, student_token_batch
from lightning_opd.store import StoreWriter, open_store, tools
from lightning_opd.store.stream import RolloutStream
from lightning_opd.store.verify import verify_store
from pipelines import train
from storage_schemas import logprob_store_v1 as fmt

COLUMN = fmt.SAMPLING_COLUMN


def test_format_declares_the_column_and_its_meaning():
    assert fmt.parse_version(fmt.FORMAT_VERSION) >= (1, 1)
    schema = fmt.store_schema("scored", with_sampling=True)
    assert schema.names.index(COLUMN) == schema.names.index("behavior_logprobs") + 1
    assert schema.field(COLUMN).type == schema.field("behavior_logprobs").type  # list<float32>, non-null
    assert COLUMN not in fmt.store_schema("scored").names  # optional: a 1.0 store lacks it
    assert fmt.schema_options(schema.names, None)["with_sampling"] is True
    assert "temperature 1" in fmt.COLUMN_DESCRIPTIONS["behavior_logprobs"]
    assert "after temperature" not in fmt.COLUMN_DESCRIPTIONS["behavior_logprobs"]
    assert "renormalised over the nucleus" in fmt.COLUMN_DESCRIPTIONS[COLUMN]
    fmt.check_format_version("1.0")  # older minors of the major read without a warning


def test_batch_problems_check_the_column_like_the_others():
    rows = make_rows(0, with_sampling=True)
    schema = fmt.store_schema("scored", with_sampling=True)
    assert fmt.batch_problems(pa.Table.from_pylist(rows, schema=schema), kind="scored", topk=None) == []
    bad = [dict(r) for r in rows]
    row = next(r for r in bad if len(r["response_ids"]) > 3)
    row[COLUMN] = np.array(row[COLUMN])
    row[COLUMN][2] = np.nan
    problems = fmt.batch_problems(pa.Table.from_pylist(bad, schema=schema), kind="scored", topk=None)
    assert any(f"{COLUMN} holds 1 non-finite" in p and "position 2" in p for p in problems), problems
    row[COLUMN][2] = 0.5
    problems = fmt.batch_problems(pa.Table.from_pylist(bad, schema=schema), kind="scored", topk=None)
    assert any(f"{COLUMN} holds 1 value(s) > 0" in p for p in problems), problems
    row[COLUMN] = row[COLUMN][:-1]
    problems = fmt.batch_problems(pa.Table.from_pylist(bad, schema=schema), kind="scored", topk=None)
    assert any(f"{COLUMN} has" in p and "entries but response_ids has" in p for p in problems), problems


def test_store_with_the_column_verifies_and_round_trips_through_filter_and_merge(tmp_path):
    a = write_store(tmp_path / "a", num_parts=2, topk=2, with_sampling=True, with_reward=True)
    header = make_header(topk=2)
    header["sampling"]["seed"] = 1
    b = write_store(tmp_path / "b", num_parts=2, topk=2, with_sampling=True, with_reward=True, header=header)
    assert verify_store(a).ok and open_store(a).manifest.format_version == fmt.FORMAT_VERSION
    assert COLUMN in open_store(a).columns
    source = read_table(a).to_pylist()

    filtered = tmp_path / "filtered"
    tools.filter_store(a, filtered, tools.FilterSpec(min_length=10), log=lambda *_: None)
    assert verify_store(filtered).ok and COLUMN in open_store(filtered).columns
    kept = read_table(filtered).to_pylist()
    assert 0 < len(kept) < len(source)
    assert kept == [r for r in source if len(r["response_ids"]) >= 10]  # the column travels intact

    merged = tmp_path / "merged"
    tools.merge_stores([a, b], merged, log=lambda *_: None)
    assert verify_store(merged).ok
    rows = read_table(merged).to_pylist()
    assert [r[COLUMN] for r in rows] == [r[COLUMN] for r in source + read_table(b).to_pylist()]

    # Stores with and without the column do not merge silently (the column would be lost or invented).
    without = write_store(tmp_path / "without", num_parts=1, topk=2, with_reward=True, header=header)
    with pytest.raises(Exception, match="columns differs"):
        tools.merge_stores([a, without], tmp_path / "m", log=lambda *_: None)

    exported = tmp_path / "export"
    tools.export_parquet(a, exported, log=lambda *_: None)
    assert COLUMN in pq.read_schema(next(exported.glob("part-*.parquet"))).names
    assert COLUMN in (exported / "README.md").read_text()


def test_a_corrupted_sampling_logprob_is_caught_by_verify(tmp_path):
    root = write_store(tmp_path / "s", num_parts=2, with_sampling=True)
    path = root / fmt.shard_file(1)
    table = pq.read_table(path)
    column = table.column(COLUMN).combine_chunks()
    values = column.values.to_numpy().copy()
    values[7] = 3.0  # a log-prob above 0
    poisoned = pa.ListArray.from_arrays(column.offsets, pa.array(values, pa.float32()), type=column.type)
    index = table.schema.get_field_index(COLUMN)
    rewrite_shard(path, table.set_column(index, table.schema.field(index), poisoned))
    report = verify_store(root)
    assert not report.ok
    assert any(f"{COLUMN} holds 1 value(s) > 0" in p for p in report.problems), report.format()


def test_collate_carries_the_column_only_when_every_row_has_it():
    def row(prompt, response, sampling=None):
        n = len(response)
        out = {
            "prompt_id": "p",
            "sample_index": 0,
            "prompt_ids": prompt,
            "response_ids": response,
            "teacher_logprobs": [-0.1] * n,
            "behavior_logprobs": [-0.5] * n,
        }
        if sampling is not None:
            out[COLUMN] = sampling
        return out

    batch = collate([row([5, 6], [7, 8, 9], [-0.1, -0.2, -0.3]), row([5, 6, 7, 8], [9], [-0.4])], 10, 0)
    assert batch.sampling_logprobs[0].tolist() == pytest.approx([0.0, -0.1, -0.2, -0.3])
    assert batch.sampling_logprobs[1].tolist() == pytest.approx([0.0, 0.0, 0.0, -0.4])
    assert collate([row([5, 6], [7, 8], [-0.1, -0.2]), row([5], [7])], 10, 0).sampling_logprobs is None
    assert collate([row([5, 6], [7, 8])], 10, 0).sampling_logprobs is None
    assert collate([row([5, 6], [7, 8, 9], [-0.1, -0.2, -0.3])], 2, 0).sampling_logprobs[0].tolist() == (
        pytest.approx([0.0, -0.1, -0.2])  # cut at the horizon like the other columns
    )


def test_precomputed_store_carries_the_column_into_training(micro_store, micro_student_dir):
    store = open_store(micro_store)
    assert store.manifest.format_version == fmt.FORMAT_VERSION
    assert store.manifest.sampling["behavior_logprobs"] == fmt.BEHAVIOR_LOGPROBS_MODE
    assert store.manifest.sampling["sampling_logprobs"] == fmt.SAMPLING_LOGPROBS_MODE
    assert verify_store(micro_store).ok
    stream = RolloutStream(micro_store, shuffle_buffer=1)
    rows = [next(stream) for _ in range(4)]
    assert all(len(r[COLUMN]) == len(r["response_ids"]) for r in rows)
    # micro_store samples at temperature 1, top-p 0.9: q(y) = p(y) / (nucleus mass) >= p(y).
    assert store.manifest.sampling["temperature"] == 1.0 and store.manifest.sampling["top_p"] < 1
    for r in rows:
        assert (np.asarray(r[COLUMN]) >= np.asarray(r["behavior_logprobs"]) - 1e-6).all()
    from lightning_opd.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(micro_student_dir, dtype="float32", device="cpu")
    batch = collate(rows, 8, tokenizer.pad_token_id, 3)
    token_batch = student_token_batch(model, batch, needs_topk=False, chunk_size=64)
    assert token_batch.sampling_logprobs is batch.sampling_logprobs
    stored = np.concatenate([np.asarray(r[COLUMN]) for r in rows])
    assert np.allclose(np.sort(token_batch.sampling_logprobs[batch.mask > 0].numpy()), np.sort(stored))


def test_a_format_1_0_store_without_the_column_still_reads_and_trains(
    micro_store, sft_student_dir, tmp_path, monkeypatch
):
    # Rewrite the micro store as format 1.0 wrote it: no sampling_logprobs, 1.0 in manifest and footers.
    source = open_store(micro_store)
    old = tmp_path / "old"
    with monkeypatch.context() as m:
        m.setattr(fmt, "FORMAT_VERSION", "1.0")
        m.setattr(fmt.layout, "FORMAT_VERSION", "1.0")
        options = fmt.schema_options([c for c in source.columns if c != COLUMN], source.manifest.topk_k)
        writer = StoreWriter(old, source.manifest.header(), num_parts=len(source.shard_paths), **options)
        for part in range(len(source.shard_paths)):
            table = pq.read_table(source.shard_paths[part]).drop_columns([COLUMN])
            writer.write_part(part, table.to_pylist())
        writer.finalize()
    manifest = json.loads((old / fmt.MANIFEST_FILE).read_text())
    assert manifest["format_version"] == "1.0" and COLUMN not in manifest["columns"]
    assert pq.read_schema(old / fmt.shard_file(0)).metadata[fmt.META_FORMAT_VERSION] == b"1.0"
    report = verify_store(old)
    assert report.ok and report.warnings == [], report.format()
    stream = RolloutStream(old, shuffle_buffer=1)
    rows = [next(stream) for _ in range(2)]
    assert COLUMN not in rows[0]
    assert collate(rows, 8, 0).sampling_logprobs is None
    out = tmp_path / "train"
    train.run(
        train.TrainConfig(
            student=str(sft_student_dir), stores=str(old), out=str(out), steps=2, batch_size=4,
            micro_batch_size=2, lr=1e-3, shuffle_buffer=8, seed=0,
        ),
        log=lambda *_: None,
    )  # fmt: skip
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
