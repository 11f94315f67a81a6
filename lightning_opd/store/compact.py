"""`lopd store compact`: a new store with the log-prob columns in 16-bit fixed point (format 1.2), and
optionally (``topk_scale``, format 1.3) top-k ids sorted as gaps with coarser top-k log-probs.

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
    topk_scale: int | None = None,
    log: Log = print,
) -> fmt.Manifest:
    """Write ``src`` as a compact store at ``dst`` (one part per source part); logs the clamped values.
    ``topk_scale`` (a power of two <= 2048, e.g. ``fmt.SUGGESTED_TOPK_SCALE``) also compacts the top-k."""
    store = open_store(src)
    if store.manifest.encoding is not None:
        # Re-encoding decoded values would add a second rounding the manifest could not state.
        raise StoreError(
            f"{src} is already compact ({store.manifest.encoding['logprobs']}); compact its float32 source instead"
        )
    if topk_scale is not None and store.topk is None:
        raise StoreError(f"{src} has no top-k columns; drop the top-k scale")
    encoding = fmt.fixed16_encoding(topk_scale=topk_scale)
    problems = fmt.encoding_problems(encoding)
    if problems:
        raise StoreError(problems[0])
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
    topk = f", top-k log-probs within {encoding['topk_max_abs_error']:.3g}" if topk_scale is not None else ""
    log(
        f"compacted {src} -> {dst}: {before / tokens:.2f} -> {after / tokens:.2f} bytes per response token; "
        f"log-probs within {encoding['max_abs_error']:.3g} nats on [{encoding['min_logprob']:.4f}, 0]{topk}, "
        f"{clamped} value(s) below the range clamped; store_id {manifest.store_id[:12]}"
    )
    _register(dst, cache_dir, log)
    return manifest
