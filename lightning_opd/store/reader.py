"""Open a logprob store and stream it, shard by shard and row group by row group.

Only shards listed in ``manifest.json`` are read; nothing here loads a whole store into memory.
Rows come out as dicts: list columns as numpy arrays (top-k columns as ``[positions, k]``), the
rest as Python scalars. Arrays are copies, so a row kept (e.g. in a shuffle buffer) does not pin
the decoded batch it came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.config import to_dict
from lightning_opd.errors import StoreError
from lightning_opd.store.arrow import batch_to_rows
from lightning_opd.store.files import read_json, sha256_file
from storage_schemas import logprob_store_v1 as fmt

DEFAULT_BATCH_SIZE = 64


def load_manifest(root: str | Path) -> fmt.Manifest:
    """Parse and validate ``root/manifest.json``; typed errors say what to run when it is not there."""
    root = Path(root)
    if not root.is_dir():
        raise StoreError(
            f"no logprob store at {root} (directory missing); check the path or run `lopd precompute`"
        )
    path = root / fmt.MANIFEST_FILE
    if not path.exists():
        committed = (
            sorted((root / fmt.COMMITS_DIR).glob("part-*.json")) if (root / fmt.COMMITS_DIR).is_dir() else []
        )
        if committed:
            raise StoreError(
                f"{root} is not finalized ({len(committed)} parts committed, no {fmt.MANIFEST_FILE}); run "
                f"`lopd store finalize {root}` once every precompute worker has finished"
            )
        raise StoreError(
            f"{root} holds no {fmt.MANIFEST_FILE}; it is not a logprob store (run `lopd precompute`)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is unreadable or not JSON ({e}); run `lopd store verify {root}`") from None
    if not isinstance(data, dict) or data.get("format") != fmt.FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise StoreError(f"{path} is not a {fmt.FORMAT_NAME} manifest (format={found!r})")
    fmt.check_format_version(data.get("format_version"), where=str(root))
    manifest = fmt.Manifest.from_dict(data)
    manifest.validate()
    return manifest


def _shard_uuid(metadata: dict[bytes, bytes] | None) -> str | None:
    value = (metadata or {}).get(fmt.META_STORE_UUID)
    return value.decode() if value is not None else None


class LogprobStore:
    """A finalized store opened for reading (see ``open_store``)."""

    def __init__(self, root: str | Path, manifest: fmt.Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.schema = manifest.read_schema()  # float32 log-probs, whatever the encoding on disk
        self.shard_paths = [self.root / s.file for s in sorted(manifest.shards, key=lambda s: s.part)]

    def __repr__(self) -> str:
        return f"LogprobStore({str(self.root)!r}, kind={self.kind!r}, rows={self.num_rows}, shards={len(self.shard_paths)})"

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def store_id(self) -> str:
        return self.manifest.store_id

    @property
    def num_rows(self) -> int:
        return self.manifest.stats.num_rollouts

    @property
    def num_tokens(self) -> int:
        return self.manifest.stats.num_response_tokens

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)

    @property
    def topk(self) -> int | None:
        return self.manifest.topk_k

    def check_columns(self, columns: list[str] | None) -> list[str]:
        """``columns`` (default all), refusing names the store does not have."""
        if columns is None:
            return self.columns
        unknown = [c for c in columns if c not in self.schema.names]
        if unknown:
            raise StoreError(f"store {self.root} has no columns {unknown}; it has {self.columns}")
        return list(columns)

    def open_shard(self, index: int) -> pq.ParquetFile:
        """The ParquetFile of shard ``index`` (in part order), refusing a shard of another store."""
        path = self.shard_paths[index]
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise StoreError(f"cannot read shard {path} ({e}); run `lopd store verify {self.root}`") from None
        found = _shard_uuid(pf.schema_arrow.metadata)
        if found != self.manifest.store_uuid:
            pf.close()
            raise StoreError(
                f"shard {path} belongs to another store (store_uuid {found}, expected {self.manifest.store_uuid}); "
                f"run `lopd store verify {self.root}`"
            )
        return pf

    def num_row_groups(self, index: int) -> int:
        with self.open_shard(index) as pf:
            return pf.metadata.num_row_groups

    def iter_batches(
        self,
        columns: list[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        shards: list[int] | None = None,
        row_groups: list[tuple[int, int]] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Stream record batches over the listed shards (or the given ``(shard, row_group)`` units)."""
        columns = self.check_columns(columns)
        read = fmt.columns_to_read(columns, self.manifest.encoding)  # a sorted top-k decodes as a pair
        if row_groups is None:
            indices = range(len(self.shard_paths)) if shards is None else shards
            for index in indices:
                with self.open_shard(index) as pf:
                    batches = pf.iter_batches(batch_size=batch_size, columns=read)
                    yield from self._checked(index, batches, columns)
            return
        for index, group in row_groups:
            with self.open_shard(index) as pf:
                batches = pf.iter_batches(batch_size=batch_size, columns=read, row_groups=[group])
                yield from self._checked(index, batches, columns)

    def _checked(
        self, index: int, batches: Iterator[pa.RecordBatch], columns: list[str]
    ) -> Iterator[pa.RecordBatch]:
        """``batches`` decoded to float32 log-probs (only ``columns``), with a damaged shard turned into a
        StoreError: pyarrow failing mid-file, or decoding a batch that is not valid Arrow (bad offsets,
        strings that are not UTF-8) without noticing."""
        try:
            for batch in batches:
                batch.validate(full=True)
                yield fmt.decode_batch(batch, self.manifest.encoding).select(columns)
        except (OSError, pa.ArrowException) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StoreError(
                f"cannot read shard {self.shard_paths[index]} ({reason}); run `lopd store verify {self.root}`"
            ) from None

    def iter_rows(
        self,
        columns: list[str] | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        shards: list[int] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Stream rows as dicts (see ``batch_to_rows``)."""
        for batch in self.iter_batches(columns, batch_size, shards=shards):
            yield from batch_to_rows(batch, topk=self.topk)


def read_part(
    root: str | Path, part: int, *, columns: list[str] | None = None, checksum: bool = True
) -> pa.Table:
    """One committed part of a store as a table, finalized or not.

    Stage one's scoring reads its rollouts store part by part while other shard workers may still
    be writing theirs, so this trusts the part's commit marker when there is no manifest yet. The
    file must match the recorded size (and sha256 unless ``checksum=False``) and carry this store's
    store_uuid. A part is bounded by the part size, so holding one in memory is fine.
    """
    root = Path(root)
    if (root / fmt.MANIFEST_FILE).exists():
        manifest = load_manifest(root)
        store_uuid, encoding = manifest.store_uuid, manifest.encoding
        record = next((to_dict(s) for s in manifest.shards if s.part == part), None)
    else:
        saved = read_saved_header(root)
        store_uuid, encoding = saved["store_uuid"], saved["header"].get("encoding")
        try:
            record = json.loads((root / fmt.commit_file(part)).read_text())
        except (OSError, ValueError):
            record = None
    if record is None or record.get("file") != fmt.shard_file(part):
        raise StoreError(
            f"part {part} of {root} is not committed; (re)run the worker that owns it, then retry"
        )
    path = root / record["file"]
    if not path.is_file() or path.stat().st_size != record["bytes"]:
        raise StoreError(
            f"{path} is missing or not the size its commit recorded; rerun the worker that owns part {part}"
        )
    if checksum and sha256_file(path) != record["sha256"]:
        raise StoreError(f"{path} fails its sha256 check; rerun the worker that owns part {part}")
    if _shard_uuid(pq.read_schema(path).metadata) != store_uuid:
        raise StoreError(f"{path} belongs to another store; rerun the worker that owns part {part}")
    try:
        read = None if columns is None else fmt.columns_to_read(columns, encoding)
        table = fmt.decode_batch(pq.read_table(path, columns=read), encoding)
        return table if columns is None else table.select(columns)
    except (OSError, pa.ArrowException) as e:
        raise StoreError(f"cannot read {path} ({e}); rerun the worker that owns part {part}") from None


def open_store(root: str | Path) -> LogprobStore:
    """Open a finalized store; typed errors for a missing/unfinalized/foreign/other-version store."""
    root = Path(root)
    manifest = load_manifest(root)
    if not manifest.shards:
        raise StoreError(f"{root} has no committed shards; rerun `lopd precompute`")
    missing = [s.file for s in manifest.shards if not (root / s.file).is_file()]
    if missing:
        raise StoreError(
            f"{root} lists shards that are missing on disk: {missing[:5]}; run `lopd store verify {root}`"
        )
    return LogprobStore(root, manifest)


def read_saved_header(root: str | Path) -> dict[str, Any]:
    """The record of commits/header.json (header, store_uuid, num_parts, columns); the manifest stands in
    for it in a finalized store whose commits/ directory was not copied."""
    root = Path(root)
    saved = read_json(root / fmt.HEADER_FILE)
    if saved is not None:
        fmt.check_format_version(saved.get("format_version"), where=str(root))
        return saved
    if (root / fmt.MANIFEST_FILE).exists():
        manifest = load_manifest(root)
        return {
            "store_uuid": manifest.store_uuid,
            "store_id": manifest.store_id,
            "created_at": manifest.created_at,
            "format_version": manifest.format_version,
            "header": manifest.header(),
            "num_parts": manifest.num_parts,
            "columns": manifest.columns,
        }
    if (root / fmt.HEADER_FILE).exists():
        raise StoreError(f"{root / fmt.HEADER_FILE} is unreadable; rerun the workers into a new directory")
    raise StoreError(
        f"no logprob store at {root} (no {fmt.HEADER_FILE}); check the path or run `lopd rollout`"
    )
