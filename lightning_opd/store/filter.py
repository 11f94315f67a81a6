"""`lopd store filter`: a new store of the rollouts that pass a row filter, with lineage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.config import check, to_dict
from lightning_opd.errors import StoreError
from lightning_opd.store.derive import (
    BATCH_SIZE,
    Log,
    _gate_duplicate,
    _register,
    _writer,
    check_output_dir,
    derived_header,
    read_checked_shard,
    source_record,
)
from lightning_opd.store.reader import LogprobStore, open_store
from lightning_opd.store.stream import DROP_REASONS, RowFilter
from storage_schemas import logprob_store_v1 as fmt


@dataclass
class FilterSpec:
    """Which rollouts a filtered store keeps (all rules must pass). Defaults keep everything."""

    finish_reasons: tuple[str, ...] = fmt.FINISH_REASONS
    min_length: int = 0
    max_length: int | None = None
    min_reward: float | None = None  # rows with a null reward are dropped when this is set
    drop_truncated: bool = False  # same as finish_reasons=("stop",)
    drop_repetitive: bool = False  # StableOPD's RepRate test on response_text
    drop_empty: bool = False

    def __post_init__(self) -> None:
        self.finish_reasons = tuple(sorted(set(self.finish_reasons)))
        check(self.min_length >= 0, f"--min-length must be >= 0, got {self.min_length}")
        check(
            self.max_length is None or self.max_length >= self.min_length,
            f"--max-length must be >= --min-length, got {self.max_length} < {self.min_length}",
        )
        self.row_filter()  # validates finish reasons

    def row_filter(self) -> RowFilter:
        reasons = tuple(r for r in self.finish_reasons if not (self.drop_truncated and r == "length"))
        check(
            len(reasons) > 0,
            f"the filter keeps no finish reason (finish_reasons={self.finish_reasons}, drop_truncated)",
        )
        return RowFilter(
            finish_reasons=reasons,
            min_response_length=self.min_length,
            max_response_length=self.max_length,
            min_reward=self.min_reward,
            drop_empty=self.drop_empty,
            drop_repetitive=self.drop_repetitive,
        )

    def is_noop(self) -> bool:
        return self == FilterSpec()

    def check_columns(self, store: LogprobStore) -> None:
        needed = {fmt.REWARD_COLUMN: self.min_reward is not None, fmt.TEXT_COLUMN: self.drop_repetitive}
        for column, used in needed.items():
            if used and column not in store.columns:
                flag = "--min-reward" if column == fmt.REWARD_COLUMN else "--drop-repetitive"
                raise StoreError(f"{flag} needs the {column!r} column, which {store.root} does not keep")


def filter_header(manifest: fmt.Manifest, spec: FilterSpec, lineage_entry: dict[str, Any]) -> dict[str, Any]:
    """The source's header with a derived prompt_set hash (a new store_id) and the lineage in extra."""
    return derived_header(manifest, "filter", to_dict(spec), lineage_entry)


def _filter_shard(
    pf: pq.ParquetFile, row_filter: RowFilter, store: LogprobStore
) -> tuple[pa.Table, dict[str, int]]:
    kept, dropped = [], dict.fromkeys(DROP_REASONS, 0)
    for batch in pf.iter_batches(batch_size=BATCH_SIZE):
        # The writer takes float32 log-probs and re-encodes them under the header's (= source's) encoding.
        batch = fmt.decode_batch(batch, store.manifest.encoding)
        mask, counts = row_filter.mask(batch)
        for reason, count in counts.items():
            dropped[reason] += count
        kept.append(batch.filter(pa.array(mask)))
    return (pa.Table.from_batches(kept) if kept else store.schema.empty_table()), dropped


def finish_reasons_from_flags(values: list[str] | None) -> tuple[str, ...]:
    """``--finish-reasons stop length`` and ``--finish-reasons stop,length`` alike; none given: all."""
    if not values:
        return fmt.FINISH_REASONS
    return tuple(r for value in values for r in value.split(",") if r)


def filter_store(
    src: str | Path,
    dst: str | Path,
    spec: FilterSpec,
    *,
    cache_dir: str | Path | None = None,
    allow_duplicate: bool = False,
    log: Log = print,
) -> fmt.Manifest:
    """Write the rows of ``src`` that pass ``spec`` as a new store at ``dst`` (one part per source part)."""
    if spec.is_noop():
        raise StoreError(
            "the filter keeps every rollout; pass at least one of --finish-reasons, --min-length, "
            "--max-length, --min-reward, --drop-truncated, --drop-repetitive, --drop-empty"
        )
    store = open_store(src)
    spec.check_columns(store)
    dst = Path(dst)
    entry = {"op": "filter", "filter": to_dict(spec), "sources": [source_record(store)]}
    header = filter_header(store.manifest, spec, entry)
    store_id = fmt.compute_store_id(header)
    resuming = check_output_dir(dst, [src], resume_store_id=store_id)
    _gate_duplicate(store_id, dst, cache_dir, allow_duplicate)
    writer = _writer(dst, header, len(store.shard_paths), store.columns)
    done = writer.committed_parts()
    if resuming:
        log(f"resuming {dst}: {len(done)} of {writer.num_parts} parts already written")
    row_filter = spec.row_filter()
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for index in range(len(store.shard_paths)):
        if index in done:
            continue
        with read_checked_shard(store, index) as pf:
            table, counts = _filter_shard(pf, row_filter, store)
        writer.write_part(index, table)
        dropped = {reason: dropped[reason] + counts[reason] for reason in DROP_REASONS}
    manifest = writer.finalize(wait_s=0)
    reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.items() if count) or "none"
    log(
        f"filtered {src} -> {dst}: kept {manifest.stats.num_rollouts} of {store.num_rows} rollouts "
        f"(dropped: {reasons}), store_id {manifest.store_id[:12]}"
    )
    _register(dst, cache_dir, log)
    return manifest
