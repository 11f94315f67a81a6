"""The opt-in compact log-prob encoding (format 1.2): 16-bit fixed point, decoded transparently;
and its opt-in compact top-k (format 1.3): sorted ids as gaps, coarser top-k log-probs.

The codecs are pinned against naive per-value / per-position references; stores are checked end to
end: a compact store verifies, reads back within the stated error, goes through filter/merge/export,
refuses to be mixed with float32 parts, is written by `lopd precompute --compact-logprobs` and
trains; stores of older minors (no encoding) keep their ids and read as before; a 1.2 reader
refuses a compact top-k store.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import precompute_config
from test_store_common import make_header, make_rows, read_table, rewrite_shard, write_store

from lightning_opd.errors import StoreError
from lightning_opd.models.fingerprint import model_fingerprint
from lightning_opd.store import StoreWriter, open_store, tools
from lightning_opd.store.summary import summarize_store
from lightning_opd.store.verify import verify_store
from pipelines import precompute, train
from storage_schemas import logprob_store_v1 as fmt
from storage_schemas.logprob_store_v1.encoding import _delta_decode, _delta_encode
from storage_schemas.logprob_store_v1.header import _get_dotted

QUIET = {"log": lambda *_: None}


def _naive_encode_decode(x: float, scale: int) -> float:
    code = round(-float(x) * scale)  # both round halves to even, like np.rint
    code = min(max(code, 0), 2**16 - 1)
    return -code / scale


def _leaves(column) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_list(column.type):
        column = pc.list_flatten(column)
    return column.to_numpy()


def test_codec_matches_a_naive_encode_decode_and_keeps_the_stated_bound():
    encoding = fmt.fixed16_encoding()
    assert encoding["scale"] == 2048 and encoding["max_abs_error"] == 1 / 4096
    assert encoding["min_logprob"] == -65535 / 2048
    rng = np.random.default_rng(0)
    inside = np.concatenate(
        [
            -rng.exponential(2.0, 20000),  # most log-probs sit near 0
            -rng.uniform(0, 31.99, 20000),
            [0.0, -0.0, 5e-5, 1e-4, -1 / 4096, -3 / 4096, encoding["min_logprob"], -31.9997],
        ]
    ).astype(np.float32)
    inside = inside[inside >= -31.9997]
    decoded = fmt.decode_logprobs(fmt.encode_logprobs(inside))
    assert decoded.dtype == np.float32
    naive = np.array([_naive_encode_decode(x, 2048) for x in inside], dtype=np.float32)
    np.testing.assert_array_equal(decoded, naive)
    error = np.abs(decoded.astype(np.float64) - inside.astype(np.float64))
    assert error.max() <= encoding["max_abs_error"] + 1e-12
    assert error.max() > 0.9 * encoding["max_abs_error"]  # the bound is tight, not loose
    below = np.array([-32.0, -40.0, -1e4], dtype=np.float32)
    assert (fmt.decode_logprobs(fmt.encode_logprobs(below)) == np.float32(encoding["min_logprob"])).all()
    # The top-k difference transform inverts exactly, also across empty lists, unsorted ranks and
    # wrap-around (a later rank more likely than the one before it).
    codes = np.array([5, 9, 2, 65535, 0, 7, 7, 1], dtype=np.uint16)
    offsets = np.array([0, 3, 3, 5, 8])
    deltas = _delta_encode(codes, offsets)
    assert deltas.tolist() == [5, 4, (2 - 9) % 2**16, 65535, 1, 7, 0, (1 - 7) % 2**16]
    np.testing.assert_array_equal(_delta_decode(deltas, offsets), codes)
    table = pa.table({"teacher_logprobs": pa.array([[-1.0, -33.0], [-50.0]], pa.list_(pa.float32()))})
    assert fmt.count_clamped(table, encoding) == 2


def test_encoding_section_is_validated():
    assert fmt.encoding_problems(None) == []
    assert fmt.encoding_problems(fmt.fixed16_encoding()) == []
    assert fmt.encoding_problems(fmt.fixed16_encoding(1024)) == []
    assert "power of two" in fmt.encoding_problems({**fmt.fixed16_encoding(), "scale": 1000})[0]
    assert "pip install -U lightning-opd" in fmt.encoding_problems({"logprobs": "float8"})[0]
    edited = {**fmt.fixed16_encoding(), "max_abs_error": 1e-9}
    assert "edited by hand" in fmt.encoding_problems(edited)[0]
    assert fmt.encoding_problems(fmt.fixed16_encoding(topk_scale=32)) == []
    assert (
        "topk_scale must be a power of two" in fmt.encoding_problems(fmt.fixed16_encoding(topk_scale=48))[0]
    )
    assert "<= scale 2048" in fmt.encoding_problems(fmt.fixed16_encoding(topk_scale=4096))[0]
    edited = {**fmt.fixed16_encoding(topk_scale=32), "topk_max_abs_error": 1e-9}
    assert "edited by hand" in fmt.encoding_problems(edited)[0]


def test_a_header_without_encoding_keeps_its_store_id():
    # The id of a 1.0/1.1 header: sha256 of its identity fields only (what those versions computed).
    header = make_header(topk=2)
    old = {name: _get_dotted(header, name) for name in fmt.IDENTITY_FIELDS}
    expected = hashlib.sha256(
        json.dumps(old, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    ).hexdigest()
    assert fmt.compute_store_id(header) == expected
    assert fmt.compute_store_id({**header, "encoding": None}) == expected
    compact = {**header, "encoding": fmt.fixed16_encoding()}
    assert fmt.compute_store_id(compact) != expected
    assert fmt.identity_differences(header, compact) == ["encoding"]


def test_compact_store_verifies_and_reads_back_within_the_bound(tmp_path):
    src = write_store(tmp_path / "src", num_parts=2, topk=2, with_sampling=True, with_reward=True)
    dst = tmp_path / "compact"
    manifest = tools.compact_store(src, dst, **QUIET)
    assert manifest.format_version == fmt.FORMAT_VERSION == "1.4"  # written by 1.4; 1.2 reads it (a warning)
    assert manifest.encoding == fmt.fixed16_encoding()
    assert json.loads((dst / fmt.MANIFEST_FILE).read_text())["encoding"]["max_abs_error"] == 1 / 4096
    assert manifest.extra[fmt.LINEAGE_KEY][0]["op"] == "compact"
    report = verify_store(dst)
    assert report.ok and report.warnings == [], report.format()
    on_disk = pq.read_schema(dst / fmt.shard_file(0))
    assert on_disk.field("teacher_logprobs").type.value_type == pa.uint16()
    assert on_disk.field("teacher_topk_logprobs").type.value_type.value_type == pa.uint16()
    assert sum(s.bytes for s in manifest.shards) < sum(s.bytes for s in open_store(src).manifest.shards)

    before, after = read_table(src), read_table(dst)
    assert after.schema.equals(before.schema)  # readers hand out float32 whatever the encoding
    for name in before.column_names:
        if name in fmt.LOGPROB_COLUMNS:
            exact, decoded = _leaves(before.column(name)), _leaves(after.column(name))
            naive = np.array([_naive_encode_decode(x, 2048) for x in exact], dtype=np.float32)
            np.testing.assert_array_equal(decoded, naive)
            assert np.abs(decoded - exact).max() <= 1 / 4096
        else:
            assert after.column(name).equals(before.column(name)), name
    # On disk, each position's top-k codes are rank 1's code, then differences from the previous rank.
    raw = _leaves(pq.read_table(dst / fmt.shard_file(0)).column("teacher_topk_logprobs")).reshape(-1, 2)
    first_part = _leaves(pq.read_table(src / fmt.shard_file(0)).column("teacher_topk_logprobs")).reshape(
        -1, 2
    )
    codes = np.array([[round(-float(x) * 2048) for x in position] for position in first_part])
    assert (raw[:, 0] == codes[:, 0]).all() and (raw[:, 1] == (codes[:, 1] - codes[:, 0]) % 2**16).all()
    row = next(open_store(dst).iter_rows())
    assert row["teacher_topk_logprobs"].dtype == np.float32 and row["teacher_topk_logprobs"].shape[1] == 2

    assert summarize_store(dst)["logprob_encoding"].startswith("fixed16 (max error 0.000244")
    assert summarize_store(src)["logprob_encoding"] == "float32"
    scale = next(r for r in tools.diff_stores(src, dst) if r.field == "encoding.scale")
    assert (scale.a, scale.b, scale.identity) == (None, 2048, True)

    with pytest.raises(StoreError, match="already compact"):
        tools.compact_store(dst, tmp_path / "again", **QUIET)


def test_compact_stores_through_filter_merge_and_export(tmp_path):
    a = write_store(tmp_path / "a", num_parts=2, topk=2, with_reward=True)
    header = make_header(topk=2)
    header["sampling"]["seed"] = 1
    b = write_store(tmp_path / "b", num_parts=1, topk=2, with_reward=True, header=header)
    ca, cb = tmp_path / "ca", tmp_path / "cb"
    tools.compact_store(a, ca, **QUIET)
    tools.compact_store(b, cb, **QUIET)

    filtered = tmp_path / "filtered"
    tools.filter_store(ca, filtered, tools.FilterSpec(min_length=10), **QUIET)
    assert open_store(filtered).manifest.encoding == fmt.fixed16_encoding() and verify_store(filtered).ok
    kept = read_table(filtered).to_pylist()
    assert kept == [r for r in read_table(ca).to_pylist() if len(r["response_ids"]) >= 10]  # no re-rounding

    merged = tmp_path / "merged"
    tools.merge_stores([ca, cb], merged, **QUIET)
    assert verify_store(merged).ok and open_store(merged).manifest.encoding is not None
    with pytest.raises(StoreError, match="encoding differs"):
        tools.merge_stores([ca, b], tmp_path / "mixed", **QUIET)

    exported = tmp_path / "export"
    tools.export_parquet(ca, exported, **QUIET)
    plain = pq.read_table(sorted(exported.glob("part-*.parquet"))[0])
    assert plain.schema.field("teacher_logprobs").type.value_type == pa.float32()
    assert (
        plain.column("teacher_logprobs").to_pylist()
        == read_table(ca).slice(0, plain.num_rows).column("teacher_logprobs").to_pylist()
    )
    with pytest.raises(StoreError, match="--to parquet"):
        tools.export_hf(ca, tmp_path / "hf", **QUIET)


def test_compact_and_float32_parts_never_mix(tmp_path):
    root = tmp_path / "s"
    header = make_header(topk=2)
    writer = StoreWriter(root, header, num_parts=2, topk=2)
    writer.write_part(0, make_rows(0, topk=2))
    with pytest.raises(StoreError, match="differs in.*encoding"):
        StoreWriter(root, {**header, "encoding": fmt.fixed16_encoding()}, num_parts=2, topk=2)

    # A float32 shard swapped into a compact store fails verify (schema), and reading it is refused.
    compact = tmp_path / "c"
    tools.compact_store(write_store(tmp_path / "f", num_parts=2, topk=2), compact, **QUIET)
    float_table = pq.read_table(tmp_path / "f" / fmt.shard_file(1))
    rewrite_shard(compact / fmt.shard_file(1), float_table)
    report = verify_store(compact)
    assert not report.ok and any("schema differs" in p for p in report.problems), report.format()


def test_a_format_1_1_store_still_reads(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(fmt, "FORMAT_VERSION", "1.1")
        m.setattr(fmt.layout, "FORMAT_VERSION", "1.1")
        root = write_store(tmp_path / "old", num_parts=2, topk=2, with_sampling=True)
    path = root / fmt.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    assert manifest.pop("encoding") is None  # what a 1.1 writer wrote: no such key
    path.write_text(json.dumps(manifest))
    store = open_store(root)
    assert store.manifest.format_version == "1.1" and store.manifest.encoding is None
    assert verify_store(root).ok
    assert read_table(root).schema.field("teacher_logprobs").type.value_type == pa.float32()
    compact = tmp_path / "compact"
    tools.compact_store(root, compact, **QUIET)  # an old store converts like a new one
    assert verify_store(compact).ok


def test_precompute_compact_logprobs_writes_a_compact_store_that_trains(
    micro_store, sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path
):
    out = tmp_path / "compact"
    config = precompute_config(
        sft_student_dir, micro_teacher_dir, opd_prompts, out, topk=3, compact_logprobs=True
    )
    precompute.run(config, **QUIET)
    store = open_store(out)
    assert store.manifest.encoding == fmt.fixed16_encoding()
    assert store.store_id != open_store(micro_store).store_id
    assert verify_store(out).ok
    # Same seed, same models: the same rollouts; every log-prob within the stated error of micro_store's.
    exact, compact = read_table(micro_store), read_table(out)
    assert compact.column("response_ids").equals(exact.column("response_ids"))
    for name in fmt.LOGPROB_COLUMNS:
        if name in exact.column_names:
            error = np.abs(_leaves(compact.column(name)) - _leaves(exact.column(name)))
            assert error.max() <= store.manifest.encoding["max_abs_error"] + 1e-7, name
    run = tmp_path / "train"
    train.run(
        train.TrainConfig(
            student=str(sft_student_dir), stores=str(out), out=str(run), steps=2, batch_size=4,
            micro_batch_size=2, lr=1e-3, shuffle_buffer=8, seed=0,
        ),
        **QUIET,
    )  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# ---------------------------------------------------------------------------------------------
# Compact top-k (format 1.3)
# ---------------------------------------------------------------------------------------------

# The encoding section a 1.2 release accepts, verbatim: its check is `encoding == fixed16_encoding(scale)`.
ENCODING_1_2 = {
    "logprobs": "fixed16",
    "scale": 2048,
    "min_logprob": -65535 / 2048,
    "max_abs_error": 1 / 4096,
    "below_min": "clamped to min_logprob",
    "teacher_topk_logprobs": "per position: rank 1's code, then differences from the previous rank mod 2^16",
}


def _naive_topk(ids: list[int], logprobs: list[float], topk_scale: int) -> tuple[list[int], list[float]]:
    """One position through the compact top-k, written out: the (id, log-prob) pairs rounded to the
    topk_scale grid, in decreasing log-prob order, ties by increasing id."""
    pairs = [(-round(-float(x) * topk_scale) / topk_scale, int(i)) for i, x in zip(ids, logprobs)]
    pairs.sort(key=lambda p: (-p[0], p[1]))
    return [i for _, i in pairs], [x for x, _ in pairs]


def _topk_table(rows: list[list[tuple[list[int], list[float]]] | None]) -> pa.Table:
    ids = [None if r is None else [p[0] for p in r] for r in rows]
    lps = [None if r is None else [p[1] for p in r] for r in rows]
    return pa.table(
        {
            "teacher_topk_ids": pa.array(ids, fmt.list_of(fmt.list_of(pa.int32()))),
            "teacher_topk_logprobs": pa.array(lps, fmt.list_of(fmt.list_of(pa.float32()))),
        }
    )


def test_compact_topk_codec_matches_a_naive_reference_and_keeps_the_bound():
    encoding = fmt.fixed16_encoding(topk_scale=32)
    assert encoding["topk_max_abs_error"] == 1 / 64 and {**encoding, **ENCODING_1_2} != encoding
    rng = np.random.default_rng(0)
    rows = []
    for r in range(40):
        if r == 3:
            rows.append(None)  # a null row (what a 'rollouts' table holds)
            continue
        positions = []
        for _ in range(int(rng.integers(0, 6))):  # some rows have no positions
            k = 5
            ids = rng.choice(262144, k, replace=False).tolist()
            logprobs = (-np.sort(rng.exponential(3.0, k))).tolist()
            if rng.random() < 0.3:
                logprobs[2] = logprobs[1] - 0.001  # codes that tie: only their order is not kept
            positions.append((ids, logprobs))
        rows.append(positions)
    table = _topk_table(rows)
    stored = fmt.encode_table(table, encoding)
    # On disk: ascending ids as first id + gaps, codes at topk_scale in that id order.
    first = next(p for r in rows if r for p in r)
    order = np.argsort(first[0])
    disk_ids, disk_codes = stored.column(0)[0].as_py()[0], stored.column(1)[0].as_py()[0]
    assert np.cumsum(disk_ids).tolist() == np.sort(first[0]).tolist() and min(disk_ids[1:]) > 0
    assert disk_codes == [round(-np.float32(first[1][j]) * 32) for j in order]
    for data in (
        stored,
        stored.to_batches()[0].slice(5, 20),
        pa.concat_tables([stored.slice(0, 7), stored.slice(7)]),
    ):
        decoded = fmt.decode_batch(data, encoding)
        assert decoded.schema.equals(table.schema)
        start = 5 if data.num_rows == 20 else 0
        for row, ids, lps in zip(
            rows[start : start + data.num_rows],
            decoded.column(0).to_pylist(),
            decoded.column(1).to_pylist(),
        ):
            if row is None:
                assert ids is None and lps is None
                continue
            for (exact_ids, exact_lps), got_ids, got_lps in zip(row, ids, lps):
                f32 = np.float32(exact_lps).tolist()
                assert (got_ids, got_lps) == _naive_topk(exact_ids, f32, 32)
                by_id = dict(zip(exact_ids, f32))
                assert max(abs(x - by_id[i]) for i, x in zip(got_ids, got_lps)) <= 1 / 64
    assert fmt.count_clamped(_topk_table([[([1], [-2500.0])]]), encoding) == 1  # below -2047.97


def test_compact_topk_store_reads_back_within_the_bound(tmp_path):
    src = write_store(tmp_path / "src", num_parts=2, topk=4, with_sampling=True, with_reward=True)
    dst = tmp_path / "compact"
    manifest = tools.compact_store(src, dst, topk_scale=32, **QUIET)
    assert manifest.format_version == fmt.FORMAT_VERSION == "1.4"
    on_disk = json.loads((dst / fmt.MANIFEST_FILE).read_text())["encoding"]
    assert on_disk == fmt.fixed16_encoding(topk_scale=32)
    assert (on_disk["topk_scale"], on_disk["topk_max_abs_error"], on_disk["max_abs_error"]) == (
        32,
        1 / 64,
        1 / 4096,
    )
    report = verify_store(dst)
    assert report.ok and report.warnings == [], report.format()
    assert "top-k sorted by id, max error 0.0156" in summarize_store(dst)["logprob_encoding"]

    before, after = read_table(src), read_table(dst)
    tools.compact_store(src, tmp_path / "plain", **QUIET)
    plain = read_table(tmp_path / "plain")
    assert after.schema.equals(before.schema)
    for name in before.column_names:
        if name not in fmt.TOPK_COLUMNS:  # everything else exactly as the 1.2 compact store
            assert after.column(name).equals(plain.column(name)), name
    for exact_ids, exact_lps, got_ids, got_lps in zip(
        *(t.column(c).to_pylist() for t in (before, after) for c in fmt.TOPK_COLUMNS)
    ):
        for e_ids, e_lps, g_ids, g_lps in zip(exact_ids, exact_lps, got_ids, got_lps):
            assert (g_ids, g_lps) == _naive_topk(e_ids, e_lps, 32)
            assert np.abs(np.sort(g_lps) - np.sort(e_lps)).max() <= 1 / 64

    store = open_store(dst)
    for columns in (["teacher_topk_ids"], ["teacher_topk_logprobs", "prompt_id"]):
        part = pa.Table.from_batches(list(store.iter_batches(columns)))
        assert part.column_names == columns  # a top-k column alone still decodes (its partner is read too)
        for c in columns:
            assert part.column(c).equals(after.column(c)), c
    from lightning_opd.store.reader import read_part

    assert (
        read_part(dst, 1, columns=["teacher_topk_ids"])
        .column(0)
        .equals(pa.Table.from_batches(list(store.iter_batches(["teacher_topk_ids"], shards=[1]))).column(0))
    )

    filtered = tmp_path / "filtered"
    tools.filter_store(dst, filtered, tools.FilterSpec(min_length=10), **QUIET)
    assert open_store(filtered).manifest.encoding == on_disk and verify_store(filtered).ok
    kept = read_table(filtered).to_pylist()
    assert kept == [r for r in after.to_pylist() if len(r["response_ids"]) >= 10]  # no re-rounding

    with pytest.raises(StoreError, match="no top-k columns"):
        tools.compact_store(
            write_store(tmp_path / "nok", num_parts=1), tmp_path / "x", topk_scale=32, **QUIET
        )
    with pytest.raises(StoreError, match="power of two"):
        tools.compact_store(src, tmp_path / "y", topk_scale=48, **QUIET)


def test_a_1_2_reader_refuses_a_compact_topk_store_and_reads_the_rest(tmp_path, monkeypatch):
    # What 1.3 writes without --topk-scale is exactly 1.2's section, so 1.2 reads it (newer minor: a warning).
    assert fmt.fixed16_encoding() == ENCODING_1_2
    src = write_store(tmp_path / "src", num_parts=1, topk=2)
    dst = tmp_path / "compact"
    tools.compact_store(src, dst, topk_scale=32, **QUIET)
    # A 1.2 release: format 1.2, and its encoding check accepts only its own section.
    monkeypatch.setattr(fmt, "FORMAT_VERSION", "1.2")
    monkeypatch.setattr(fmt.layout, "FORMAT_VERSION", "1.2")
    monkeypatch.setattr(fmt, "fixed16_encoding", lambda scale=2048, topk_scale=None: dict(ENCODING_1_2))
    monkeypatch.setattr(
        fmt.encoding, "fixed16_encoding", lambda scale=2048, topk_scale=None: dict(ENCODING_1_2)
    )
    with pytest.warns(UserWarning, match="newer than 1.2"), pytest.raises(StoreError, match="encoding"):
        open_store(dst)
    plain = tmp_path / "plain"
    monkeypatch.undo()
    tools.compact_store(src, plain, **QUIET)
    monkeypatch.setattr(fmt, "FORMAT_VERSION", "1.2")
    monkeypatch.setattr(fmt.layout, "FORMAT_VERSION", "1.2")
    monkeypatch.setattr(fmt, "fixed16_encoding", lambda scale=2048, topk_scale=None: dict(ENCODING_1_2))
    monkeypatch.setattr(
        fmt.encoding, "fixed16_encoding", lambda scale=2048, topk_scale=None: dict(ENCODING_1_2)
    )
    with pytest.warns(UserWarning, match="newer than 1.2"):
        assert open_store(plain).manifest.encoding == ENCODING_1_2


def test_precompute_compact_topk_writes_a_store_the_topk_objective_trains_on(
    micro_store, sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path
):
    from lightning_opd.errors import ConfigError

    with pytest.raises(ConfigError, match="needs --topk"):
        precompute_config(
            sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "x", compact_topk_scale=32
        )
    with pytest.raises(ConfigError, match="--compact-topk-scale: .*power of two"):
        precompute_config(
            sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path / "x", topk=3, compact_topk_scale=48
        )
    out = tmp_path / "compact-topk"
    config = precompute_config(
        sft_student_dir, micro_teacher_dir, opd_prompts, out, topk=3, compact_topk_scale=32
    )
    precompute.run(config, **QUIET)
    store = open_store(out)
    assert store.manifest.encoding == fmt.fixed16_encoding(topk_scale=32) and verify_store(out).ok
    # Same rollouts as micro_store; each position's top-k pairs within 1/64 nats, in decreasing order.
    exact, compact = read_table(micro_store), read_table(out)
    assert compact.column("response_ids").equals(exact.column("response_ids"))
    for e_ids, e_lps, c_ids, c_lps in zip(
        *(t.column(c).to_pylist() for t in (exact, compact) for c in fmt.TOPK_COLUMNS)
    ):
        for pos in zip(e_ids, e_lps, c_ids, c_lps):
            assert sorted(pos[0]) == sorted(pos[2]) and pos[3] == sorted(pos[3], reverse=True)
            by_id = dict(zip(pos[0], pos[1]))
            assert max(abs(x - by_id[i]) for i, x in zip(pos[2], pos[3])) <= 1 / 64 + 1e-7
    run = tmp_path / "train"
    train.run(
        train.TrainConfig(
            student=str(sft_student_dir), stores=str(out), out=str(run), steps=2, batch_size=4,
            micro_batch_size=2, lr=1e-3, shuffle_buffer=8, seed=0, objective="topk",
        ),
        **QUIET,
    )  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # The tail-bucket treatment is ill-conditioned on coarse top-k log-probs: stage two says so.
    bucket = train.TrainConfig(
        student=str(sft_student_dir), stores=str(out), out=str(tmp_path / "t"), objective="topk",
        topk_tail="tail_bucket",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="tail_bucket on a compact top-k store"):
        train.open_stores(bucket, model_fingerprint(sft_student_dir))
