"""`lopd store compact`: a new store with the log-prob columns in 16-bit fixed point (format 1.2).

The encoding (scale, range, maximum error, what happens below the range) is the format's:
``storage_schemas.logprob_store_v1.fixed16_encoding``. The output is a derived store like a filter's
(new store_id, lineage in ``manifest.extra``), written part by part through ``StoreWriter``, which
encodes; readers decode, so stage two and every tool read it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_opd.errors import StoreError
from lightning_opd.store.derive import (
    Log,
    _gate_duplicate,
    _register,
    _writer,
    check_output_dir,
    derived_header,
    read_checked_shard,
    source_record,
)
from lightning_opd.store.reader import open_store
from storage_schemas import logprob_store_v1 as fmt


def compact_header(
    manifest: fmt.Manifest, encoding: dict[str, Any], lineage_entry: dict[str, Any]
) -> dict[str, Any]:
    """The source's header with the encoding, a derived prompt_set hash (a new store_id) and the lineage."""
    header = derived_header(manifest, "compact", {"encoding": encoding}, lineage_entry)
    header["encoding"] = encoding
    return header


def compact_store(
    src: str | Path,
    dst: str | Path,
    *,
    cache_dir: str | Path | None = None,
    allow_duplicate: bool = False,
    log: Log = print,
) -> fmt.Manifest:
    """Write ``src`` as a compact store at ``dst`` (one part per source part); logs the clamped values."""
    store = open_store(src)
    if store.manifest.encoding is not None:
        raise StoreError(f"{src} is already compact ({store.manifest.encoding['logprobs']}); nothing to do")
    encoding = fmt.fixed16_encoding()
    dst = Path(dst)
    entry = {"op": "compact", "encoding": encoding, "sources": [source_record(store)]}
    header = compact_header(store.manifest, encoding, entry)
    store_id = fmt.compute_store_id(header)
    resuming = check_output_dir(dst, [src], resume_store_id=store_id)
    _gate_duplicate(store_id, dst, cache_dir, allow_duplicate)
    writer = _writer(dst, header, len(store.shard_paths), store.columns)
    done = writer.committed_parts()
    if resuming:
        log(f"resuming {dst}: {len(done)} of {writer.num_parts} parts already written")
    clamped = 0
    for index in range(len(store.shard_paths)):
        if index in done:
            continue
        with read_checked_shard(store, index) as pf:
            table = pf.read()
        clamped += fmt.count_clamped(table, encoding)
        writer.write_part(index, table)
    manifest = writer.finalize(wait_s=0)
    before = sum(s.bytes for s in store.manifest.shards)
    after = sum(s.bytes for s in manifest.shards)
    tokens = max(1, manifest.stats.num_response_tokens)
    log(
        f"compacted {src} -> {dst}: {before / tokens:.2f} -> {after / tokens:.2f} bytes per response token; "
        f"log-probs within {encoding['max_abs_error']:.3g} nats on [{encoding['min_logprob']:.4f}, 0], "
        f"{clamped} value(s) below it clamped; store_id {manifest.store_id[:12]}"
    )
    _register(dst, cache_dir, log)
    return manifest
