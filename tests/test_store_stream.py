"""RolloutStream: epochs, shuffling, filters, mixing by weight, bounded memory and exact resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from test_store_common import make_header, write_store

from lightning_opd.errors import ConfigError, StoreError, TrainingError
from lightning_opd.store.reader import open_store
from lightning_opd.store.stream import RolloutStream, RowFilter


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
        peak = max(peak, *stream.buffered_rows())
    assert peak == 5


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
