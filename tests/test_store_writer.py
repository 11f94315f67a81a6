"""StoreWriter: round trip, validation at write, crash safety, resume, sharded workers, locking."""

from __future__ import annotations

import fcntl
import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store_common import make_header, make_rows, read_table, write_store

from lightning_opd.errors import StoreError
from lightning_opd.store.arrow import rows_to_table
from lightning_opd.store.files import sha256_file
from lightning_opd.store.reader import open_store, read_part
from lightning_opd.store.writer import StoreWriter
from pipelines import store_tools
from storage_schemas import logprob_store_v1 as fmt


def test_round_trip_values_and_explicit_schema(tmp_path):
    root = write_store(tmp_path / "s", num_parts=2, topk=3, with_text=True, with_reward=True)
    store = open_store(root)
    rows = list(store.iter_rows())
    expected = make_rows(0, topk=3, with_text=True, with_reward=True) + make_rows(
        1, topk=3, with_text=True, with_reward=True
    )
    assert len(rows) == len(expected) == store.num_rows
    for got, want in zip(rows, expected):
        assert got["prompt_id"] == want["prompt_id"] and got["sample_index"] == want["sample_index"]
        np.testing.assert_array_equal(got["response_ids"], want["response_ids"])
        np.testing.assert_allclose(got["teacher_logprobs"], want["teacher_logprobs"].astype(np.float32))
        np.testing.assert_array_equal(got["teacher_topk_ids"], want["teacher_topk_ids"].reshape(-1, 3))
        assert got["teacher_topk_logprobs"].shape == (len(want["response_ids"]), 3)
        assert got["reward"] == want["reward"] and got["response_text"] == want["response_text"]
    # The shard's schema is exactly the format's, not whatever pyarrow would infer.
    shard_schema = pq.read_schema(root / fmt.shard_file(0))
    assert shard_schema.equals(fmt.store_schema("scored", topk=3, with_reward=True, with_text=True))
    assert shard_schema.metadata[fmt.META_STORE_UUID].decode() == store.manifest.store_uuid
    assert shard_schema.metadata[fmt.META_PART] == b"0"


def test_manifest_contents(tmp_path):
    root = write_store(tmp_path / "s", num_parts=3, with_text=True)
    manifest = open_store(root).manifest
    rows = [r for p in range(3) for r in make_rows(p)]
    lengths = [len(r["response_ids"]) for r in rows]
    assert manifest.num_parts == 3 and [s.part for s in manifest.shards] == [0, 1, 2]
    assert manifest.stats.num_rollouts == len(rows)
    assert manifest.stats.num_response_tokens == sum(lengths)
    assert manifest.stats.max_response_length == max(lengths)
    assert manifest.stats.num_empty == lengths.count(0) > 0
    assert manifest.stats.trunc_rate == pytest.approx(
        sum(r["finish_reason"] == "length" for r in rows) / len(rows)
    )
    assert manifest.stats.rep_rate == pytest.approx(3 / len(rows))  # one "abab..." row per part
    logratio = np.concatenate([r["teacher_logprobs"] - r["behavior_logprobs"] for r in rows])
    assert manifest.stats.mean_teacher_minus_behavior_logratio == pytest.approx(logratio.mean(), rel=1e-5)
    assert manifest.shards[1].sha256 == sha256_file(root / fmt.shard_file(1))
    assert manifest.store_id == fmt.compute_store_id(make_header())
    assert manifest.created_at.endswith("Z") and manifest.writer_version


def test_rollouts_store_has_null_teacher(tmp_path):
    root = write_store(tmp_path / "r", num_parts=1, kind="rollouts")
    store = open_store(root)
    assert store.kind == "rollouts"
    assert all(row["teacher_logprobs"] is None for row in store.iter_rows())
    assert store.manifest.stats.mean_teacher_minus_behavior_logratio is None
    writer = StoreWriter(tmp_path / "r2", make_header("rollouts"), num_parts=1)
    rows = make_rows(0, kind="rollouts")
    rows[0]["teacher_logprobs"] = [-0.1] * len(rows[0]["response_ids"])
    with pytest.raises(StoreError, match="must be null in a 'rollouts' store"):
        writer.write_part(0, rows)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("column", ["teacher_logprobs", "behavior_logprobs"])
def test_non_finite_logprobs_refused_at_write(tmp_path, column, bad):
    writer = StoreWriter(tmp_path / "s", make_header(), num_parts=1)
    rows = make_rows(0)
    rows[1][column] = rows[1][column].copy()
    rows[1][column][4] = bad
    with pytest.raises(StoreError, match=rf"{column}.*non-finite.*prompt_id='q000-0' position 4"):
        writer.write_part(0, rows)
    assert not any((tmp_path / "s" / "data").iterdir())
    assert writer.committed_parts() == set()


