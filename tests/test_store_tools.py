"""`lopd store` derive/export/compare/index tools end to end through the CLI, and the store registry."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_lopd
from test_store_common import make_header, read_table, write_store

from lightning_opd.errors import StoreError
from lightning_opd.evaluation import diagnostics
from lightning_opd.store import registry, tools
from lightning_opd.store.reader import open_store
from lightning_opd.store.summary import position_stats
from lightning_opd.store.verify import verify_store
from storage_schemas import logprob_store_v1 as fmt


@pytest.fixture(autouse=True)
def store_cache(tmp_path, monkeypatch):
    """Every test gets its own store index; the CLI subprocesses inherit the variable."""
    cache = tmp_path / "index"
    monkeypatch.setenv(registry.CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two synthetic scored stores on one prompt set that differ only in the sampling seed."""
    root = tmp_path_factory.mktemp("tools")
    a = write_store(root / "a", num_parts=2, topk=3, with_text=True, with_reward=True)
    header = make_header(topk=3)
    header["sampling"]["seed"] = 1
    b = write_store(root / "b", num_parts=2, topk=3, with_text=True, with_reward=True, header=header)
    return a, b


def _manifest(root):
    return open_store(root).manifest


def _snapshot(root):
    """Every file of a directory with its bytes: proves a tool left a source untouched."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fails(*args):
    result = run_lopd(*args, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    return result.stderr


# ---------------------------------------------------------------------------------------------
# inspect --positions
# ---------------------------------------------------------------------------------------------


def test_inspect_positions_matches_a_naive_loop(micro_store):
    rows = json.loads(
        run_lopd("store", "inspect", micro_store, "--positions", "--bucket", 3, "--json").stdout
    )
    sums: dict[int, list[float]] = {}
    for row in read_table(micro_store).to_pylist():
        for pos, (t, b) in enumerate(zip(row["teacher_logprobs"], row["behavior_logprobs"])):
            s = sums.setdefault(pos // 3, [0, 0.0, 0.0])
            s[0], s[1], s[2] = s[0] + 1, s[1] + t, s[2] + b
    assert [r["start"] for r in rows] == [3 * i for i in range(len(sums))]
    for r, (_, (n, t, b)) in zip(rows, sorted(sums.items())):
        assert r["tokens"] == n
        assert r["mean_teacher_logprob"] == pytest.approx(t / n, rel=1e-6)
        assert r["mean_behavior_logprob"] == pytest.approx(b / n, rel=1e-6)
        assert r["mean_logratio"] == pytest.approx((t - b) / n, rel=1e-5, abs=1e-7)
    table = run_lopd("store", "inspect", micro_store, "--positions").stdout
    assert "teacher-behavior" in table.splitlines()[0] and table.splitlines()[1].split()[0].startswith("0-")


def test_position_stats_of_a_rollouts_store_has_no_teacher(tmp_path):
    root = write_store(tmp_path / "r", num_parts=1, kind="rollouts")
    rows = position_stats(root, bucket=10)
    assert sum(r["tokens"] for r in rows) == _manifest(root).stats.num_response_tokens
    assert all(r["mean_teacher_logprob"] is None and r["mean_logratio"] is None for r in rows)
    with pytest.raises(StoreError, match="got 0"):
        position_stats(root, bucket=0)


# ---------------------------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------------------------


def test_filter_writes_a_new_store_with_lineage(stores, tmp_path, store_cache):
    src = stores[0]
    before = _snapshot(src)
    out = tmp_path / "filtered"
    run_lopd("store", "filter", src, "--out", out, "--drop-truncated", "--min-length", 5)
    assert verify_store(out).ok
    expected = [
        r for r in read_table(src).to_pylist() if r["finish_reason"] == "stop" and len(r["response_ids"]) >= 5
    ]
    got = read_table(out).to_pylist()
    assert 0 < len(got) < _manifest(src).stats.num_rollouts
    assert got == expected  # same rows, same order, every column
    source, derived = _manifest(src), _manifest(out)
    assert derived.store_id != source.store_id
    assert fmt.identity_differences(source.header(), derived.header()) == ["prompt_set.content_hash"]
    assert derived.prompt_set["content_hash"].startswith(tools.DERIVED_HASH_PREFIX)
    assert derived.prompt_set["parent_content_hash"] == source.prompt_set["content_hash"]
    (entry,) = derived.extra[tools.LINEAGE_KEY]
    assert (
        entry["op"] == "filter" and entry["filter"]["drop_truncated"] and entry["filter"]["min_length"] == 5
    )
    (record,) = entry["sources"]
    assert record["store_id"] == source.store_id and record["path"] == str(src.resolve())
    assert record["manifest_sha256"] == tools.manifest_sha256(src)
    assert _snapshot(src) == before
    # Registered; the same filter of the same source is the same content: refused, then allowed.
    assert registry.find_existing(derived.store_id) == out.resolve()
    again = _fails("store", "filter", src, "--out", tmp_path / "again", "--drop-truncated", "--min-length", 5)
    assert str(out.resolve()) in again and "--allow-duplicate" in again
    run_lopd(
        "store",
        "filter",
        src,
        "--out",
        tmp_path / "again",
        "--drop-truncated",
        "--min-length",
        5,
        "--allow-duplicate",
    )
    assert _manifest(tmp_path / "again").store_id == derived.store_id


def test_filter_by_reward_repetition_and_finish_reason(stores, tmp_path):
    src = stores[0]
    rows = read_table(src).to_pylist()
    run_lopd("store", "filter", src, "--out", tmp_path / "r", "--min-reward", 1)
    assert read_table(tmp_path / "r").to_pylist() == [
        r for r in rows if r["reward"] is not None and r["reward"] >= 1
    ]
    run_lopd("store", "filter", src, "--out", tmp_path / "rep", "--drop-repetitive", "--drop-empty")
    kept = read_table(tmp_path / "rep").to_pylist()
    assert kept == [
        r for r in rows if r["response_ids"] and not diagnostics.is_repetitive(r["response_text"])
    ]
    assert len(kept) < len(rows) and _manifest(tmp_path / "rep").stats.rep_rate == 0.0
    run_lopd("store", "filter", src, "--out", tmp_path / "len", "--finish-reasons", "length")
    assert {r["finish_reason"] for r in read_table(tmp_path / "len").to_pylist()} == {"length"}
    # Different filters of one source are different stores.
    ids = {_manifest(tmp_path / name).store_id for name in ("r", "rep", "len")}
    assert len(ids) == 3


def test_filter_refusals(stores, tmp_path):
    src = stores[0]
    assert "keeps every rollout" in _fails("store", "filter", src, "--out", tmp_path / "x")
    bare = write_store(tmp_path / "bare", num_parts=1)
    assert "'reward' column" in _fails("store", "filter", bare, "--out", tmp_path / "y", "--min-reward", 0)
    assert "'response_text' column" in _fails(
        "store", "filter", bare, "--out", tmp_path / "y", "--drop-repetitive"
    )
    assert "got ('eos',)" in _fails(
        "store", "filter", src, "--out", tmp_path / "y", "--finish-reasons", "eos"
    )
    assert "keeps no finish reason" in _fails(
        "store", "filter", src, "--out", tmp_path / "y", "--finish-reasons", "length", "--drop-truncated"
    )
    assert not (tmp_path / "y").exists()


def test_interrupted_filter_resumes(stores, tmp_path, monkeypatch):
    from lightning_opd.store.writer import StoreWriter

    src, out = stores[0], tmp_path / "out"
    spec = tools.FilterSpec(drop_truncated=True)
    original = StoreWriter.write_part

    def crash_on_part_1(self, part, rows):
        if part == 1:
            raise KeyboardInterrupt
        return original(self, part, rows)

    monkeypatch.setattr(StoreWriter, "write_part", crash_on_part_1)
    with pytest.raises(KeyboardInterrupt):
        tools.filter_store(src, out, spec, log=lambda *_: None)
    monkeypatch.setattr(StoreWriter, "write_part", original)
    # An unfinished store of *another* command is not resumed, nor overwritten.
    with pytest.raises(StoreError, match="not empty"):
        tools.filter_store(src, out, tools.FilterSpec(min_length=3), log=lambda *_: None)
    logged = []
    tools.filter_store(src, out, spec, log=logged.append)
    assert "resuming" in logged[0] and "1 of 2 parts" in logged[0]
    tools.filter_store(src, tmp_path / "fresh", spec, log=lambda *_: None, allow_duplicate=True)
    assert read_table(out).to_pylist() == read_table(tmp_path / "fresh").to_pylist()
    assert verify_store(out).ok


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


def test_merge_concatenates_and_records_sources(stores, tmp_path):
    a, b = stores
    out = tmp_path / "merged"
    run_lopd("store", "merge", a, b, "--out", out)
    assert verify_store(out).ok
    merged, ma, mb = _manifest(out), _manifest(a), _manifest(b)
    assert merged.stats.num_rollouts == ma.stats.num_rollouts + mb.stats.num_rollouts
    assert merged.store_id not in (ma.store_id, mb.store_id)
    assert merged.sampling["seed"] == [0, 1] and merged.sampling["n"] == 4
    assert merged.horizon == ma.horizon and merged.topk == ma.topk and merged.teacher == ma.teacher
    rows, rows_a, rows_b = (read_table(x).to_pylist() for x in (out, a, b))
    # Same prompt set: b's samples come after a's (sample_index shifted by a's n) so keys stay unique.
    shifted_b = [{**r, "sample_index": r["sample_index"] + ma.sampling["n"]} for r in rows_b]
    assert rows == rows_a + shifted_b
    assert len({(r["prompt_id"], r["sample_index"]) for r in rows}) == len(rows)
    (entry,) = merged.extra[tools.LINEAGE_KEY]
    sources = entry["sources"]
    assert [s["store_id"] for s in sources] == [ma.store_id, mb.store_id]
    assert [s["parts"] for s in sources] == [[0, 2], [2, 4]]
    assert [s["sample_index_offset"] for s in sources] == [0, 2]
    assert sources[1]["sampling"]["seed"] == 1 and sources[0]["manifest_sha256"] == tools.manifest_sha256(a)
    # Stats of the merged store are those of the rows (recomputed by the writer, not copied).
    assert merged.stats.num_response_tokens == sum(len(r["response_ids"]) for r in rows)


def _variant(root, **overrides):
    """A one-part scored top-3 store whose header differs from the shared one by ``overrides``."""
    header = make_header(topk=overrides.pop("topk_k", 3))
    for dotted, value in overrides.items():
        section, _, key = dotted.partition("__")
        if key:
            header[section] = {**header[section], key: value}
        else:
            header[section] = value
    if header["horizon"] != header["sampling"]["max_new_tokens"]:
        header["sampling"]["max_new_tokens"] = header["horizon"]
    return write_store(
        root, num_parts=1, topk=fmt.topk_of(header), header=header, with_text=True, with_reward=True
    )


@pytest.mark.parametrize(
    "overrides, field, values",
    [
        ({"teacher__fingerprint": "u" * 64}, "teacher.fingerprint", ("'tttt", "'uuuu")),
        ({"teacher__tokenizer_fingerprint": "j" * 64}, "teacher.tokenizer_fingerprint", ("'kkkk", "'jjjj")),
        ({"student__tokenizer_fingerprint": "j" * 64}, "student.tokenizer_fingerprint", ("'kkkk", "'jjjj")),
        ({"topk": {"k": 2, "tail_treatment": "tail_bucket"}}, "topk.k", ("has 3", "has 2")),
        ({"topk__tail_treatment": "renormalize"}, "topk.tail_treatment", ("'tail_bucket'", "'renormalize'")),
        ({"horizon": 40}, "horizon", ("has 48", "has 40")),
        ({"sampling__temperature": 1.0}, "sampling.temperature", ("has 0.7", "has 1.0")),
    ],
)
def test_merge_refuses_incompatible_stores(stores, tmp_path, overrides, field, values):
    if "topk" in overrides:
        overrides = {**overrides, "topk_k": overrides["topk"]["k"]}
    other = _variant(tmp_path / "other", **overrides)
    message = _fails("store", "merge", stores[0], other, "--out", tmp_path / "m")
    assert f"{field} differs" in message and all(v in message for v in values), message
    assert not (tmp_path / "m").exists()


def test_merge_refuses_other_kind_version_columns_and_duplicates(stores, tmp_path):
    a = stores[0]
    rollouts = write_store(tmp_path / "rollouts", num_parts=1, kind="rollouts")
    assert "'rollouts' store" in _fails("store", "merge", a, rollouts, "--out", tmp_path / "m")
    no_text = write_store(
        tmp_path / "no_text", num_parts=1, topk=3, with_reward=True, header=make_header(topk=3)
    )
    assert "columns differs" in _fails("store", "merge", a, no_text, "--out", tmp_path / "m")
    future = tmp_path / "future"
    shutil.copytree(a, future)
    data = json.loads((future / fmt.MANIFEST_FILE).read_text())
    (future / fmt.MANIFEST_FILE).write_text(json.dumps({**data, "format_version": "2.0"}))
    assert "format 2.0" in _fails("store", "merge", a, future, "--out", tmp_path / "m")
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    assert "same content" in _fails("store", "merge", a, copy, "--out", tmp_path / "m")
    assert "at least two" in _fails("store", "merge", a, "--out", tmp_path / "m")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# No tool writes into a source or over data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["filter", "merge", "export-hf", "export-parquet"])
def test_tools_never_write_in_place_or_over_data(stores, tmp_path, tool):
    a, b = stores
    before = _snapshot(a)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")

    def command(dst):
        if tool == "filter":
            return ("store", "filter", a, "--out", dst, "--drop-empty")
        if tool == "merge":
            return ("store", "merge", b, a, "--out", dst)
        return ("store", "export", a, "--to", tool.split("-")[1], dst)

    assert "is the source store" in _fails(*command(a))
    assert "inside the source store" in _fails(*command(a / "data" / "derived"))
    assert "not empty" in _fails(*command(full))
    assert _snapshot(a) == before and (full / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def test_export_parquet_is_plain_and_complete(stores, tmp_path):
    src, out = stores[0], tmp_path / "export"
    run_lopd("store", "export", src, "--to", "parquet", out)
    files = sorted(out.glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-{i:06d}.parquet" for i in range(2)]
    table = pq.read_table(files).replace_schema_metadata(None)  # no store code needed to read it
    assert table.to_pylist() == read_table(src).to_pylist()
    meta = pq.ParquetFile(files[0]).metadata.row_group(0)
    assert not any("BYTE_STREAM_SPLIT" in meta.column(i).encodings for i in range(meta.num_columns))
    assert json.loads((out / tools.EXPORT_MANIFEST).read_text()) == _manifest(src).to_dict()
    readme = (out / "README.md").read_text()
    assert _manifest(src).store_id[:12] in readme and "| `teacher_topk_logprobs` |" in readme
    import polars as pl

    assert pl.scan_parquet(str(out / "part-*.parquet")).select(pl.len()).collect().item() == len(table)


def test_export_hf_round_trips(stores, tmp_path):
    import datasets

    src, out = stores[0], tmp_path / "hf"
    run_lopd("store", "export", src, "--to", "hf", out)
    dataset = datasets.load_from_disk(str(out))
    expected = read_table(src).to_pylist()
    assert dataset.num_rows == len(expected) and dataset.column_names == _manifest(src).columns
    for i in (0, len(expected) - 1):
        got, want = dataset[i], expected[i]
        assert got["prompt_id"] == want["prompt_id"] and got["response_ids"] == want["response_ids"]
        np.testing.assert_allclose(got["teacher_logprobs"], want["teacher_logprobs"], rtol=0)
        np.testing.assert_allclose(
            np.asarray(got["teacher_topk_logprobs"]).reshape(-1),
            np.asarray(want["teacher_topk_logprobs"]).reshape(-1),
        )
    assert json.loads((out / tools.EXPORT_MANIFEST).read_text())["store_id"] == _manifest(src).store_id
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # the temporary Arrow cache is gone


# ---------------------------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------------------------


def test_diff_shows_what_differs(stores):
    a, b = stores
    out = run_lopd("store", "diff", a, b).stdout
    lines = {
        line.split()[1] if line.startswith("*") else line.split()[0]: line for line in out.splitlines()[3:]
    }
    assert lines["sampling.seed"].startswith("* ") and lines["store_id"].split()[1:] == [
        _manifest(a).store_id[:39] + "…",
        _manifest(b).store_id[:39] + "…",
    ]
    assert "teacher.fingerprint" not in lines and "stats.num_rollouts" not in lines
    everything = json.loads(run_lopd("store", "diff", a, b, "--all", "--json").stdout)
    by_field = {row["field"]: row for row in everything}
    assert by_field["teacher.fingerprint"]["a"] == by_field["teacher.fingerprint"]["b"]
    assert by_field["sampling.seed"] == {"field": "sampling.seed", "a": 0, "b": 1, "identity": True}
    assert by_field["stats.trunc_rate"]["identity"] is False
    assert "0 of" in run_lopd("store", "diff", a, a).stdout.splitlines()[2]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_register_find_list_and_stale_entries(stores, tmp_path, store_cache):
    a = tmp_path / "a"
    shutil.copytree(stores[0], a)
    store_id = _manifest(a).store_id
    assert registry.find_existing(store_id) is None and registry.list_stores() == []
    entry = registry.register(a)
    assert (store_cache / f"{store_id}.json").is_file() and entry.path == str(a.resolve())
    assert registry.find_existing(store_id) == a.resolve()
    assert entry.summary["rows"] == _manifest(a).stats.num_rollouts and entry.summary["topk"] == 3
    listed = run_lopd("store", "list").stdout
    assert store_id[:12] in listed and " ok " in listed and str(a.resolve()) in listed
    # A store moved away leaves a stale entry: never returned, shown as stale.
    moved = tmp_path / "moved"
    shutil.move(a, moved)
    assert registry.find_existing(store_id) is None
    assert [e.valid for e in registry.list_stores()] == [False]
    assert "stale" in run_lopd("store", "list").stdout
    run_lopd("store", "register", moved)
    assert registry.find_existing(store_id) == moved.resolve()  # the newest copy wins
    # --cache overrides the environment.
    other = tmp_path / "other-index"
    assert "no stores registered" in run_lopd("store", "list", "--cache", other).stdout
    registry.register(moved, other)
    assert json.loads(run_lopd("store", "list", "--cache", other, "--json").stdout)[0]["store_id"] == store_id


def test_check_not_duplicate(stores, tmp_path):
    a = stores[0]
    store_id = _manifest(a).store_id
    registry.check_not_duplicate(store_id, tmp_path / "new")  # nothing registered yet
    registry.register(a)
    registry.check_not_duplicate(store_id, a)  # writing into the same store: a resume
    with pytest.raises(StoreError) as error:
        registry.check_not_duplicate(store_id, tmp_path / "new")
    message = str(error.value)
    assert str(a.resolve()) in message and "--allow-duplicate" in message and "--stores" in message
    registry.check_not_duplicate("0" * 64, tmp_path / "new")  # another id is fine
    with pytest.raises(StoreError, match="64 lowercase hex"):
        registry.find_existing("../../etc/passwd")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert registry.cache_dir_path() == tmp_path / ".cache" / "lightning-opd" / "stores"
    assert registry.cache_dir_path(tmp_path / "x") == tmp_path / "x"


# ---------------------------------------------------------------------------------------------
# Token-level histogram
# ---------------------------------------------------------------------------------------------


def test_logratio_histogram_matches_numpy(stores):
    rows = read_table(stores[0]).to_pylist()
    ratios = np.concatenate(
        [
            np.asarray(r["teacher_logprobs"], np.float64) - np.asarray(r["behavior_logprobs"], np.float64)
            for r in rows
        ]
    )
    edges = (-1.0, -0.5, 0.0, 0.5, 1.0)
    hist = tools.logratio_histogram(stores[0], edges)
    expected, _ = np.histogram(np.clip(ratios, -1.0, 1.0), bins=edges)
    assert hist.counts == expected.tolist() and hist.total == len(ratios) == sum(hist.counts)
    assert hist.below == int((ratios < -1).sum()) and hist.above == int((ratios > 1).sum())
    assert hist.mean == pytest.approx(ratios.mean())
    assert Counter(hist.counts) != Counter([0] * 4)  # not trivially empty
