"""What every store tool that writes a derived store shares.

- A store is never rewritten in place. The output is a new directory, refused when it is a source,
  inside a source, or not empty. One exception: an unfinished output of the *same* command (same
  derived store_id, no manifest yet) is resumed, skipping committed parts, as stage one resumes.
- Derived stores go through ``StoreWriter`` (row validation, atomic shards, manifest last), so
  they are ordinary stores: ``verify``, ``train`` and the other tools accept them.
- Streaming: one source shard is in memory at a time, after its sha256 is checked against the
  source manifest (a corrupt shard is not laundered into a store with a fresh checksum).
- Identity and lineage of a derived store are format rules: see ``storage_schemas.logprob_store_v1``
  (``derived_content_hash``, ``LINEAGE_KEY``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lightning_opd.errors import StoreError
from lightning_opd.store.files import sha256_file
from lightning_opd.store.reader import LogprobStore, read_saved_header
from lightning_opd.store.registry import check_not_duplicate, register
from lightning_opd.store.writer import StoreWriter
from storage_schemas import logprob_store_v1 as fmt
from storage_schemas.logprob_store_v1 import (
    LINEAGE_KEY,
)

BATCH_SIZE = 256
Log = Callable[[str], None]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output_dir(
    dst: str | Path, sources: list[str | Path], *, resume_store_id: str | None = None
) -> bool:
    """Refuse an output that would touch a source or clobber data; True when it resumes an unfinished store.

    ``resume_store_id``: the id the output will have; a non-empty ``dst`` is accepted only when it
    holds an unfinalized store with exactly that id (written by an interrupted run of the same command).
    """
    out = Path(dst).resolve()
    for source in sources:
        root = Path(source).resolve()
        if _inside(out, root):
            raise StoreError(
                f"output {dst} is {'the source store' if out == root else 'inside the source store'} {source}; "
                "stores are never rewritten in place, choose a directory outside it"
            )
    if not out.exists():
        return False
    if not out.is_dir():
        raise StoreError(f"output {dst} exists and is not a directory; choose a new output directory")
    if not any(out.iterdir()):
        return False
    unfinished = (out / fmt.HEADER_FILE).is_file() and not (out / fmt.MANIFEST_FILE).exists()
    if (
        resume_store_id is not None
        and unfinished
        and read_saved_header(out).get("store_id") == resume_store_id
    ):
        return True
    raise StoreError(f"output {dst} is not empty; choose a new directory (or delete it to start over)")


def manifest_sha256(root: str | Path) -> str:
    return sha256_file(Path(root) / fmt.MANIFEST_FILE)


def source_record(store: LogprobStore) -> dict[str, Any]:
    """How a derived store names one of its sources in its lineage."""
    return {
        "store_id": store.store_id,
        "path": str(store.root.resolve()),
        "manifest_sha256": manifest_sha256(store.root),
        "rows": store.num_rows,
        LINEAGE_KEY: (store.manifest.extra or {}).get(LINEAGE_KEY, []),
    }


def derived_content_hash(op: str, source_ids: list[str], params: dict[str, Any]) -> str:
    """The prompt_set.content_hash of a derived store (the format's rule, ``fmt.derived_content_hash``)."""
    return fmt.derived_content_hash(op, source_ids, params)


def derived_header(
    manifest: fmt.Manifest, op: str, params: dict[str, Any], lineage_entry: dict[str, Any]
) -> dict[str, Any]:
    """The source's header for a store derived from it by ``op``: a prompt_set hash derived from the
    source and ``params`` (so a new store_id), the parent's hash kept, and the lineage in extra."""
    header = json.loads(json.dumps(manifest.header()))  # a deep copy, plain JSON
    prompt_set = header["prompt_set"]
    header["prompt_set"] = {
        **prompt_set,
        "content_hash": derived_content_hash(op, [manifest.store_id], params),
        "parent_content_hash": prompt_set.get("parent_content_hash", prompt_set["content_hash"]),
    }
    header["extra"] = {**(header.get("extra") or {}), LINEAGE_KEY: [lineage_entry]}
    return header


def read_checked_shard(store: LogprobStore, index: int) -> pq.ParquetFile:
    """Shard ``index`` of ``store`` opened for reading, after checking its sha256 against the manifest."""
    entry = sorted(store.manifest.shards, key=lambda s: s.part)[index]
    path = store.root / entry.file
    if sha256_file(path) != entry.sha256:
        raise StoreError(
            f"{path} fails its sha256 check; run `lopd store verify {store.root}` before deriving from it"
        )
    return store.open_shard(index)


def _writer(dst: Path, header: dict[str, Any], num_parts: int, columns: list[str]) -> StoreWriter:
    options = fmt.schema_options(columns, fmt.topk_of(header))
    return StoreWriter(
        dst, header, num_parts=num_parts, topk=options["topk"],
        with_text=options["with_text"], with_reward=options["with_reward"],
        with_sampling=options["with_sampling"],
    )  # fmt: skip


def _gate_duplicate(store_id: str, dst: Path, cache_dir: str | Path | None, allow_duplicate: bool) -> None:
    if not allow_duplicate:
        check_not_duplicate(store_id, dst, cache_dir)


def _register(dst: Path, cache_dir: str | Path | None, log: Log) -> None:
    # The index is a convenience: failing to update it must not fail a finished store.
    try:
        register(dst, cache_dir)
    except StoreError as e:
        log(f"warning: {e}")