def test_bad_rows_refused(tmp_path):
    writer = StoreWriter(tmp_path / "s", make_header(topk=2), num_parts=1, topk=2)

    def attempt(edit, match):
        rows = make_rows(0, topk=2)
        edit(rows[1])
        with pytest.raises(StoreError, match=match):
            writer.write_part(0, rows)

    attempt(lambda r: r.update(teacher_logprobs=np.abs(r["teacher_logprobs"]) + 0.5), r"> 0.*position 0")
    attempt(lambda r: r.update(behavior_logprobs=r["behavior_logprobs"][:-1]), "behavior_logprobs has")
    attempt(lambda r: r.update(teacher_topk_ids=r["teacher_topk_ids"][:, :1]), "k=2")
    attempt(lambda r: r.update(finish_reason="eos"), "got 'eos'")
    attempt(lambda r: r.update(prompt_ids=[]), "prompt_ids is empty")
    attempt(lambda r: r.update(response_ids=-r["response_ids"] - 1), "negative token ids")
    attempt(lambda r: r.update(response_ids=r["response_ids"] + 2**40), "outside the int32 range")
    attempt(lambda r: r.pop("finish_reason"), r"lacks required columns \['finish_reason'\]")
    attempt(lambda r: r.update(reward=1.0), r"columns \['reward'\] that this store does not keep")
    attempt(lambda r: r.update(sample_index=0), r"\('q000-0', 0\) appears twice")
    attempt(lambda r: r.update(teacher_topk_logprobs=[[-1.0], [-1.0, -2.0]]), "ragged")
    assert writer.committed_parts() == set()


def test_empty_responses_are_kept_and_counted(tmp_path):
    root = write_store(tmp_path / "s", num_parts=1, topk=2)
    rows = list(open_store(root).iter_rows())
    empty = [r for r in rows if len(r["response_ids"]) == 0]
    assert empty and all(r["teacher_topk_logprobs"].shape == (0, 2) for r in empty)
    assert open_store(root).manifest.stats.num_empty == len(empty)


def test_table_input_is_conformed_to_schema(tmp_path):
    writer = StoreWriter(tmp_path / "s", make_header(), num_parts=2)
    table = rows_to_table(make_rows(0), fmt.store_schema("scored"), None)
    loose = pa.table({name: table.column(name).to_pylist() for name in reversed(table.column_names)})
    writer.write_part(0, loose)  # inferred types, other column order: cast to the store schema
    with pytest.raises(StoreError, match=r"unexpected \['extra_col'\]"):
        writer.write_part(1, table.append_column("extra_col", pa.array([1] * table.num_rows)))
    writer.write_part(1, rows_to_table(make_rows(1), fmt.store_schema("scored"), None))
    writer.finalize()
    assert read_table(tmp_path / "s").slice(0, table.num_rows).equals(table)


def _uninterrupted(tmp_path, num_parts=3):
    return read_table(write_store(tmp_path / "reference", num_parts=num_parts))


def test_disk_full_mid_write_keeps_committed_parts_and_resume_matches(tmp_path, monkeypatch):
    root = tmp_path / "s"
    writer = StoreWriter(root, make_header(), num_parts=3)
    writer.write_part(0, make_rows(0))
    committed_hash = sha256_file(root / fmt.shard_file(0))

    original = pq.ParquetWriter.write_table

    def fail_halfway(self, table, row_group_size=None):
        original(self, table.slice(0, 3), row_group_size)  # some bytes reach the temporary file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", fail_halfway)
    with pytest.raises(StoreError, match="No space left on device.*committed parts are intact"):
        writer.write_part(1, make_rows(1))
    monkeypatch.undo()

    assert sorted(p.name for p in (root / "data").iterdir()) == ["part-000000.parquet"]  # no temp, no part 1
    assert not (root / fmt.commit_file(1)).exists()
    assert sha256_file(root / fmt.shard_file(0)) == committed_hash
    with pytest.raises(StoreError, match=r"parts 1-2"):
        writer.finalize()

    # A fresh process resumes: part 0 is skipped, the rest written; content equals an uninterrupted run.
    resumed = StoreWriter(root, make_header(), num_parts=3)
    todo = sorted(set(range(3)) - resumed.committed_parts())
    assert todo == [1, 2]
    for part in todo:
        resumed.write_part(part, make_rows(part))
    resumed.finalize()
    assert read_table(root).equals(_uninterrupted(tmp_path))


