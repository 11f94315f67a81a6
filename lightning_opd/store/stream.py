"""The training stream: rows of one or more stores, epoch after epoch, filtered, shuffled and mixed.

Per store (a "source") and epoch, the order is a pure function of ``(seed, source, epoch)``: the
``(shard, row group)`` units are permuted, read in that order through the row filter into a bounded
shuffle buffer, and the buffer is drained at the end of the epoch. Sources are mixed by drawing one
source per row with probabilities ``weights``.

Exact resume, by design simple: ``state_dict`` records, per source, the epoch and how many rows it
has emitted in it, plus the mixer's RNG state. ``load_state_dict`` regenerates that epoch and skips
that many rows. This re-reads at most one epoch of each source, which is cheap next to training on
it, and needs no buffer contents in the checkpoint; the rows after restoring are exactly the rows
the uninterrupted stream would have produced.

Memory: at most ``shuffle_buffer`` rows per source plus one record batch of ``batch_size`` rows.
Pick ``columns`` to skip top-k columns a loss does not use; they dominate row size.
"""

from __future__ import annotations

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
from storage_schemas import logprob_store_v1 as fmt

STATE_VERSION = 1
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
class _Source:
    store: LogprobStore
    units: list[tuple[int, int]]  # (shard index, row group) in part order
    read_columns: list[str]
    emit_columns: list[str]
    epoch: int = 0
    emitted_in_epoch: int = 0
    counters: dict[str, Any] = field(default_factory=lambda: _new_counters(0))
    history: list[dict[str, Any]] = field(default_factory=list)
    buffer: list[dict[str, Any]] = field(default_factory=list)
    rows: Iterator[dict[str, Any]] | None = None


