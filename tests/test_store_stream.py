"""RolloutStream: epochs, shuffling, filters, mixing by weight, bounded memory (rows and bytes), one
process's share of the rows, and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_store_common import make_header, write_store

from lightning_opd.errors import ConfigError, StoreError, TrainingError
from lightning_opd.store.arrow import batch_to_rows
from lightning_opd.store.reader import open_store
from lightning_opd.store.shuffle import ROW_OVERHEAD_BYTES, row_nbytes, shuffle_order
from lightning_opd.store.stream import RolloutStream, RowFilter
from storage_schemas.logprob_store_v1 import TEXT_COLUMN


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    a = write_store(base / "a", num_parts=4, with_text=True, with_reward=True)
    header = make_header()
    b = write_store(
        base / "b",
        num_parts=2,
        header=make_header(sampling={**header["sampling"], "seed": 1}),
        with_reward=True,
    )
    return a, b


def _key(row):
    return (row["store_index"], row["prompt_id"], row["sample_index"])


def _take(stream, n):
    return [_key(next(stream)) for _ in range(n)]


def test_epochs_cover_every_kept_row_once_and_reshuffle(stores):
    a, _ = stores
    store = open_store(a)
    kept = [(0, r["prompt_id"], r["sample_index"]) for r in store.iter_rows() if len(r["response_ids"]) > 0]
    stream = RolloutStream(a, shuffle_buffer=8, seed=3, columns=["prompt_id", "sample_index", "response_ids"])
    epoch0 = _take(stream, len(kept))
    epoch1 = _take(stream, len(kept))
    assert sorted(epoch0) == sorted(kept) == sorted(epoch1)
    assert epoch0 != epoch1 and epoch0 != kept  # shuffled, and differently per epoch
    assert stream.epochs == [1]
    counters = stream.epoch_counters()[0][0]
    assert counters["rows_read"] == store.num_rows
    assert counters["rows_emitted"] == len(kept)
    assert counters["dropped"]["empty"] == store.num_rows - len(kept)
    again = RolloutStream(a, shuffle_buffer=8, seed=3, columns=["prompt_id", "sample_index", "response_ids"])
    assert _take(again, len(kept)) == epoch0  # same seed, same order
    other = RolloutStream(a, shuffle_buffer=8, seed=4, columns=["prompt_id", "sample_index", "response_ids"])
    assert _take(other, len(kept)) != epoch0


def test_rows_carry_requested_columns_only(stores):
    a, _ = stores
    row = next(
        RolloutStream(a, columns=["response_ids", "teacher_logprobs"], row_filter=RowFilter(min_reward=0.5))
    )
    assert sorted(row) == ["response_ids", "store_index", "teacher_logprobs"]


def test_filters(stores):
    a, _ = stores
    rows = list(open_store(a).iter_rows())

    def emitted(row_filter):
        stream = RolloutStream(a, row_filter=row_filter, shuffle_buffer=4)
        out = []
        while stream.epochs == [0]:
            out.append(next(stream))
        return out[:-1]  # the last row taken belongs to epoch 1

    stop_only = emitted(RowFilter(finish_reasons=("stop",)))
    assert len(stop_only) == sum(r["finish_reason"] == "stop" and len(r["response_ids"]) > 0 for r in rows)
    assert all(r["finish_reason"] == "stop" for r in stop_only)
    bounded = emitted(RowFilter(min_response_length=10, max_response_length=30))
    assert all(10 <= len(r["response_ids"]) <= 30 for r in bounded)
    assert len(bounded) == sum(10 <= len(r["response_ids"]) <= 30 for r in rows)
    rewarded = emitted(RowFilter(min_reward=0.5))
    assert all(r["reward"] is not None and r["reward"] >= 0.5 for r in rewarded)
    assert len(rewarded) == sum(r["reward"] == 1.0 and len(r["response_ids"]) > 0 for r in rows)
    keep_empty = emitted(RowFilter(drop_empty=False))
    assert len(keep_empty) == len(rows)
    no_loops = emitted(RowFilter(drop_repetitive=True))
    assert all(not r["response_text"].startswith("abab") for r in no_loops)


def test_filter_validation_and_missing_columns(stores):
    a, b = stores
    with pytest.raises(ConfigError, match="got \\('eos',\\)"):
        RowFilter(finish_reasons=("eos",))
    with pytest.raises(ConfigError, match="got 3"):
        RowFilter(min_response_length=5, max_response_length=3)
    with pytest.raises(StoreError, match=r"needs columns \['response_text'\]"):
        RolloutStream(b, row_filter=RowFilter(drop_repetitive=True))
    with pytest.raises(StoreError, match="keeps no rows"):
        next(RolloutStream(a, row_filter=RowFilter(min_response_length=1000)))
    with pytest.raises(ConfigError, match="got 0"):
        RolloutStream(a, shuffle_buffer=0)
    with pytest.raises(ConfigError, match="one entry per store"):
        RolloutStream([a, b], weights=[1.0])


def test_mixing_follows_weights(stores):
    a, b = stores
    stream = RolloutStream([a, b], weights=[3.0, 1.0], seed=0, shuffle_buffer=4, columns=["prompt_id"])
    counts = Counter(next(stream)["store_index"] for _ in range(2000))
    assert counts[0] / 2000 == pytest.approx(0.75, abs=0.03)
    # Each source cycles through its own epochs independently; the counters add up to the draws.
    assert min(stream.epochs) >= 1
    for index, epochs in enumerate(stream.epoch_counters()):
        assert sum(c["rows_emitted"] for c in epochs) == counts[index]
    only_b = RolloutStream([a, b], weights=[0.0, 1.0], columns=["prompt_id"])
    assert {next(only_b)["store_index"] for _ in range(50)} == {1}


def test_shuffle_buffer_bounds_memory(stores):
    a, b = stores
    stream = RolloutStream([a, b], shuffle_buffer=5, batch_size=3, columns=["prompt_id"])
    peak = 0
    for _ in range(300):
        next(stream)
        peak = max(peak, *stream.held_rows())
        assert all(rows in (0, 5) for rows, _ in stream.shuffle_peaks())  # 0: not started yet
    assert 3 <= peak <= 5 + 3 - 1  # at most the reservoir, plus the rest of one read batch


def _naive_epochs(root, shuffle_buffer, seed, epochs):
    """The reservoir over decoded rows, row by row: what the stream emitted before it planned epochs."""
    store = open_store(root)
    units = [(i, g) for i in range(len(store.shard_paths)) for g in range(store.num_row_groups(i))]
    out = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, 0, epoch])
        order = [units[i] for i in rng.permutation(len(units))]
        buffer = []
        columns = ["prompt_id", "sample_index", "response_ids"]
        rows = (r for b in store.iter_batches(columns, row_groups=order) for r in batch_to_rows(b))
        for row in rows:
            if len(row["response_ids"]) == 0:
                continue
            if len(buffer) < shuffle_buffer:
                buffer.append(row)
                continue
            slot = int(rng.integers(len(buffer)))
            out.append(buffer[slot])
            buffer[slot] = row
        out.extend(buffer[slot] for slot in rng.permutation(len(buffer)))
    return [(0, r["prompt_id"], r["sample_index"]) for r in out]


@pytest.mark.parametrize("shuffle_buffer", [1, 8, 1000])
def test_order_is_the_row_reservoirs_when_bytes_do_not_bind(stores, shuffle_buffer):
    a, _ = stores
    reference = _naive_epochs(a, shuffle_buffer, seed=5, epochs=2)
    stream = RolloutStream(a, shuffle_buffer=shuffle_buffer, shuffle_buffer_bytes=2**40, seed=5)
    assert _take(stream, len(reference)) == reference


def test_row_sizes_are_the_decoded_rows(tmp_path):
    root = write_store(tmp_path / "k", num_parts=2, topk=3, with_text=True, with_reward=True)
    store = open_store(root)
    batch = next(store.iter_batches(batch_size=1000))
    sizes = row_nbytes(batch, store.columns, store.schema, store.topk)
    for size, row in zip(sizes, batch_to_rows(batch, topk=3)):
        arrays = sum(v.nbytes for v in row.values() if isinstance(v, np.ndarray))
        text = len((row[TEXT_COLUMN] or "").encode())
        assert size == ROW_OVERHEAD_BYTES + arrays + text


def test_byte_bound(stores):
    a, _ = stores
    store = open_store(a)
    kept = [r for r in store.iter_rows() if len(r["response_ids"]) > 0]
    sizes = row_nbytes(next(store.iter_batches(batch_size=10_000)), store.columns, store.schema, None)
    cap = int(np.median(sizes) * 4)
    stream = RolloutStream(a, shuffle_buffer=1000, shuffle_buffer_bytes=cap, seed=5, batch_size=2)
    epoch, held = [], 0
    for _ in range(len(kept)):
        epoch.append(_key(next(stream)))
        held = max(held, stream.held_bytes()[0])
    assert sorted(epoch) == sorted((0, r["prompt_id"], r["sample_index"]) for r in kept)
    rows, peak = stream.shuffle_peaks()[0]
    assert peak <= max(cap, sizes.max()) and rows < 1000
    assert held <= peak + 2 * sizes.max()  # plus what one read batch brought early
    unbounded = _take(RolloutStream(a, shuffle_buffer=1000, seed=5), len(kept))
    assert epoch != unbounded


def test_shuffle_order_bytes():
    sizes = np.array([1, 1, 1, 10, 1, 1, 1, 1])
    result = shuffle_order(sizes, np.random.default_rng(0), max_rows=100, max_bytes=3)
    assert sorted(result.order.tolist()) == list(range(8))
    assert result.peak_rows == 3 and result.peak_bytes <= 10  # the large row is only ever held alone
    rows_only = shuffle_order(sizes, np.random.default_rng(0), max_rows=3, max_bytes=None)
    assert rows_only.peak_rows == 3 and rows_only.peak_bytes == 12
    roomy = shuffle_order(sizes, np.random.default_rng(0), max_rows=3, max_bytes=12)
    assert np.array_equal(roomy.order, rows_only.order)  # a bound that never binds changes nothing


@pytest.mark.parametrize("world", [2, 3])
def test_each_process_decodes_only_its_rows(stores, world):
    a, b = stores
    kwargs = dict(weights=[2.0, 1.0], shuffle_buffer=6, seed=11, batch_size=2)
    n = 240
    single = RolloutStream([a, b], **kwargs)
    reference = [next(single) for _ in range(n)]
    for rank in range(world):
        stream = RolloutStream([a, b], rank=rank, world_size=world, **kwargs)
        decoded = peak = 0
        for position, want in enumerate(reference):
            row = next(stream)
            assert _key(row) == _key(want)
            if position % world == rank:
                assert row.keys() == want.keys()
                assert all(np.array_equal(row[k], want[k]) for k in want)
                decoded += 1
            else:
                assert sorted(row) == ["prompt_id", "sample_index", "store_index"]
            peak = max(peak, sum(stream.held_rows()))
        assert decoded == len(range(rank, n, world))
        assert peak <= 2 * (6 // world + 2)  # its share of both reservoirs, plus a read batch each


def test_a_process_resumes_a_state_of_any_world_size(stores):
    a, b = stores
    kwargs = dict(weights=[2.0, 1.0], shuffle_buffer=6, seed=11)
    reference = _take(RolloutStream([a, b], **kwargs), 150)
    first = RolloutStream([a, b], **kwargs)
    _take(first, 90)
    resumed = RolloutStream([a, b], rank=1, world_size=2, **kwargs)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rows = [next(resumed) for _ in range(60)]
    assert [_key(r) for r in rows] == reference[90:]
    assert all(("response_ids" in r) == (p % 2 == 1) for p, r in enumerate(rows, start=90))


def test_a_state_from_before_the_byte_bound_resumes_without_it(stores):
    a, _ = stores
    reference = _take(RolloutStream(a, shuffle_buffer=4, seed=2), 70)
    first = RolloutStream(a, shuffle_buffer=4, seed=2)
    _take(first, 30)
    state = first.state_dict()
    del state["shuffle_buffer_bytes"]
    resumed = RolloutStream(a, shuffle_buffer=4, shuffle_buffer_bytes=64, seed=2)
    resumed.load_state_dict(state)
    assert resumed.shuffle_buffer_bytes is None
    assert _take(resumed, 40) == reference[30:]
    with pytest.raises(TrainingError, match="shuffle_buffer_bytes"):
        RolloutStream(a, shuffle_buffer=4, shuffle_buffer_bytes=64, seed=2).load_state_dict(
            first.state_dict()
        )


@pytest.mark.parametrize("stop_at", [0, 7, 19, 45, 101])
def test_exact_resume(stores, stop_at):
    a, b = stores
    kwargs = dict(
        weights=[2.0, 1.0],
        shuffle_buffer=6,
        seed=11,
        columns=["prompt_id", "sample_index"],
        row_filter=RowFilter(),
    )
    reference = _take(RolloutStream([a, b], **kwargs), stop_at + 60)

    first = RolloutStream([a, b], **kwargs)
    assert _take(first, stop_at) == reference[:stop_at]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = RolloutStream([a, b], **kwargs)
    resumed.load_state_dict(state)
    assert _take(resumed, 60) == reference[stop_at:]


def test_resume_counters_match(stores):
    a, _ = stores
    stream = RolloutStream(a, shuffle_buffer=4, seed=2)
    _take(stream, 30)
    resumed = RolloutStream(a, shuffle_buffer=4, seed=2)
    resumed.load_state_dict(stream.state_dict())
    assert resumed.epoch_counters() == stream.epoch_counters()
    assert resumed.epochs == stream.epochs


def test_resume_refuses_other_settings(stores):
    a, b = stores
    state = RolloutStream([a, b], seed=1).state_dict()
    with pytest.raises(TrainingError, match=r"different \['seed'\]"):
        RolloutStream([a, b], seed=2).load_state_dict(state)
    with pytest.raises(TrainingError, match="stores/columns"):
        RolloutStream([b, a], seed=1).load_state_dict(state)
    with pytest.raises(TrainingError, match="row_filter"):
        RolloutStream([a, b], seed=1, row_filter=RowFilter(drop_empty=False)).load_state_dict(state)
    with pytest.raises(TrainingError, match="version"):
        RolloutStream([a, b], seed=1).load_state_dict({"version": 99})
