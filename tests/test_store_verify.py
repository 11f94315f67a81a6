"""verify_store and the `lopd store` commands (inspect / verify / finalize) on damaged and healthy stores."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store_common import rewrite_shard, write_store

from lightning_opd.store.summary import format_summary, summarize_store
from lightning_opd.store.verify import verify_store
from pipelines import store_tools
from storage_schemas import logprob_store_v1 as fmt


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("verify") / "s", num_parts=3, topk=2, with_text=True)


@pytest.fixture
def copy(tmp_path, healthy):
    target = tmp_path / "copy"
    shutil.copytree(healthy, target)
    return target


def _problems(root):
    report = verify_store(root)
    assert not report.ok, report.format()
    return "\n".join(report.problems)


def test_healthy_store_verifies(healthy):
    report = verify_store(healthy)
    assert report.ok, report.format()
    assert report.warnings == []
    assert report.counts["shards_ok"] == report.counts["shards_listed"] == 3
    assert report.counts["rows"] == 24 and report.counts["empty_responses"] > 0  # counted, not a problem
    assert "OK" in report.format()


def test_corrupt_bytes(copy):
    path = copy / fmt.shard_file(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert "part-000001.parquet fails its sha256 check" in _problems(copy)


def test_truncated_file_is_a_problem_not_a_traceback(copy):
    path = copy / fmt.shard_file(2)
    path.write_bytes(path.read_bytes()[:-100])
    problems = _problems(copy)
    assert "truncated or replaced" in problems and "unreadable" in problems


def test_missing_shard(copy):
    (copy / fmt.shard_file(0)).unlink()
    assert "listed in the manifest but missing" in _problems(copy)


def test_shard_from_another_store(tmp_path, copy):
    foreign = write_store(tmp_path / "foreign", num_parts=3, topk=2, with_text=True)
    shutil.copy(foreign / fmt.shard_file(1), copy / fmt.shard_file(1))
    # Make the manifest agree on size and checksum: only the footer's store_uuid can tell.
    manifest = json.loads((copy / fmt.MANIFEST_FILE).read_text())
    foreign_entry = json.loads((foreign / fmt.MANIFEST_FILE).read_text())["shards"][1]
    manifest["shards"][1] = foreign_entry
    manifest["stats"]["num_rollouts"] = sum(s["rows"] for s in manifest["shards"])
    manifest["stats"]["num_response_tokens"] = sum(s["tokens"] for s in manifest["shards"])
    (copy / fmt.MANIFEST_FILE).write_text(json.dumps(manifest))
    problems = _problems(copy)
    assert "part-000001.parquet belongs to another store" in problems
    assert "sha256" not in problems


def test_manifest_versions(copy):
    path = copy / fmt.MANIFEST_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": "2.0"}))
    assert "format 2.0" in _problems(copy)
    path.write_text(json.dumps({**data, "format_version": "1.7"}))
    report = verify_store(copy)
    assert report.ok and any("1.7" in w for w in report.warnings)
    path.write_text("{")
    assert "not JSON" in _problems(copy)


def test_nan_injected_by_rewriting_a_shard(copy):
    path = copy / fmt.shard_file(0)
    table = pq.read_table(path)
    column = table.column("teacher_logprobs").combine_chunks()
    values = column.values.to_numpy().copy()
    values[5] = np.nan
    poisoned = pa.ListArray.from_arrays(column.offsets, pa.array(values), type=column.type)
    rewrite_shard(
        path,
        table.set_column(
            table.schema.get_field_index("teacher_logprobs"), table.schema.field("teacher_logprobs"), poisoned
        ),
    )
    problems = _problems(copy)
    assert "teacher_logprobs holds 1 non-finite value(s)" in problems
    assert "prompt_id=" in problems


def test_positive_logprobs_and_bad_lengths_found(copy):
    path = copy / fmt.shard_file(2)
    table = pq.read_table(path)
    column = table.column("behavior_logprobs").combine_chunks()
    values = -column.values.to_numpy()
    values[values == 0] = 1.0
    flipped = pa.ListArray.from_arrays(column.offsets, pa.array(values), type=column.type)
    table = table.set_column(
        table.schema.get_field_index("behavior_logprobs"), table.schema.field("behavior_logprobs"), flipped
    )
    rewrite_shard(path, table)
    assert "behavior_logprobs holds" in _problems(copy) and "> 0" in _problems(copy)


def test_schema_mismatch(copy):
    path = copy / fmt.shard_file(0)
    table = pq.read_table(path).drop_columns(["response_text"])
    rewrite_shard(path, table)
    assert "schema differs from the format's: missing ['response_text']" in _problems(copy)


def test_nullability_is_part_of_the_schema(copy):
    path = copy / fmt.shard_file(0)
    table = pq.read_table(path)
    index = table.schema.get_field_index("teacher_logprobs")
    rewrite_shard(path, table.set_column(index, "teacher_logprobs", table.column(index)))  # now nullable
    assert "differing fields ['teacher_logprobs']" in _problems(copy)


def test_stray_files_are_warnings(copy):
    shutil.copy(copy / fmt.shard_file(0), copy / "data" / "part-000099.parquet")
    (copy / "data" / ".part-000001.parquet.tmp-123").write_bytes(b"x")
    report = verify_store(copy)
    assert report.ok
    assert any("part-000099.parquet is not listed" in w for w in report.warnings)
    assert any("interrupted write" in w for w in report.warnings)


def test_cli_verify_inspect(copy, capsys):
    assert store_tools.main(["verify", str(copy)]) == 0
    assert ": OK" in capsys.readouterr().out
    assert store_tools.main(["verify", str(copy), "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert store_tools.main(["inspect", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "bytes_per_token" in out and "tttttttttttt" in out
    assert store_tools.main(["inspect", str(copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 24
    (copy / fmt.shard_file(1)).write_bytes(b"garbage")
    assert store_tools.main(["verify", str(copy)]) == 1
    assert "PROBLEMS FOUND" in capsys.readouterr().out
    assert store_tools.main(["inspect", str(copy / "nope")]) == 2


def test_summary_fields(healthy):
    summary = summarize_store(healthy)
    assert summary["rows"] == 24 and summary["shards"] == 3
    assert summary["bytes_per_token"] == pytest.approx(summary["bytes"] / summary["tokens"])
    assert summary["teacher"]["fingerprint"] == "t" * 12 and summary["topk"]["k"] == 2
    assert 0 < summary["trunc_rate"] < 1 and summary["rep_rate"] == pytest.approx(3 / 24)
    text = format_summary(summary)
    assert text.splitlines()[0].startswith("root ")
