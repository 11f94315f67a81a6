"""The logprob store: write it once in stage one, stream it in stage two (format: storage_schemas.logprob_store_v1)."""

from lightning_opd.store.reader import LogprobStore, batch_to_rows, load_manifest, open_store, read_part
from lightning_opd.store.registry import check_not_duplicate, find_existing, list_stores
from lightning_opd.store.stream import RolloutStream, RowFilter
from lightning_opd.store.summary import format_summary, position_stats, summarize_store
from lightning_opd.store.tools import (
    FilterSpec,
    diff_stores,
    export_hf,
    export_parquet,
    filter_store,
    logratio_histogram,
    merge_stores,
)
from lightning_opd.store.verify import VerifyReport, verify_store
from lightning_opd.store.writer import StoreWriter

__all__ = [
    "FilterSpec",
    "LogprobStore",
    "RolloutStream",
    "RowFilter",
    "StoreWriter",
    "VerifyReport",
    "batch_to_rows",
    "check_not_duplicate",
    "diff_stores",
    "export_hf",
    "export_parquet",
    "filter_store",
    "find_existing",
    "format_summary",
    "list_stores",
    "load_manifest",
    "logratio_histogram",
    "merge_stores",
    "open_store",
    "position_stats",
    "read_part",
    "summarize_store",
    "verify_store",
]
