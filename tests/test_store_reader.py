"""open_store / LogprobStore: typed errors, streaming reads, and interop with polars, duckdb, datasets."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from test_store_common import make_header, make_rows, write_store

from lightning_opd.errors import StoreError, StoreVersionError
from lightning_opd.store.reader import batch_to_rows, open_store
from lightning_opd.store.writer import StoreWriter
from storage_schemas import logprob_store_v1 as fmt


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("reader") / "s", num_parts=3, topk=2, with_text=True)


def _edit_manifest(src, dst, **changes):
    shutil.copytree(src, dst)
    path = dst / fmt.MANIFEST_FILE
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return dst


def test_open_errors(tmp_path, store_dir):
    with pytest.raises(StoreError, match="directory missing"):
        open_store(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="holds no manifest.json"):
        open_store(tmp_path / "empty")
    writer = StoreWriter(tmp_path / "unfinished", make_header(), num_parts=2)
    writer.write_part(0, make_rows(0))
    with pytest.raises(StoreError, match=r"not finalized \(1 parts committed.*lopd store finalize"):
        open_store(tmp_path / "unfinished")
    other = _edit_manifest(store_dir, tmp_path / "other", format="some-other-format")
    with pytest.raises(StoreError, match="not a lightning-opd-logprob-store manifest"):
        open_store(other)
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / fmt.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="not JSON"):
        open_store(tmp_path / "garbled")
    gone = tmp_path / "gone"
    shutil.copytree(store_dir, gone)
    (gone / fmt.shard_file(1)).unlink()
    with pytest.raises(StoreError, match="missing on disk"):
        open_store(gone)


def test_other_major_version_refused_newer_minor_warns(tmp_path, store_dir):
    with pytest.raises(StoreVersionError, match=r"format 2\.0.*reads 1\.x.*upgrade lightning-opd"):
        open_store(_edit_manifest(store_dir, tmp_path / "v2", format_version="2.0"))
    with pytest.raises(StoreVersionError, match=r"format 0\.3.*re-run `lopd precompute`"):
        open_store(_edit_manifest(store_dir, tmp_path / "v0", format_version="0.3"))
    with pytest.warns(UserWarning, match=r"1\.7, newer than " + re.escape(fmt.FORMAT_VERSION)):
        store = open_store(_edit_manifest(store_dir, tmp_path / "v17", format_version="1.7"))
    assert store.num_rows == 3 * 8


def test_streaming_reads(store_dir):
    store = open_store(store_dir)
    assert store.num_rows == 24 and len(store.shard_paths) == 3 and store.topk == 2
    batches = list(store.iter_batches(columns=["prompt_id", "response_ids"], batch_size=5))
    assert all(b.num_rows <= 5 for b in batches)
    assert sum(b.num_rows for b in batches) == store.num_rows
    assert batches[0].schema.names == ["prompt_id", "response_ids"]
    assert store.num_tokens == sum(len(r["response_ids"]) for r in store.iter_rows(["response_ids"]))
    rows = list(store.iter_rows(shards=[2]))
    want = make_rows(2, topk=2, with_text=True)
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in want]
    assert rows[1]["behavior_logprobs"].dtype == np.float32 and rows[1]["behavior_logprobs"].flags.writeable
    assert rows[1]["teacher_topk_logprobs"].shape == (len(want[1]["response_ids"]), 2)
    with pytest.raises(StoreError, match=r"no columns \['logits'\]"):
        list(store.iter_batches(columns=["logits"]))


def test_batch_to_rows_handles_sliced_batches(store_dir):
    store = open_store(store_dir)
    batch = next(store.iter_batches(batch_size=8))
    rows = batch_to_rows(batch.slice(3, 4), topk=2)
    full = batch_to_rows(batch, topk=2)
    for a, b in zip(rows, full[3:7]):
        np.testing.assert_array_equal(a["response_ids"], b["response_ids"])
        np.testing.assert_array_equal(a["teacher_topk_ids"], b["teacher_topk_ids"])


def test_foreign_shard_refused_at_read(tmp_path, store_dir):
    mixed = tmp_path / "mixed"
    shutil.copytree(store_dir, mixed)
    foreign = write_store(tmp_path / "foreign", num_parts=3, topk=2, with_text=True)
    shutil.copy(foreign / fmt.shard_file(1), mixed / fmt.shard_file(1))
    store = open_store(mixed)  # open trusts the manifest; reading the shard checks its footer
    with pytest.raises(StoreError, match="belongs to another store"):
        list(store.iter_batches(shards=[1]))


def test_interop_polars_duckdb_datasets(tmp_path, store_dir):
    import duckdb
    import polars as pl

    store = open_store(store_dir)
    rows = list(store.iter_rows())
    index = next(i for i, r in enumerate(rows) if len(r["response_ids"]) > 0)
    first = rows[index]
    glob = str(store_dir / "data" / "*.parquet")
    # A leftover temp file must not be seen by globbing readers.
    (store_dir / "data" / ".part-000009.parquet.tmp-1").write_bytes(b"junk")
    try:
        frame = pl.scan_parquet(glob).select("prompt_id", "teacher_logprobs").collect()
        assert frame.height == store.num_rows
        assert frame["prompt_id"][index] == first["prompt_id"]
        np.testing.assert_array_equal(frame["teacher_logprobs"][index].to_numpy(), first["teacher_logprobs"])

        count, token = duckdb.sql(
            f"select count(*), max(case when prompt_id = '{first['prompt_id']}' and sample_index = {first['sample_index']} "
            f"then response_ids[1] end) from read_parquet('{glob}')"
        ).fetchall()[0]
        assert count == store.num_rows and token == first["response_ids"][0]

        from datasets import load_dataset

        dataset = load_dataset("parquet", data_files=glob, split="train", cache_dir=str(tmp_path / "hf"))
        assert len(dataset) == store.num_rows
        assert dataset[index]["prompt_id"] == first["prompt_id"]
        np.testing.assert_allclose(dataset[index]["behavior_logprobs"], first["behavior_logprobs"])
    finally:
        (store_dir / "data" / ".part-000009.parquet.tmp-1").unlink()
