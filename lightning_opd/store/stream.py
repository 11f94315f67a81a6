"""The training stream: rows of one or more stores, epoch after epoch, filtered, shuffled and mixed.

Per store (a "source") and epoch, the order is a pure function of ``(seed, source, epoch)``: the
``(shard, row group)`` units are permuted, read in that order through the row filter into a bounded
shuffle buffer (``shuffle_buffer`` rows and ``shuffle_buffer_bytes`` of decoded rows), and the buffer
is drained at the end of the epoch. Sources are mixed by drawing one source per row with
probabilities ``weights``.

Each epoch is *planned* first, from its small columns only (``prompt_id``, lengths, what the row
filter reads): which rows are kept, what each costs decoded, and the shuffled order (shuffle.py). Rows
are then decoded lazily, in read order, when their turn nears. Under several processes every process
plans the same global order and decodes only the rows at its own global positions, so a process holds
about 1/N of the buffer and decodes 1/N of the rows.

Exact resume, by design simple: ``state_dict`` records, per source, the epoch and how many rows it
has emitted in it, plus the mixer's RNG state. ``load_state_dict`` plans that epoch again and starts
after that many rows, decoding none of them; the checkpoint needs no buffer contents, and the rows
after restoring are exactly the rows the uninterrupted stream would have produced, for any number of
processes.

Memory per process: its share of the buffer plus one record batch of ``batch_size`` rows, and the
plan (a few numbers and the ``prompt_id`` of each row of the epoch). Pick ``columns`` to skip top-k
columns a loss does not use; they dominate row size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightning_opd.config import check, to_dict
from lightning_opd.errors import StoreError, TrainingError
from lightning_opd.evaluation import diagnostics
from lightning_opd.store.reader import LogprobStore, batch_to_rows, open_store
from lightning_opd.store.shuffle import row_nbytes, shuffle_order, size_columns
from storage_schemas import logprob_store_v1 as fmt

STATE_VERSION = 1
_PLAN_BATCH_ROWS = 1024  # planning reads small columns only: large batches are cheap
# The mixer's seed sequence has two entries, the per-epoch ones three, so they never coincide.
_MIXER_STREAM = 2**31 - 1
DROP_REASONS = ("finish_reason", "empty", "too_short", "too_long", "low_reward", "repetitive")


@dataclass
class RowFilter:
    """Which rollouts training sees. Defaults keep everything but empty responses."""

    finish_reasons: tuple[str, ...] = fmt.FINISH_REASONS
    min_response_length: int = 0
    max_response_length: int | None = None
    min_reward: float | None = None  # rows with a null reward are dropped when this is set
    drop_empty: bool = True  # an empty response carries no token to learn from
    drop_repetitive: bool = False  # StableOPD's RepRate test; needs the response_text column

    def __post_init__(self) -> None:
        self.finish_reasons = tuple(self.finish_reasons)
        check(len(self.finish_reasons) > 0, f"finish_reasons must not be empty, got {self.finish_reasons}")
        unknown = [r for r in self.finish_reasons if r not in fmt.FINISH_REASONS]
        check(not unknown, f"finish_reasons must be among {fmt.FINISH_REASONS}, got {self.finish_reasons}")
        check(
            self.min_response_length >= 0, f"min_response_length must be >= 0, got {self.min_response_length}"
        )
        check(
            self.max_response_length is None or self.max_response_length >= self.min_response_length,
            f"max_response_length must be None or >= min_response_length, got {self.max_response_length}",
        )

    def needed_columns(self) -> list[str]:
        columns = ["finish_reason", "response_ids"]
        if self.min_reward is not None:
            columns.append(fmt.REWARD_COLUMN)
        if self.drop_repetitive:
            columns.append(fmt.TEXT_COLUMN)
        return columns

    def mask(self, batch: pa.RecordBatch) -> tuple[np.ndarray, dict[str, int]]:
        """Keep-mask of a batch and how many rows each rule dropped (first failing rule counts)."""
        n = batch.num_rows
        lengths = fmt.list_lengths(batch.column("response_ids"))
        rules: dict[str, np.ndarray] = {
            "finish_reason": pc.is_in(batch.column("finish_reason"), pa.array(self.finish_reasons))
            .to_numpy(zero_copy_only=False)
            .astype(bool),
            "empty": lengths > 0 if self.drop_empty else np.ones(n, bool),
            "too_short": lengths >= self.min_response_length,
            "too_long": lengths <= self.max_response_length
            if self.max_response_length is not None
            else np.ones(n, bool),
        }
        if self.min_reward is not None:
            reward = pc.fill_null(batch.column(fmt.REWARD_COLUMN), float("-inf")).to_numpy(
                zero_copy_only=False
            )
            rules["low_reward"] = reward >= self.min_reward
        if self.drop_repetitive:
            texts = batch.column(fmt.TEXT_COLUMN).to_pylist()
            rules["repetitive"] = np.array([not diagnostics.is_repetitive(t) for t in texts], dtype=bool)
        keep = np.ones(n, dtype=bool)
        dropped = {}
        for reason, passes in rules.items():
            dropped[reason] = int((keep & ~passes).sum())
            keep &= passes
        return keep, dropped


def _new_counters(epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "rows_read": 0,
        "rows_kept": 0,
        "rows_emitted": 0,
        "dropped": dict.fromkeys(DROP_REASONS, 0),
    }


@dataclass
class _EpochPlan:
    """One source's epoch before any row is decoded: its kept rows in read ("arrival") order, where
    each lies, what it costs, and the shuffled order they are emitted in."""

    units: list[tuple[int, int]]  # (shard, row group), in this epoch's read order
    unit_start: np.ndarray  # arrival index of each unit's first kept row; one more entry at the end
    row_in_unit: np.ndarray  # arrival -> row position inside its unit
    nbytes: np.ndarray  # arrival -> decoded bytes
    prompt_ids: list[str]  # arrival -> prompt_id (what another process's row shows here)
    sample_indices: list[int]
    order: np.ndarray  # emission -> arrival
    emission_of: np.ndarray  # arrival -> emission
    peak_rows: int
    peak_bytes: int
    counters: dict[str, Any]


@dataclass
class _Source:
    store: LogprobStore
    units: list[tuple[int, int]]  # (shard index, row group) in part order
    emit_columns: list[str]
    plan_columns: list[str]  # what planning an epoch reads: row filter, sizes, ids
    epoch: int = 0
    emitted_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    plan: _EpochPlan | None = None
    held: dict[int, dict[str, Any]] = field(default_factory=dict)  # arrival -> decoded row of ours
    reader: Iterator[tuple[int, dict[str, Any]]] | None = None


class _MixerLookahead:
    """Which global positions each source's next rows take: a copy of the mixer, run ahead.

    A process decides whether it decodes a row when it reads it, before the row's turn comes; with
    several sources, the row's global position (and so its process) depends on mixer draws still
    ahead. This draws them early from a copy of the mixer's state; the mixer itself is untouched, so
    checkpoints keep its state as before."""

    def __init__(self, mixer: np.random.Generator, cumulative: np.ndarray, position: int) -> None:
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = mixer.bit_generator.state
        self._cumulative = cumulative
        self._next = position  # the global position of the next draw
        self._queues: list[deque[int]] = [deque() for _ in cumulative]

    def position(self, source: int, ahead: int) -> int:
        """Global position of source ``source``'s row ``ahead`` rows after its next one (0: the next)."""
        queue = self._queues[source]
        while len(queue) <= ahead:
            for drawn in _pick(self._cumulative, self._rng.random(256)).tolist():
                self._queues[drawn].append(self._next)
                self._next += 1
        return queue[ahead]

    def advance(self, source: int, position: int) -> None:
        """The mixer drew ``source`` for ``position``; forget it."""
        taken = self.position(source, 0)
        self._queues[source].popleft()
        if taken != position:  # pragma: no cover - the copy and the mixer draw the same numbers
            raise AssertionError(f"mixer lookahead out of step: {taken} != {position}")


