"""The logprob store: write it once in stage one, stream it in stage two (format: storage_schemas.logprob_store_v1)."""

from lightning_opd.store.reader import LogprobStore, batch_to_rows, load_manifest, open_store, read_part
from lightning_opd.store.stream import RolloutStream, RowFilter
from lightning_opd.store.summary import format_summary, summarize_store
from lightning_opd.store.verify import VerifyReport, verify_store
from lightning_opd.store.writer import StoreWriter

__all__ = [
    "LogprobStore",
    "RolloutStream",
    "RowFilter",
    "StoreWriter",
    "VerifyReport",
    "batch_to_rows",
    "format_summary",
    "load_manifest",
    "open_store",
    "read_part",
    "summarize_store",
    "verify_store",
]
