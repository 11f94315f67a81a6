"""`lopd store export`: a store as a Hugging Face datasets directory, or as plain Parquet files with
the manifest and a README."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.config import write_json_atomic
from lightning_opd.errors import StoreError
from lightning_opd.store.derive import (
    Log,
    check_output_dir,
    read_checked_shard,
)
from lightning_opd.store.files import fsync_dir
from lightning_opd.store.reader import LogprobStore, open_store
from storage_schemas import logprob_store_v1 as fmt
from storage_schemas.logprob_store_v1 import (
    EXPORT_MANIFEST,
)

EXPORT_FORMATS = ("hf", "parquet")


def _check_all_shards(store: LogprobStore) -> None:
    for index in range(len(store.shard_paths)):
        read_checked_shard(store, index).close()


def export_hf(src: str | Path, dst: str | Path, *, log: Log = print) -> Path:
    """A Hugging Face ``datasets`` directory (``load_from_disk(dst)``) with the manifest beside it.

    ``Dataset.from_parquet`` streams the listed shards into an Arrow cache (a temporary directory
    next to ``dst``, removed afterwards) and ``save_to_disk`` writes it out, so memory stays at one
    record batch whatever the store's size.
    """
    store = open_store(src)
    if store.manifest.encoding is not None:
        # datasets reads the shards as they are: it would hand out the uint16 codes as log-probs.
        raise StoreError(
            f"{src} is a compact store (log-probs stored as 16-bit codes); export it with `--to parquet` "
            "(which decodes them to float32) and load those files with datasets"
        )
    dst = Path(dst)
    check_output_dir(dst, [src])
    _check_all_shards(store)
    import datasets  # slow to import; only this command needs it

    dst.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=f".{dst.name}.hf-cache-", dir=dst.parent))
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # one summary line is printed instead
    try:
        dataset = datasets.Dataset.from_parquet([str(p) for p in store.shard_paths], cache_dir=str(cache))
        dataset.save_to_disk(str(dst))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if bars:
            datasets.enable_progress_bars()
    write_json_atomic(dst / EXPORT_MANIFEST, store.manifest.to_dict())
    log(
        f"exported {src} -> {dst} (Hugging Face datasets, {store.num_rows} rows; load_from_disk({str(dst)!r}))"
    )
    return dst


def _portable_options(schema: pa.Schema) -> dict[str, Any]:
    # BYTE_STREAM_SPLIT on integer columns is recent (Parquet 2.11); many readers lack it, so the
    # export keeps only zstd and dictionary-encoded strings.
    options = fmt.parquet_writer_options(schema)
    return {k: options[k] for k in ("compression", "compression_level", "use_dictionary", "write_statistics")}


def export_readme(manifest: fmt.Manifest, files: list[str]) -> str:
    """README.md of a plain Parquet export: what the files are, their columns, how to read them."""
    lines = [
        f"# Logprob store {manifest.store_id[:12]} (plain Parquet export)",
        "",
        f"Exported from a {fmt.FORMAT_NAME} store (format {manifest.format_version}, kind {manifest.kind!r}): "
        f"{manifest.stats.num_rollouts} rollouts, {manifest.stats.num_response_tokens} response tokens, "
        f"horizon {manifest.horizon}. One row per rollout; `{EXPORT_MANIFEST}` is the store's manifest "
        "(teacher, student, sampling, prompt set, top-k, statistics).",
        "",
        "Files: " + ", ".join(f"`{f}`" for f in files),
        "",
        "```python",
        "import polars as pl",
        "df = pl.scan_parquet(\"part-*.parquet\")     # or duckdb: SELECT * FROM 'part-*.parquet'",
        "```",
        "",
        "| column | type | description |",
        "|---|---|---|",
    ]
    for f in manifest.read_schema():
        lines.append(f"| `{f.name}` | `{f.type}` | {fmt.COLUMN_DESCRIPTIONS[f.name]} |")
    return "\n".join(lines) + "\n"


def export_parquet(src: str | Path, dst: str | Path, *, log: Log = print) -> Path:
    """Plain Parquet files ``dst/part-NNNNNN.parquet`` (portable encodings) + manifest copy + README.md."""
    store = open_store(src)
    dst = Path(dst)
    check_output_dir(dst, [src])
    dst.mkdir(parents=True, exist_ok=True)
    files = []
    for index, shard in enumerate(store.shard_paths):
        final = dst / shard.name
        tmp = dst / f".{shard.name}.tmp-{os.getpid()}"
        with read_checked_shard(store, index) as pf:
            # Plain float32 log-probs, whatever the store's encoding: the export is for other readers.
            schema = store.schema.with_metadata(pf.schema_arrow.metadata)
            with pq.ParquetWriter(tmp, schema, **_portable_options(schema)) as writer:
                for group in range(pf.metadata.num_row_groups):  # one row group in memory at a time
                    writer.write_table(fmt.decode_batch(pf.read_row_group(group), store.manifest.encoding))
        os.replace(tmp, final)
        files.append(final.name)
    write_json_atomic(dst / EXPORT_MANIFEST, store.manifest.to_dict())
    (dst / "README.md").write_text(export_readme(store.manifest, files))
    fsync_dir(dst)
    log(f"exported {src} -> {dst} ({len(files)} Parquet files, {store.num_rows} rows)")
    return dst
