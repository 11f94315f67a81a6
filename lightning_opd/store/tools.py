"""Reusable logprob datasets: derive new stores (filter, merge), export them, compare two.

Rules every tool follows:

- A store is never rewritten in place. The output is a new directory, refused when it is a source,
  inside a source, or not empty. One exception: an unfinished output of the *same* command (same
  derived store_id, no manifest yet) is resumed, skipping committed parts, as stage one resumes.
- Derived stores go through ``StoreWriter`` (row validation, atomic shards, manifest last), so
  they are ordinary stores: ``verify``, ``train`` and the tools here accept them.
- Streaming: one source shard is in memory at a time, after its sha256 is checked against the
  source manifest (a corrupt shard is not laundered into a store with a fresh checksum).
- Identity: a derived store's ``prompt_set.content_hash`` is replaced by a hash of (operation,
  source store ids, parameters), so its store_id differs from every source and the same command
  on the same sources always yields the same id (the registry then finds it).
- Lineage: the writer does not pass ``Manifest.lineage`` through (it writes ``[]``), so the record
  of how a store was derived lives in ``manifest.extra["lineage"]``: one entry per operation, each
  naming its sources (store_id, path, manifest sha256, and their own lineage, nested).

Merge rules (checked field by field, refusing with both values named): same format major, kind
'scored', teacher and student (fingerprint, tokenizer fingerprint, dtype), teacher_consistency,
top-k (k, tail treatment), sampling temperature and top_p (they define what ``behavior_logprobs``
means), horizon (stage two cuts every store at one horizon) and columns. Prompt sets, sampling seed,
n and backend may differ; each source's values are kept in its lineage entry. The merged header
records ``sampling.seed``/``backend`` as a list when they differ, and ``sampling.n`` as the most
samples any prompt set now has. Sources sharing a prompt set get their ``sample_index`` shifted by
the n of earlier sources with that prompt set, so (prompt_id, sample_index) stays unique; prompt ids
of different prompt sets are kept as they are (lineage maps each output part to its source).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.config import check, to_dict, write_json_atomic
from lightning_opd.errors import StoreError
from lightning_opd.store.reader import LogprobStore, open_store
from lightning_opd.store.registry import check_not_duplicate, register
from lightning_opd.store.stream import DROP_REASONS, RowFilter
from lightning_opd.store.writer import StoreWriter, fsync_dir, read_saved_header, sha256_file
from storage_schemas import logprob_store_v1 as fmt

LINEAGE_KEY = "lineage"  # in manifest.extra (see the module docstring)
DERIVED_HASH_PREFIX = "derived1:"
EXPORT_MANIFEST = "lopd_manifest.json"
BATCH_SIZE = 256
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Output directories and sources
# ---------------------------------------------------------------------------------------------


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
    """The prompt_set.content_hash of a derived store: a function of what it was derived from."""
    canonical = json.dumps(
        {"op": op, "sources": source_ids, "params": params}, sort_keys=True, separators=(",", ":")
    )
    return DERIVED_HASH_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


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


# ---------------------------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------------------------


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
    header = json.loads(json.dumps(manifest.header()))  # a deep copy, plain JSON
    prompt_set = header["prompt_set"]
    header["prompt_set"] = {
        **prompt_set,
        "content_hash": derived_content_hash("filter", [manifest.store_id], to_dict(spec)),
        "parent_content_hash": prompt_set.get("parent_content_hash", prompt_set["content_hash"]),
    }
    extra = dict(header.get("extra") or {})
    extra[LINEAGE_KEY] = [lineage_entry]
    header["extra"] = extra
    return header


def _filter_shard(
    pf: pq.ParquetFile, row_filter: RowFilter, schema: pa.Schema
) -> tuple[pa.Table, dict[str, int]]:
    kept, dropped = [], dict.fromkeys(DROP_REASONS, 0)
    for batch in pf.iter_batches(batch_size=BATCH_SIZE):
        mask, counts = row_filter.mask(batch)
        for reason, count in counts.items():
            dropped[reason] += count
        kept.append(batch.filter(pa.array(mask)))
    table = pa.Table.from_batches(kept, schema=pf.schema_arrow) if kept else schema.empty_table()
    return table, dropped


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
            table, counts = _filter_shard(pf, row_filter, store.schema)
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


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------

# (field name in messages, how to read it from a manifest); every source must agree on each.
MERGE_MUST_MATCH: tuple[tuple[str, Callable[[fmt.Manifest], Any]], ...] = (
    ("format major version", lambda m: fmt.parse_version(m.format_version)[0]),
    ("kind", lambda m: m.kind),
    *(
        (f"{section}.{key}", lambda m, s=section, k=key: (getattr(m, s) or {}).get(k))
        for section in ("teacher", "student")
        for key in ("fingerprint", "tokenizer_fingerprint", "dtype")
    ),
    ("teacher_consistency.consistent", lambda m: (m.teacher_consistency or {}).get("consistent")),
    ("teacher_consistency.allowed", lambda m: (m.teacher_consistency or {}).get("allowed")),
    ("topk.k", lambda m: m.topk_k),
    ("topk.tail_treatment", lambda m: (m.topk or {}).get("tail_treatment")),
    ("sampling.temperature", lambda m: m.sampling.get("temperature")),
    ("sampling.top_p", lambda m: m.sampling.get("top_p")),
    ("horizon", lambda m: m.horizon),
    ("columns", lambda m: list(m.columns)),
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
                table = pf.read()
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


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

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
    for f in manifest.schema():
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
            schema = pf.schema_arrow
            with pq.ParquetWriter(tmp, schema, **_portable_options(schema)) as writer:
                for group in range(pf.metadata.num_row_groups):  # one row group in memory at a time
                    writer.write_table(pf.read_row_group(group))
        os.replace(tmp, final)
        files.append(final.name)
    write_json_atomic(dst / EXPORT_MANIFEST, store.manifest.to_dict())
    (dst / "README.md").write_text(export_readme(store.manifest, files))
    fsync_dir(dst)
    log(f"exported {src} -> {dst} ({len(files)} Parquet files, {store.num_rows} rows)")
    return dst


# ---------------------------------------------------------------------------------------------
# diff
# ---------------------------------------------------------------------------------------------

# Sections in display order; shards and store_uuid always differ and say nothing about content.
DIFF_SECTIONS = (
    "format", "format_version", "writer_version", "created_at", "store_id", "kind", "teacher", "student",
    "teacher_consistency", "sampling", "horizon", "prompt_set", "topk", "columns", "num_parts", "stats", "extra",
)  # fmt: skip


@dataclass
class DiffRow:
    field: str
    a: Any
    b: Any
    identity: bool = False  # part of the store_id

    @property
    def same(self) -> bool:
        return self.a == self.b


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", out)
    else:
        out[prefix] = value


def _flat_manifest(manifest: fmt.Manifest) -> dict[str, Any]:
    data = manifest.to_dict()
    out: dict[str, Any] = {}
    for section in DIFF_SECTIONS:
        _flatten(data.get(section), section, out)
    return out


def diff_manifests(a: fmt.Manifest, b: fmt.Manifest) -> list[DiffRow]:
    """Every manifest field of either store (dotted), with both values; ``same`` tells equal ones apart."""
    fa, fb = _flat_manifest(a), _flat_manifest(b)
    names = list(fa) + [n for n in fb if n not in fa]
    identity = set(fmt.IDENTITY_FIELDS)
    return [DiffRow(n, fa.get(n), fb.get(n), identity=n in identity) for n in names]


def diff_stores(a: str | Path, b: str | Path) -> list[DiffRow]:
    return diff_manifests(open_store(a).manifest, open_store(b).manifest)


def _cell(value: Any, width: int = 40) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= width else text[: width - 1] + "…"


def format_diff(rows: list[DiffRow], a: str, b: str, *, show_all: bool = False) -> str:
    """The differing fields (all with ``show_all``) as an aligned table; '*' marks identity fields."""
    shown = [r for r in rows if show_all or not r.same]
    differing = sum(not r.same for r in rows)
    lines = [f"A = {a}", f"B = {b}", f"{differing} of {len(rows)} fields differ ('*': part of the store_id)"]
    if not shown:
        return "\n".join(lines)
    table = [("field", "A", "B")] + [
        (("* " if r.identity else "  ") + r.field, _cell(r.a), _cell(r.b)) for r in shown
    ]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Token-level distributions (notebooks, `lopd store plot`)
# ---------------------------------------------------------------------------------------------

DEFAULT_LOGRATIO_EDGES = tuple(np.linspace(-8.0, 8.0, 65).tolist())


@dataclass
class Histogram:
    edges: list[float]
    counts: list[int]
    below: int = 0  # values under edges[0] (counted in the first bin too)
    above: int = 0  # values over edges[-1] (counted in the last bin too)
    total: int = 0
    mean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def logratio_histogram(store: LogprobStore | str | Path, edges: tuple[float, ...] | None = None) -> Histogram:
    """Histogram of per-token teacher − behaviour log-ratios (the step-0 Lightning-OPD advantage), streamed.

    Values outside ``edges`` are clipped into the end bins and counted in ``below``/``above``.
    """
    if not isinstance(store, LogprobStore):
        store = open_store(store)
    if store.kind != fmt.KIND_SCORED:
        raise StoreError(f"{store.root} is a rollouts store; it has no teacher log-probs to compare")
    edges_array = np.asarray(edges if edges is not None else DEFAULT_LOGRATIO_EDGES, dtype=np.float64)
    counts = np.zeros(len(edges_array) - 1, dtype=np.int64)
    below = above = total = 0
    total_sum = 0.0
    for batch in store.iter_batches(["behavior_logprobs", "teacher_logprobs"], batch_size=BATCH_SIZE):
        teacher = batch.column("teacher_logprobs").flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        behavior = (
            batch.column("behavior_logprobs").flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        )
        ratio = teacher - behavior
        below += int((ratio < edges_array[0]).sum())
        above += int((ratio > edges_array[-1]).sum())
        total += len(ratio)
        total_sum += float(ratio.sum())
        counts += np.histogram(np.clip(ratio, edges_array[0], edges_array[-1]), bins=edges_array)[0]
    return Histogram(
        edges=edges_array.tolist(),
        counts=counts.tolist(),
        below=below,
        above=above,
        total=total,
        mean=total_sum / total if total else None,
    )