def _pick(cumulative: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Source index of each uniform draw (clamped: float rounding at the top end)."""
    return np.minimum(np.searchsorted(cumulative, draws, side="right"), len(cumulative) - 1)


class RolloutStream:
    """Infinite iterator over rows of one or more stores (see the module docstring).

    Each row is a dict of the requested columns plus ``store_index`` (which source it came from).
    Under several processes (``world_size``), every process walks the same global order and decodes
    only its own rows (global positions ``rank`` mod ``world_size``: the ``rows[rank::world]`` of
    each batch); another process's row comes back as a stub of ``prompt_id``, ``sample_index`` and
    ``store_index``.
    """

    def __init__(
        self,
        stores: LogprobStore | str | Path | list[LogprobStore | str | Path],
        weights: list[float] | None = None,
        *,
        shuffle_buffer: int = 256,
        shuffle_buffer_bytes: int | None = None,
        seed: int = 0,
        row_filter: RowFilter | None = None,
        columns: list[str] | None = None,
        batch_size: int = 32,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(stores, list):
            stores = [stores]
        check(len(stores) > 0, "RolloutStream needs at least one store, got none")
        check(shuffle_buffer >= 1, f"shuffle_buffer must be >= 1 (1 = no shuffling), got {shuffle_buffer}")
        check(
            shuffle_buffer_bytes is None or shuffle_buffer_bytes >= 1,
            f"shuffle_buffer_bytes must be None (no byte bound) or >= 1, got {shuffle_buffer_bytes}",
        )
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        check(
            world_size >= 1 and 0 <= rank < world_size,
            f"rank must be in [0, world_size), got rank {rank} of {world_size}",
        )
        if weights is None:
            weights = [1.0] * len(stores)
        check(
            len(weights) == len(stores),
            f"weights must have one entry per store ({len(stores)}), got {weights}",
        )
        check(
            all(w >= 0 for w in weights) and sum(weights) > 0,
            f"weights must be >= 0 with a positive sum, got {weights}",
        )
        self.seed = int(seed)
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_buffer_bytes = shuffle_buffer_bytes
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.row_filter = row_filter or RowFilter()
        self.weights = [w / sum(weights) for w in weights]
        self._cumulative = np.cumsum(self.weights)
        self._sources = [self._make_source(s, columns) for s in stores]
        self._mixer = np.random.default_rng([self.seed, _MIXER_STREAM])
        self._position = 0  # global position of the next row
        self._lookahead = _MixerLookahead(self._mixer, self._cumulative, 0)

    def _make_source(self, store: LogprobStore | str | Path, columns: list[str] | None) -> _Source:
        if not isinstance(store, LogprobStore):
            store = open_store(store)
        emit = store.check_columns(columns)
        needed = self.row_filter.needed_columns()
        lacking = [c for c in needed if c not in store.columns]
        if lacking:
            raise StoreError(f"row filter needs columns {lacking} that store {store.root} does not have")
        wanted = ["prompt_id", "sample_index", *needed, *size_columns(emit)]
        plan_columns = [c for c in store.columns if c in wanted]
        units = [(i, g) for i in range(len(store.shard_paths)) for g in range(store.num_row_groups(i))]
        return _Source(store=store, units=units, emit_columns=emit, plan_columns=plan_columns)

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> RolloutStream:
        return self

    def __next__(self) -> dict[str, Any]:
        index = 0
        if len(self._sources) > 1:
            index = int(_pick(self._cumulative, np.asarray([self._mixer.random()]))[0])
        row = self._next_from(index)
        if len(self._sources) > 1:
            self._lookahead.advance(index, self._position)
        self._position += 1
        row["store_index"] = index
        return row

    def _next_from(self, index: int) -> dict[str, Any]:
        source = self._sources[index]
        if source.plan is None:
            self._start_epoch(index)
        if source.emitted_in_epoch == len(source.plan.order):
            source.history.append(source.plan.counters)
            source.epoch += 1
            source.emitted_in_epoch = 0
            self._start_epoch(index)
        plan = source.plan
        arrival = int(plan.order[source.emitted_in_epoch])
        if self._mine(index, 0):
            while arrival not in source.held:
                got, row = next(source.reader)
                source.held[got] = row
            row = source.held.pop(arrival)
        else:
            row = {"prompt_id": plan.prompt_ids[arrival], "sample_index": plan.sample_indices[arrival]}
        source.emitted_in_epoch += 1
        plan.counters["rows_emitted"] += 1
        return row

    def _mine(self, index: int, ahead: int) -> bool:
        """Whether this process decodes source ``index``'s row ``ahead`` rows after its next one."""
        if self.world_size == 1:
            return True
        position = self._position + ahead
        if len(self._sources) > 1:
            position = self._lookahead.position(index, ahead)
        return position % self.world_size == self.rank

    def _start_epoch(self, index: int) -> None:
        source = self._sources[index]
        source.plan = self._plan_epoch(index)
        source.held = {}
        source.reader = self._read_rows(index)
        if len(source.plan.order) == 0:
            raise StoreError(
                f"the row filter keeps no rows of store {source.store.root}; loosen it ({self.row_filter})"
            )

    def _plan_epoch(self, index: int) -> _EpochPlan:
        """Source ``index``'s current epoch, planned from its small columns (see shuffle.py)."""
        source, store = self._sources[index], self._sources[index].store
        counters = _new_counters(source.epoch)
        rng = np.random.default_rng([self.seed, index, source.epoch])
        units = [source.units[i] for i in rng.permutation(len(source.units))]
        unit_start, positions, sizes, prompt_ids, sample_indices = [0], [], [], [], []
        for unit in units:
            offset = 0
            for batch in store.iter_batches(source.plan_columns, _PLAN_BATCH_ROWS, row_groups=[unit]):
                keep, dropped = self.row_filter.mask(batch)
                counters["rows_read"] += batch.num_rows
                counters["rows_kept"] += int(keep.sum())
                for reason, count in dropped.items():
                    counters["dropped"][reason] += count
                kept = np.flatnonzero(keep)
                positions.append(kept + offset)
                sizes.append(row_nbytes(batch, source.emit_columns, store.schema, store.topk)[kept])
                taken = batch.select(["prompt_id", "sample_index"]).take(pa.array(kept, pa.int64()))
                prompt_ids.extend(taken.column("prompt_id").to_pylist())
                sample_indices.extend(taken.column("sample_index").to_pylist())
                offset += batch.num_rows
            unit_start.append(len(prompt_ids))
        nbytes = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
        shuffled = shuffle_order(nbytes, rng, self.shuffle_buffer, self.shuffle_buffer_bytes)
        emission_of = np.empty_like(shuffled.order)
        emission_of[shuffled.order] = np.arange(len(shuffled.order))
        return _EpochPlan(
            units=units,
            unit_start=np.asarray(unit_start, dtype=np.int64),
            row_in_unit=np.concatenate(positions) if positions else np.zeros(0, np.int64),
            nbytes=nbytes,
            prompt_ids=prompt_ids,
            sample_indices=sample_indices,
            order=shuffled.order,
            emission_of=emission_of,
            peak_rows=shuffled.peak_rows,
            peak_bytes=shuffled.peak_bytes,
            counters=counters,
        )

    def _read_rows(self, index: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(arrival, row)`` of the rows this process decodes, in read order; a unit holding none of
        them is not read at all."""
        source = self._sources[index]
        plan, store = source.plan, source.store
        for u, unit in enumerate(plan.units):
            start, end = int(plan.unit_start[u]), int(plan.unit_start[u + 1])
            done = source.emitted_in_epoch
            wanted = [
                a
                for a in range(start, end)
                if plan.emission_of[a] >= done and self._mine(index, int(plan.emission_of[a]) - done)
            ]
            if not wanted:
                continue
            rows_at = plan.row_in_unit[wanted]
            offset = first = 0
            batches = store.iter_batches(source.emit_columns, self.batch_size, row_groups=[unit])
            try:
                for batch in batches:
                    last = int(np.searchsorted(rows_at, offset + batch.num_rows))
                    if last > first:
                        taken = batch.take(pa.array(rows_at[first:last] - offset, pa.int64()))
                        for arrival, row in zip(wanted[first:last], batch_to_rows(taken, topk=store.topk)):
                            self._check_same_row(source, arrival, row)
                            yield arrival, row
                    first, offset = last, offset + batch.num_rows
                    if first == len(wanted):
                        break
            finally:
                batches.close()

    @staticmethod
    def _check_same_row(source: _Source, arrival: int, row: dict[str, Any]) -> None:
        expected = source.plan.prompt_ids[arrival]
        if "prompt_id" in row and row["prompt_id"] != expected:
            raise StoreError(
                f"store {source.store.root} changed while training read it (row {expected!r} became "
                f"{row['prompt_id']!r}); stores are immutable once finalized: restore it, or start a new run"
            )

    # -- introspection ----------------------------------------------------------------------
    @property
    def epochs(self) -> list[int]:
        """Current epoch of each source."""
        return [s.epoch for s in self._sources]

    def held_rows(self) -> list[int]:
        """Decoded rows this process holds per source (its share of the shuffle buffer)."""
        return [len(s.held) for s in self._sources]

    def held_bytes(self) -> list[int]:
        """What those rows take, as the shuffle counts bytes."""
        return [int(sum(s.plan.nbytes[a] for a in s.held)) if s.plan else 0 for s in self._sources]

    def shuffle_peaks(self) -> list[tuple[int, int]]:
        """Per source, the most rows and bytes the (global) shuffle buffer holds in the current epoch."""
        return [(s.plan.peak_rows, s.plan.peak_bytes) if s.plan else (0, 0) for s in self._sources]

    def epoch_counters(self) -> list[list[dict[str, Any]]]:
        """Per source, one counter dict per epoch (finished ones, then the current one)."""
        return [[*s.history, s.plan.counters if s.plan else _new_counters(s.epoch)] for s in self._sources]

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serialisable state from which ``load_state_dict`` resumes exactly."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "weights": self.weights,
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_buffer_bytes": self.shuffle_buffer_bytes,
            "row_filter": to_dict(self.row_filter),
            "mixer": self._mixer.bit_generator.state,
            "sources": [
                {
                    "store_id": s.store.store_id,
                    "columns": s.emit_columns,
                    "epoch": s.epoch,
                    "emitted_in_epoch": s.emitted_in_epoch,
                    "history": s.history,
                }
                for s in self._sources
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the stream then continues exactly where the saved one was. The
        epoch in progress is planned again (small columns only); no row before the saved point is
        decoded. Any number of processes may resume it: the global order does not depend on them."""
        if isinstance(state, dict) and "shuffle_buffer_bytes" not in state:
            # Written before the byte bound existed: that run's shuffle had none, and so has its rest.
            self.shuffle_buffer_bytes = None
        self._check_compatible(state)
        self._mixer.bit_generator.state = state["mixer"]
        self._position = 0
        for index, (source, saved) in enumerate(zip(self._sources, state["sources"])):
            source.epoch = int(saved["epoch"])
            source.history = list(saved["history"])
            source.emitted_in_epoch = int(saved["emitted_in_epoch"])
            self._start_epoch(index)
            source.plan.counters["rows_emitted"] = source.emitted_in_epoch
            self._position += source.emitted_in_epoch + sum(c["rows_emitted"] for c in source.history)
        self._lookahead = _MixerLookahead(self._mixer, self._cumulative, self._position)

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else state
            raise TrainingError(f"stream state version must be {STATE_VERSION}, got {found!r}")
        mine = self.state_dict()
        differing = [
            k
            for k in ("seed", "weights", "shuffle_buffer", "shuffle_buffer_bytes", "row_filter")
            if state.get(k) != mine[k]
        ]
        saved_sources = [(s.get("store_id"), s.get("columns")) for s in state.get("sources", [])]
        if saved_sources != [(s["store_id"], s["columns"]) for s in mine["sources"]]:
            differing.append("stores/columns")
        if differing:
            raise TrainingError(
                f"cannot resume the rollout stream: the checkpoint was made with different {differing}; "
                "resume with the same stores and data settings, or start a new run"
            )