def test_hard_kill_leftovers_are_redone(tmp_path):
    root = tmp_path / "s"
    writer = StoreWriter(root, make_header(), num_parts=3)
    for part in range(3):
        writer.write_part(part, make_rows(part))
    # Simulate kills at different moments: a temp file left behind; a renamed shard whose marker was
    # never written; a committed shard damaged afterwards.
    (root / "data" / ".part-000001.parquet.tmp-99999").write_bytes(b"PAR1 half")
    (root / fmt.commit_file(1)).unlink()
    with open(root / fmt.shard_file(2), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    assert writer.committed_parts() == {0}
    assert writer.committed_parts(checksum=False) == {0, 2}  # same size: only the checksum notices
    for part in (1, 2):
        writer.write_part(part, make_rows(part))
    assert not (root / "data" / ".part-000001.parquet.tmp-99999").exists()  # cleaned under the part lock
    with pytest.raises(StoreError, match="already committed"):
        writer.write_part(0, make_rows(0))
    writer.finalize()
    assert read_table(root).equals(_uninterrupted(tmp_path))


def test_sharded_workers_then_finalize_equal_single_writer(tmp_path):
    num_parts, num_shards = 5, 2
    root = tmp_path / "sharded"
    for shard_index in range(num_shards):
        worker = StoreWriter(root, make_header(), num_parts=num_parts)
        mine = [p for p in range(num_parts) if p % num_shards == shard_index]
        for part in sorted(set(mine) - worker.committed_parts(mine)):
            worker.write_part(part, make_rows(part))
    # The merge step, through the CLI.
    assert store_tools.main(["finalize", str(root), "--num-shards", str(num_shards)]) == 0
    single = write_store(tmp_path / "single", num_parts=num_parts)
    assert read_table(root).equals(read_table(single))
    a, b = open_store(root).manifest, open_store(single).manifest
    assert a.store_id == b.store_id and a.store_uuid != b.store_uuid
    assert a.stats == b.stats
    assert all(s.sha256 != t.sha256 for s, t in zip(a.shards, b.shards))  # uuid in metadata differs


def test_finalize_with_missing_parts_names_the_workers_to_rerun(tmp_path):
    writer = StoreWriter(tmp_path / "s", make_header(), num_parts=6)
    for part in (0, 1, 3, 4):
        writer.write_part(part, make_rows(part))
    with pytest.raises(StoreError, match=r"2 of 6 parts.*parts 2, 5.*--shard-index 2 --num-shards 3"):
        writer.finalize(num_shards=3)
    with pytest.raises(StoreError, match="not finalized"):
        open_store(tmp_path / "s")
    assert store_tools.main(["finalize", str(tmp_path / "s")]) == 2


def test_finalize_is_idempotent_and_store_read_only(tmp_path):
    root = write_store(tmp_path / "s", num_parts=2)
    before = (root / fmt.MANIFEST_FILE).read_text()
    writer = StoreWriter(root, make_header(), num_parts=2)
    assert writer.is_complete() and writer.committed_parts() == {0, 1}
    assert writer.finalize().to_dict() == json.loads(before)
    assert (root / fmt.MANIFEST_FILE).read_text() == before
    with pytest.raises(StoreError, match="finalized"):
        writer.write_part(0, make_rows(0))


def test_different_header_refused(tmp_path):
    root = tmp_path / "s"
    StoreWriter(root, make_header(), num_parts=3).write_part(0, make_rows(0))
    header = make_header()
    other = make_header(
        sampling={**header["sampling"], "seed": 7}, prompt_set={**header["prompt_set"], "content_hash": "d"}
    )
    with pytest.raises(StoreError, match=r"differs in \['prompt_set.content_hash', 'sampling.seed'\]"):
        StoreWriter(root, other, num_parts=3)
    with pytest.raises(StoreError, match=r"differs in \['num_parts'\]"):
        StoreWriter(root, header, num_parts=4)
    with pytest.raises(StoreError, match=r"differs in \['columns'\]"):
        StoreWriter(root, header, num_parts=3, with_text=True)
    # A different path to the same model is the same store (workers on other machines).
    moved = make_header(student={**header["student"], "path": "/mnt/student"})
    with pytest.warns(UserWarning, match="non-identity fields"):
        assert StoreWriter(root, moved, num_parts=3).committed_parts() == {0}


def test_invalid_writer_arguments(tmp_path):
    with pytest.raises(StoreError, match="got 0"):
        StoreWriter(tmp_path / "a", make_header(), num_parts=0)
    with pytest.raises(StoreError, match="topk=4 disagrees"):
        StoreWriter(tmp_path / "b", make_header(), num_parts=1, topk=4)
    with pytest.raises(StoreError, match="horizon must equal"):
        StoreWriter(tmp_path / "c", make_header(horizon=7), num_parts=1)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="holds no logprob store"):
        StoreWriter(tmp_path / "home", make_header(), num_parts=1)
    writer = StoreWriter(tmp_path / "d", make_header(), num_parts=2)
    with pytest.raises(StoreError, match=r"\[0, 2\), got 2"):
        writer.write_part(2, make_rows(2))