class RolloutStream:
    """Infinite iterator over rows of one or more stores (see the module docstring).

    Each row is a dict of the requested columns plus ``store_index`` (which source it came from).
    """

    def __init__(
        self,
        stores: LogprobStore | str | Path | list[LogprobStore | str | Path],
        weights: list[float] | None = None,
        *,
        shuffle_buffer: int = 256,
        seed: int = 0,
        row_filter: RowFilter | None = None,
        columns: list[str] | None = None,
        batch_size: int = 32,
    ) -> None:
        if not isinstance(stores, list):
            stores = [stores]
        check(len(stores) > 0, "RolloutStream needs at least one store, got none")
        check(shuffle_buffer >= 1, f"shuffle_buffer must be >= 1 (1 = no shuffling), got {shuffle_buffer}")
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
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
        self.batch_size = batch_size
        self.row_filter = row_filter or RowFilter()
        self.weights = [w / sum(weights) for w in weights]
        self._cumulative = np.cumsum(self.weights)
        self._sources = [self._make_source(s, columns) for s in stores]
        self._mixer = np.random.default_rng([self.seed, _MIXER_STREAM])

    def _make_source(self, store: LogprobStore | str | Path, columns: list[str] | None) -> _Source:
        if not isinstance(store, LogprobStore):
            store = open_store(store)
        emit = store.check_columns(columns)
        needed = self.row_filter.needed_columns()
        lacking = [c for c in needed if c not in store.columns]
        if lacking:
            raise StoreError(f"row filter needs columns {lacking} that store {store.root} does not have")
        read = emit + [c for c in needed if c not in emit]
        units = [(i, g) for i in range(len(store.shard_paths)) for g in range(store.num_row_groups(i))]
        return _Source(store=store, units=units, read_columns=read, emit_columns=emit)

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> RolloutStream:
        return self

    def __next__(self) -> dict[str, Any]:
        index = 0
        if len(self._sources) > 1:
            index = int(np.searchsorted(self._cumulative, self._mixer.random(), side="right"))
            index = min(index, len(self._sources) - 1)  # guards float rounding at the top end
        row = self._next_from(index)
        row["store_index"] = index
        return row

    def _next_from(self, index: int) -> dict[str, Any]:
        source = self._sources[index]
        if source.rows is None:
            source.rows = self._epoch_rows(index)
        for _ in range(2):
            try:
                row = next(source.rows)
            except StopIteration:
                if source.emitted_in_epoch == 0:
                    raise StoreError(
                        f"the row filter keeps no rows of store {source.store.root}; loosen it ({self.row_filter})"
                    ) from None
                source.history.append(source.counters)
                source.epoch += 1
                source.emitted_in_epoch = 0
                source.rows = self._epoch_rows(index)
                continue
            source.emitted_in_epoch += 1
            source.counters["rows_emitted"] += 1
            return row
        raise AssertionError("an epoch that emitted rows produced none when regenerated")  # pragma: no cover

    def _epoch_rows(self, index: int) -> Iterator[dict[str, Any]]:
        """Rows of source ``index`` for its current epoch, in the deterministic shuffled order."""
        source = self._sources[index]
        source.counters = _new_counters(source.epoch)
        source.buffer = []
        rng = np.random.default_rng([self.seed, index, source.epoch])
        order = [source.units[i] for i in rng.permutation(len(source.units))]
        buffer = source.buffer
        for batch in source.store.iter_batches(source.read_columns, self.batch_size, row_groups=order):
            keep, dropped = self.row_filter.mask(batch)
            source.counters["rows_read"] += batch.num_rows
            source.counters["rows_kept"] += int(keep.sum())
            for reason, count in dropped.items():
                source.counters["dropped"][reason] += count
            kept = batch.filter(pa.array(keep)).select(source.emit_columns)
            for row in batch_to_rows(kept, topk=source.store.topk):
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(row)
                    continue
                slot = int(rng.integers(len(buffer)))
                out, buffer[slot] = buffer[slot], row
                yield out
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]
        buffer.clear()

    # -- introspection ----------------------------------------------------------------------
    @property
    def epochs(self) -> list[int]:
        """Current epoch of each source."""
        return [s.epoch for s in self._sources]

    def buffered_rows(self) -> list[int]:
        """Rows held in each source's shuffle buffer (never more than ``shuffle_buffer``)."""
        return [len(s.buffer) for s in self._sources]

    def epoch_counters(self) -> list[list[dict[str, Any]]]:
        """Per source, one counter dict per epoch (finished ones, then the current one)."""
        return [[*s.history, s.counters] for s in self._sources]

    # -- resume -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Small, JSON-serialisable state from which ``load_state_dict`` resumes exactly."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "weights": self.weights,
            "shuffle_buffer": self.shuffle_buffer,
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
        """Restore a ``state_dict``; the stream then continues exactly where the saved one was."""
        self._check_compatible(state)
        self._mixer.bit_generator.state = state["mixer"]
        for index, (source, saved) in enumerate(zip(self._sources, state["sources"])):
            source.epoch = int(saved["epoch"])
            source.history = list(saved["history"])
            source.emitted_in_epoch = 0
            source.rows = self._epoch_rows(index)
            # Fast-forward through this epoch; the counters are rebuilt on the way.
            for _ in range(int(saved["emitted_in_epoch"])):
                next(source.rows)
                source.emitted_in_epoch += 1
                source.counters["rows_emitted"] += 1

    def _check_compatible(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            found = state.get("version") if isinstance(state, dict) else state
            raise TrainingError(f"stream state version must be {STATE_VERSION}, got {found!r}")
        mine = self.state_dict()
        differing = [
            k for k in ("seed", "weights", "shuffle_buffer", "row_filter") if state.get(k) != mine[k]
        ]
        saved_sources = [(s.get("store_id"), s.get("columns")) for s in state.get("sources", [])]
        if saved_sources != [(s["store_id"], s["columns"]) for s in mine["sources"]]:
            differing.append("stores/columns")
        if differing:
            raise TrainingError(
                f"cannot resume the rollout stream: the checkpoint was made with different {differing}; "
                "resume with the same stores and data settings, or start a new run"
            )
