"""`lopd store merge`: one new store from compatible scored stores.

The rules (what must match, how seeds, n and sample indices combine) are the format's: see
``storage_schemas.logprob_store_v1.MERGE_MUST_MATCH`` and its "Derived stores" section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lightning_opd.errors import StoreError
from lightning_opd.store.derive import (
    Log,
    _gate_duplicate,
    _register,
    _writer,
    check_output_dir,
    derived_content_hash,
    read_checked_shard,
    source_record,
)
from lightning_opd.store.reader import LogprobStore, open_store
from storage_schemas import logprob_store_v1 as fmt
from storage_schemas.logprob_store_v1 import (
    LINEAGE_KEY,
    MERGE_MUST_MATCH,
)


def _short(value: Any) -> str:
    text = repr(value)
    return text[:20] + "…'" if isinstance(value, str) and len(value) > 24 else text


def merge_problems(stores: list[LogprobStore]) -> list[str]:
    """Why ``stores`` cannot be merged (empty when they can), each naming the field and both values."""
    problems = [
        f"{s.root} is a {s.kind!r} store; merge scored stores (run `lopd score` on it first)"
        for s in stores
        if s.kind != fmt.KIND_SCORED
    ]
    first = stores[0]
    for other in stores[1:]:
        if other.store_id == first.store_id:
            problems.append(
                f"{first.root} and {other.root} hold the same content (store_id {first.store_id[:12]}); "
                "merging would count every rollout twice, pass it once"
            )
        for name, read in MERGE_MUST_MATCH:
            a, b = read(first.manifest), read(other.manifest)
            if a != b:
                problems.append(f"{name} differs: {first.root} has {_short(a)}, {other.root} has {_short(b)}")
    return problems


def _merged_or_list(values: list[Any]) -> Any:
    return values[0] if all(v == values[0] for v in values) else values


def merge_plan(stores: list[LogprobStore]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The merged header and, per source, its lineage record (parts, sample_index offset, sampling, prompt set)."""
    offsets: dict[str, int] = {}  # prompt-set hash -> samples per prompt so far
    records, part = [], 0
    for store in stores:
        m = store.manifest
        key = m.prompt_set["content_hash"]
        record = {
            **source_record(store),
            "parts": [part, part + len(store.shard_paths)],
            "sample_index_offset": offsets.get(key, 0),
            "sampling": m.sampling,
            "prompt_set": m.prompt_set,
        }
        offsets[key] = offsets.get(key, 0) + int(m.sampling["n"])
        part += len(store.shard_paths)
        records.append(record)
    first = stores[0].manifest
    header = json.loads(json.dumps(first.header()))
    header["sampling"] = {
        **header["sampling"],
        "seed": _merged_or_list([s.manifest.sampling.get("seed") for s in stores]),
        "backend": _merged_or_list([s.manifest.sampling.get("backend") for s in stores]),
        "n": max(offsets.values()),
    }
    distinct = {s.manifest.prompt_set["content_hash"]: s.manifest.prompt_set for s in stores}
    header["prompt_set"] = {
        "source": "lopd store merge",
        "content_hash": derived_content_hash("merge", [s.store_id for s in stores], {}),
        "num_prompts": sum(int(p.get("num_prompts") or 0) for p in distinct.values()),
    }
    header["extra"] = {LINEAGE_KEY: [{"op": "merge", "sources": records}]}
    return header, records


def merge_stores(
    sources: list[str | Path],
    dst: str | Path,
    *,
    cache_dir: str | Path | None = None,
    allow_duplicate: bool = False,
    log: Log = print,
) -> fmt.Manifest:
    """Concatenate compatible stores into a new one at ``dst`` (one part per source shard, in order)."""
    if len(sources) < 2:
        raise StoreError(f"merge needs at least two stores, got {len(sources)}")
    stores = [open_store(s) for s in sources]
    problems = merge_problems(stores)
    if problems:
        raise StoreError("cannot merge: " + "; ".join(problems))
    header, records = merge_plan(stores)
    store_id = fmt.compute_store_id(header)
    dst = Path(dst)
    resuming = check_output_dir(dst, list(sources), resume_store_id=store_id)
    _gate_duplicate(store_id, dst, cache_dir, allow_duplicate)
    writer = _writer(dst, header, records[-1]["parts"][1], stores[0].columns)
    done = writer.committed_parts()
    if resuming:
        log(f"resuming {dst}: {len(done)} of {writer.num_parts} parts already written")
    for store, record in zip(stores, records):
        for index in range(len(store.shard_paths)):
            part = record["parts"][0] + index
            if part in done:
                continue
            with read_checked_shard(store, index) as pf:
                table = fmt.decode_batch(pf.read(), store.manifest.encoding)  # the writer re-encodes
            writer.write_part(part, _shift_sample_index(table, record["sample_index_offset"]))
    manifest = writer.finalize(wait_s=0)
    log(
        f"merged {len(stores)} stores -> {dst}: {manifest.stats.num_rollouts} rollouts, "
        f"{len(manifest.shards)} shards, store_id {manifest.store_id[:12]}"
    )
    _register(dst, cache_dir, log)
    return manifest


def _shift_sample_index(table: pa.Table, offset: int) -> pa.Table:
    if not offset:
        return table
    index = table.column("sample_index").to_numpy().astype(np.int64) + offset
    position = table.schema.get_field_index("sample_index")
    return table.set_column(position, table.schema.field(position), pa.array(index, pa.int32()))