def _hold_lock(path, mode):
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, mode | fcntl.LOCK_NB)
    return fd


def test_concurrent_writer_of_same_part_refused(tmp_path):
    root = tmp_path / "s"
    writer = StoreWriter(root, make_header(), num_parts=2)
    fd = _hold_lock(
        root / fmt.PART_LOCK_TEMPLATE.format(part=0), fcntl.LOCK_EX
    )  # another process writing part 0
    try:
        with pytest.raises(StoreError, match="part 0 .* being written by another writer"):
            writer.write_part(0, make_rows(0))
        writer.write_part(1, make_rows(1))  # other parts are free
        with pytest.raises(StoreError, match="parts 0"):
            writer.finalize(wait_s=0)
    finally:
        os.close(fd)
    writer.write_part(0, make_rows(0))
    fd = _hold_lock(root / fmt.STORE_LOCK_FILE, fcntl.LOCK_SH)  # a writer still active
    try:
        with pytest.raises(StoreError, match="writers are still active"):
            writer.finalize(wait_s=0.2)
    finally:
        os.close(fd)
    assert writer.finalize().num_parts == 2


def test_second_finalize_waits_for_the_first(tmp_path):
    root = tmp_path / "s"
    writer = StoreWriter(root, make_header(), num_parts=2)
    for part in range(2):
        writer.write_part(part, make_rows(part))
    fd = _hold_lock(root / fmt.STORE_LOCK_FILE, fcntl.LOCK_EX)  # another worker is finalizing
    releaser = threading.Timer(0.3, os.close, args=(fd,))
    releaser.start()
    try:
        manifest = writer.finalize(wait_s=10)
    finally:
        releaser.join()
    assert manifest.num_parts == 2 and writer.is_finalized()


def test_is_complete_means_every_part_committed(tmp_path):
    writer = StoreWriter(tmp_path / "s", make_header(), num_parts=2)
    writer.write_part(0, make_rows(0))
    assert not writer.is_complete()
    writer.write_part(1, make_rows(1))
    assert writer.is_complete() and not writer.is_finalized()  # ready: the last worker finalizes
    writer.finalize()
    assert writer.is_complete() and writer.is_finalized()


def test_saved_header_and_read_part_of_an_unfinalized_store(tmp_path):
    root = tmp_path / "rollouts"
    header = make_header("rollouts")
    writer = StoreWriter(root, header, num_parts=3, with_reward=True)
    rows = make_rows(1, kind="rollouts", with_reward=True)
    for row in rows:
        row["response_text"] = None  # a column this store does not keep, given as None: accepted
    writer.write_part(1, rows)
    assert StoreWriter.read_header(root) == header
    assert StoreWriter.read_num_parts(root) == 3
    table = read_part(root, 1)
    assert table.num_rows == len(rows) and table.column("reward").to_pylist() == [r["reward"] for r in rows]
    assert read_part(root, 1, columns=["prompt_id"]).column_names == ["prompt_id"]
    with pytest.raises(StoreError, match="part 0 of .* is not committed"):
        read_part(root, 0)
    # Scoring builds the next store from it, with the same parts.
    scored_header = {
        **header,
        "kind": "scored",
        "teacher": make_header()["teacher"],
        "teacher_consistency": {"consistent": None, "allowed": False, "note": "SFT teacher unknown"},
    }
    scored = StoreWriter(
        tmp_path / "scored", scored_header, num_parts=StoreWriter.read_num_parts(root), with_reward=True
    )
    pylist = table.to_pylist()
    for row in pylist:
        row["teacher_logprobs"] = [min(0.0, x - 0.1) for x in row["behavior_logprobs"]]
    scored.write_part(1, pylist)
    path = root / fmt.shard_file(1)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        read_part(root, 1)
    with pytest.raises(StoreError, match="no logprob store"):
        StoreWriter.read_header(tmp_path / "nothing")
