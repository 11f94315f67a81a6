"""Check a store end to end: manifest, every listed shard's bytes, schema, identity and rows.

``verify_store`` never raises for a damaged store: every finding becomes a line in the report, so
one run lists everything that is wrong. Problems make the store unfit for training; warnings
(a newer minor version, files the manifest does not list, leftovers of interrupted writes) do not.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.errors import StoreError
from lightning_opd.progress import progress_bar
from lightning_opd.store.files import sha256_file
from lightning_opd.store.reader import DEFAULT_BATCH_SIZE
from storage_schemas import logprob_store_v1 as fmt

MAX_PROBLEMS_PER_SHARD = 5


@dataclass
class VerifyReport:
    root: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {
            "shards_listed": 0,
            "shards_ok": 0,
            "rows": 0,
            "tokens": 0,
            "empty_responses": 0,
        }
    )

    # What the row scan saw beyond ``counts``, for checking the manifest's stats.
    observed: dict[str, int] = field(default_factory=lambda: {"max_response_length": 0, "truncated": 0})

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        c = self.counts
        lines = [
            f"store {self.root}: {'OK' if self.ok else 'PROBLEMS FOUND'}",
            f"  shards {c['shards_ok']}/{c['shards_listed']} ok, rows {c['rows']}, response tokens {c['tokens']}, "
            f"empty responses {c['empty_responses']}",
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _load_manifest(root: Path, report: VerifyReport) -> fmt.Manifest | None:
    path = root / fmt.MANIFEST_FILE
    if not root.is_dir():
        report.problems.append(f"{root} is not a directory")
        return None
    if not path.exists():
        report.problems.append(f"no {fmt.MANIFEST_FILE} (not finalized? run `lopd store finalize {root}`)")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        report.problems.append(f"{fmt.MANIFEST_FILE} is unreadable or not JSON: {e}")
        return None
    if not isinstance(data, dict) or data.get("format") != fmt.FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        report.problems.append(f"{fmt.MANIFEST_FILE} is not a {fmt.FORMAT_NAME} manifest (format={found!r})")
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fmt.check_format_version(data.get("format_version"), where=str(root))
            manifest = fmt.Manifest.from_dict(data)
        except StoreError as e:
            report.problems.append(str(e))
            return None
    report.warnings += [str(w.message) for w in caught]
    report.problems += manifest.problems()
    return manifest


def _check_metadata(pf: pq.ParquetFile, entry: fmt.ShardEntry, manifest: fmt.Manifest) -> list[str]:
    meta = pf.schema_arrow.metadata or {}
    found_uuid = meta.get(fmt.META_STORE_UUID, b"").decode()
    problems = []
    if found_uuid != manifest.store_uuid:
        problems.append(
            f"{entry.file} belongs to another store (store_uuid {found_uuid or 'missing'}, "
            f"manifest says {manifest.store_uuid}); it was copied in from elsewhere"
        )
    found_part = meta.get(fmt.META_PART, b"").decode()
    if found_part != str(entry.part):
        problems.append(f"{entry.file} says it is part {found_part or 'missing'}, manifest says {entry.part}")
    try:
        fmt.check_format_version(meta.get(fmt.META_FORMAT_VERSION, b"").decode(), where=entry.file)
    except StoreError as e:
        problems.append(str(e))
    return problems


def _check_rows(
    pf: pq.ParquetFile, entry: fmt.ShardEntry, manifest: fmt.Manifest, report: VerifyReport
) -> list[str]:
    problems: list[str] = []
    rows = tokens = empty = 0
    for batch in pf.iter_batches(batch_size=DEFAULT_BATCH_SIZE):
        batch = fmt.decode_batch(batch, manifest.encoding)  # the invariants are about log-prob values
        rows += batch.num_rows
        lengths = fmt.list_lengths(batch.column("response_ids"))
        tokens += int(lengths.sum())
        empty += int(np.count_nonzero(lengths == 0))
        if len(lengths):
            seen = report.observed
            seen["max_response_length"] = max(seen["max_response_length"], int(lengths.max()))
            seen["truncated"] += batch.column("finish_reason").to_pylist().count("length")
        if len(problems) < MAX_PROBLEMS_PER_SHARD:
            problems += [
                f"{entry.file}: {p}"
                for p in fmt.batch_problems(batch, kind=manifest.kind, topk=manifest.topk_k)
            ]
    if rows != entry.rows:
        problems.append(f"{entry.file} holds {rows} rows, manifest says {entry.rows}")
    if tokens != entry.tokens:
        problems.append(f"{entry.file} holds {tokens} response tokens, manifest says {entry.tokens}")
    report.counts["rows"] += rows
    report.counts["tokens"] += tokens
    report.counts["empty_responses"] += empty
    return problems[: MAX_PROBLEMS_PER_SHARD + 2]


def _schema_difference(found: pa.Schema, expected: pa.Schema) -> str:
    missing = [n for n in expected.names if n not in found.names]
    unexpected = [n for n in found.names if n not in expected.names]
    differing = [f.name for f in expected if f.name in found.names and not found.field(f.name).equals(f)]
    if missing or unexpected:
        return f"missing {missing}, unexpected {unexpected}"
    if differing:
        return f"differing fields {differing} (type or nullability)"
    return f"column order {found.names}, expected {expected.names}"


def _check_shard(
    root: Path, entry: fmt.ShardEntry, manifest: fmt.Manifest, report: VerifyReport, deep: bool
) -> list[str]:
    path = root / entry.file
    if not path.is_file():
        return [f"{entry.file} is listed in the manifest but missing on disk"]
    problems = []
    size = path.stat().st_size
    if size != entry.bytes:
        problems.append(f"{entry.file} is {size} bytes, manifest says {entry.bytes} (truncated or replaced)")
    elif sha256_file(path) != entry.sha256:
        problems.append(f"{entry.file} fails its sha256 check (corrupted or replaced)")
    try:
        with pq.ParquetFile(path) as pf:
            expected = manifest.schema()
            if not pf.schema_arrow.equals(expected, check_metadata=False):
                problems.append(
                    f"{entry.file} schema differs from the format's: {_schema_difference(pf.schema_arrow, expected)}"
                )
                return problems
            problems += _check_metadata(pf, entry, manifest)
            if pf.metadata.num_rows != entry.rows:
                problems.append(
                    f"{entry.file} footer says {pf.metadata.num_rows} rows, manifest says {entry.rows}"
                )
            if deep:
                problems += _check_rows(pf, entry, manifest, report)
    except Exception as e:  # a damaged file can fail anywhere inside pyarrow; report it, keep going
        problems.append(f"{entry.file} is unreadable (truncated or corrupt): {type(e).__name__}: {e}")
    return problems


def _check_stray_files(root: Path, manifest: fmt.Manifest, report: VerifyReport) -> None:
    listed = {s.file for s in manifest.shards}
    data = root / fmt.DATA_DIR
    if not data.is_dir():
        return
    for path in sorted(data.iterdir()):
        rel = f"{fmt.DATA_DIR}/{path.name}"
        if path.name.startswith("."):
            report.warnings.append(f"{rel} is a leftover of an interrupted write; safe to delete")
        elif path.suffix == ".parquet" and rel not in listed:
            report.warnings.append(
                f"{rel} is not listed in the manifest (readers ignore it, but `data/*.parquet` globs will see it)"
            )


def verify_store(root: str | Path, *, deep: bool = True) -> VerifyReport:
    """Check the store at ``root``; ``deep=False`` skips the per-row scan (checksums are still checked)."""
    root = Path(root)
    report = VerifyReport(root=str(root))
    manifest = _load_manifest(root, report)
    if manifest is None:
        return report
    if manifest.kind not in fmt.KINDS:
        return report  # already reported by manifest.problems(); no schema to check shards against
    report.counts["shards_listed"] = len(manifest.shards)
    if not manifest.shards:
        report.problems.append("the manifest lists no shards")
    # Hashing and scanning a large store takes minutes: a bar in bytes (rate and ETA; stderr only).
    bar = progress_bar(
        total=sum(max(0, s.bytes) for s in manifest.shards), desc="verify", unit="B", unit_scale=True
    )
    for entry in sorted(manifest.shards, key=lambda s: s.part):
        problems = _check_shard(root, entry, manifest, report, deep)
        report.problems += problems
        report.counts["shards_ok"] += not problems
        bar.update(max(0, entry.bytes))
    bar.close()
    if deep and report.counts["shards_ok"] == len(manifest.shards) and manifest.shards:
        report.problems += _stats_problems(manifest.stats, report)
    _check_stray_files(root, manifest, report)
    return report


def _stats_problems(stats: fmt.StoreStats, report: VerifyReport) -> list[str]:
    """The manifest's stats that the row scan can recompute and that disagree with it."""
    rows, c, seen = report.counts["rows"], report.counts, report.observed
    expected = {
        "num_empty": c["empty_responses"],
        "max_response_length": seen["max_response_length"],
        "mean_response_length": c["tokens"] / rows if rows else 0.0,
        "trunc_rate": seen["truncated"] / rows if rows else 0.0,
    }
    return [
        f"manifest stats.{name} is {getattr(stats, name)!r}, the rows give {value!r}"
        for name, value in expected.items()
        if not np.isclose(getattr(stats, name), value, rtol=1e-9, atol=1e-12)
    ]


def verify_summary(report: VerifyReport) -> dict[str, Any]:
    """The report as a plain dict (for --json output and logs)."""
    return {
        "root": report.root,
        "ok": report.ok,
        "problems": report.problems,
        "warnings": report.warnings,
        **report.counts,
    }
