"""Crash-safe, resumable, shardable writer of a logprob store (format v1).

Work is split into numbered parts (fixed chunks of the prompt set). Each part becomes one shard:

1. rows are validated (lengths agree, log-probs finite and <= 0) before anything touches the disk;
2. the shard is written under a dot-prefixed temporary name in ``data/``, flushed and fsynced;
3. it is renamed to ``data/part-NNNNNN.parquet`` and the directory is fsynced;
4. the commit marker ``commits/part-NNNNNN.json`` (rows, bytes, sha256, stat sums) is written atomically.

A rerun skips parts whose marker matches the file's checksum. ``finalize`` (run once, after every
worker) checks that all parts are committed and writes ``manifest.json``; only then is a shard part
of the store, because readers trust only the manifest. It then writes the dataset card
``README.md`` (``lightning_opd.store.card``), so the store also loads as a Hugging Face dataset.

Concurrency: a per-part ``flock`` while a part is written (a second writer of the same part fails
at once), a shared store lock held by writers and an exclusive one by finalize, so finalize never
runs while a part is being written. flock is reliable on local disks; on NFS it depends on the
mount, so give each shard worker distinct parts (the ``part % num_shards`` scheme does).
"""

from __future__ import annotations

import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import lightning_opd
from lightning_opd.config import to_dict, write_json_atomic
from lightning_opd.errors import StoreError
from lightning_opd.evaluation import diagnostics
from lightning_opd.store.arrow import conform_table, rows_to_table
from lightning_opd.store.card import write_card
from lightning_opd.store.files import file_lock, fsync_dir, read_json, sha256_file
from lightning_opd.store.reader import load_manifest, read_saved_header
from storage_schemas import logprob_store_v1 as fmt

# Long enough for a concurrent finalize to hash every shard of a large store and write the manifest.
FINALIZE_WAIT_S = 600.0


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (missing-part lists can be long)."""
    out: list[str] = []
    start = prev = None
    for n in sorted(numbers) + [None]:
        if start is not None and (n is None or n != prev + 1):
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------
# Per-part statistics (summed at finalize)
# ---------------------------------------------------------------------------------------------


def part_stats(table: pa.Table, *, kind: str) -> dict[str, Any]:
    lengths = (
        fmt.list_lengths(table.column("response_ids").combine_chunks())
        if table.num_rows
        else np.zeros(0, np.int64)
    )
    reasons = table.column("finish_reason").to_pylist()
    stats: dict[str, Any] = {
        "rows": table.num_rows,
        "tokens": int(lengths.sum()),
        "max_response_length": int(lengths.max()) if len(lengths) else 0,
        "num_truncated": sum(diagnostics.is_truncated(r) for r in reasons),
        "num_empty": int((lengths == 0).sum()),
        "num_repetitive": None,
        "sum_teacher_minus_behavior": None,
        "logratio_tokens": 0,
    }
    if fmt.TEXT_COLUMN in table.column_names:
        stats["num_repetitive"] = sum(
            diagnostics.is_repetitive(t) for t in table.column(fmt.TEXT_COLUMN).to_pylist()
        )
    if kind == fmt.KIND_SCORED and table.num_rows:
        teacher = pc.list_flatten(table.column("teacher_logprobs")).to_numpy().astype(np.float64)
        behavior = pc.list_flatten(table.column("behavior_logprobs")).to_numpy().astype(np.float64)
        stats["sum_teacher_minus_behavior"] = float((teacher - behavior).sum())
        stats["logratio_tokens"] = int(len(teacher))
    elif kind == fmt.KIND_SCORED:
        stats["sum_teacher_minus_behavior"] = 0.0
    return stats


def aggregate_stats(parts: list[dict[str, Any]]) -> fmt.StoreStats:
    rows = sum(p["rows"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    repetitive = [p["num_repetitive"] for p in parts]
    logratio = [p["sum_teacher_minus_behavior"] for p in parts]
    logratio_tokens = sum(p["logratio_tokens"] for p in parts)
    return fmt.StoreStats(
        num_rollouts=rows,
        num_response_tokens=tokens,
        mean_response_length=tokens / rows if rows else 0.0,
        max_response_length=max((p["max_response_length"] for p in parts), default=0),
        trunc_rate=sum(p["num_truncated"] for p in parts) / rows if rows else 0.0,
        rep_rate=(sum(repetitive) / rows if rows else 0.0) if None not in repetitive else None,
        num_empty=sum(p["num_empty"] for p in parts),
        mean_teacher_minus_behavior_logratio=(
            (sum(logratio) / logratio_tokens if logratio_tokens else 0.0) if None not in logratio else None
        ),
    )


# ---------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------

# A stage may save its config.json (and precompute its intermediate rollouts) beside the store's files.
_STORE_ENTRIES = {
    fmt.MANIFEST_FILE,
    fmt.DATA_DIR,
    fmt.COMMITS_DIR,
    fmt.LOCKS_DIR,
    fmt.ROLLOUTS_SUBDIR,
    "config.json",
}


class StoreWriter:
    """Writes the parts of one store; any number of writers (processes) may share a directory.

    ``header`` holds the identity sections (kind, teacher, student, teacher_consistency, sampling,
    horizon, prompt_set, topk, extra). The first writer records it in ``commits/header.json`` with
    a new store_uuid; later writers must agree on every identity field, ``num_parts`` and the
    column options, or are refused, so a rerun with other settings never mixes into a store.
    """

    def __init__(
        self,
        root: str | Path,
        header: dict[str, Any],
        *,
        num_parts: int,
        topk: int | None = None,
        with_text: bool = False,
        with_sampling: bool = False,
        with_reward: bool = False,
    ) -> None:
        problems = fmt.header_problems(header)
        if problems:
            raise StoreError("invalid store header: " + "; ".join(problems))
        if not (isinstance(num_parts, int) and num_parts >= 1):
            raise StoreError(f"num_parts must be an int >= 1, got {num_parts!r}")
        if topk != fmt.topk_of(header):
            raise StoreError(f"topk={topk!r} disagrees with the header's topk section {header.get('topk')!r}")
        self.root = Path(root)
        self.kind: str = header["kind"]
        self.num_parts = num_parts
        self.topk = topk
        options = {
            "topk": topk,
            "with_reward": with_reward,
            "with_text": with_text,
            "with_sampling": with_sampling,
        }
        # Callers hand in float32 log-probs (self.schema); a compact store (header "encoding") stores
        # them as codes (self.disk_schema), encoded just before the shard is written.
        self.encoding: dict[str, Any] | None = header.get("encoding")
        self.schema = fmt.store_schema(self.kind, **options)
        self.disk_schema = fmt.store_schema(self.kind, **options, encoding=self.encoding)
        # A store is compact or not as a whole: a writer with another encoding is refused like one
        # with other columns (a header.json of a 1.0/1.1 store has no "encoding": None matches it).
        self._options = {"num_parts": num_parts, "columns": self.schema.names, "encoding": self.encoding}
        self._refuse_foreign_directory()
        for sub in (fmt.DATA_DIR, fmt.COMMITS_DIR, fmt.LOCKS_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        saved = self._open_header(header)
        self.header: dict[str, Any] = saved["header"]
        self.store_uuid: str = saved["store_uuid"]
        self.store_id: str = saved["store_id"]
        self.created_at: str = saved["created_at"]

    # -- opening ----------------------------------------------------------------------------
    def _refuse_foreign_directory(self) -> None:
        if not self.root.exists():
            return
        if not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a directory; choose another store directory")
        foreign = sorted(p.name for p in self.root.iterdir() if p.name not in _STORE_ENTRIES)
        if foreign and not (self.root / fmt.HEADER_FILE).exists():
            raise StoreError(
                f"{self.root} is not empty and holds no logprob store (found {foreign[:5]}); choose a new directory"
            )

    def _open_header(self, header: dict[str, Any]) -> dict[str, Any]:
        path = self.root / fmt.HEADER_FILE
        busy = f"could not lock {self.root / fmt.HEADER_LOCK_FILE}"
        # Blocking: two workers starting together must agree on one store_uuid, not race.
        with file_lock(self.root / fmt.HEADER_LOCK_FILE, exclusive=True, blocking=True, busy_message=busy):
            saved = read_json(path)
            if saved is None and (self.root / fmt.MANIFEST_FILE).exists():
                saved = read_saved_header(self.root)
            if saved is None:
                saved = {
                    "format": fmt.FORMAT_NAME,
                    "format_version": fmt.FORMAT_VERSION,
                    "store_uuid": uuid.uuid4().hex,
                    "store_id": fmt.compute_store_id(header),
                    "created_at": fmt.utc_now(),
                    "header": header,
                    **self._options,
                }
                write_json_atomic(path, saved)
                fsync_dir(path.parent)
                return saved
        fmt.check_format_version(saved.get("format_version"), where=str(self.root))
        self._compare(saved, header)
        return saved

    def _compare(self, saved: dict[str, Any], header: dict[str, Any]) -> None:
        differing = fmt.identity_differences(saved.get("header") or {}, header)
        differing += [
            key for key, value in self._options.items() if saved.get(key) != value and key not in differing
        ]
        if differing:
            raise StoreError(
                f"{self.root} already holds a different store (differs in {differing}); use a new output "
                "directory, or delete this one to start over"
            )
        others = [k for k in fmt.HEADER_KEYS if saved["header"].get(k) != header.get(k)]
        if others:
            warnings.warn(
                f"{self.root}: header differs from the store's in non-identity fields {others}; keeping the store's",
                stacklevel=3,
            )

    # -- reading a store's saved identity (e.g. stage one's scoring reads its rollouts store) --
    @staticmethod
    def read_header(root: str | Path) -> dict[str, Any]:
        """The identity sections a store was opened with (from commits/header.json, else the manifest)."""
        return read_saved_header(root)["header"]

    @staticmethod
    def read_num_parts(root: str | Path) -> int:
        return int(read_saved_header(root)["num_parts"])

    @classmethod
    def reopen(cls, root: str | Path) -> StoreWriter:
        """A writer for a store that workers started, from its saved header (e.g. to finalize it)."""
        saved = read_saved_header(root)
        columns = saved["columns"]
        return cls(
            root,
            saved["header"],
            num_parts=saved["num_parts"],
            topk=fmt.topk_of(saved["header"]),
            with_text=fmt.TEXT_COLUMN in columns,
            with_reward=fmt.REWARD_COLUMN in columns,
            with_sampling=fmt.SAMPLING_COLUMN in columns,
        )

    # -- state ------------------------------------------------------------------------------
    def is_finalized(self) -> bool:
        """True once ``finalize`` has written the manifest (the store is then read-only)."""
        return (self.root / fmt.MANIFEST_FILE).exists()

    def is_complete(self) -> bool:
        """True when every part is committed (sizes checked, not checksums), i.e. ``finalize`` can run.

        Each shard worker can ask this after its own parts: the last one to finish finalizes.
        """
        return self.is_finalized() or len(self.committed_parts(checksum=False)) == self.num_parts

    def _check_part(self, part: int) -> None:
        if not (isinstance(part, int) and 0 <= part < self.num_parts):
            raise StoreError(f"part must be an int in [0, {self.num_parts}), got {part!r}")

    def _marker(self, part: int, *, checksum: bool) -> dict[str, Any] | None:
        """The part's commit marker when it still describes the file on disk, else None."""
        marker = read_json(self.root / fmt.commit_file(part))
        if marker is None or marker.get("store_uuid") != self.store_uuid:
            return None
        shard = self.root / fmt.shard_file(part)
        try:
            size = shard.stat().st_size
        except FileNotFoundError:
            return None
        if size != marker.get("bytes") or (checksum and sha256_file(shard) != marker.get("sha256")):
            return None
        return marker

    def committed_parts(self, parts: list[int] | range | None = None, *, checksum: bool = True) -> set[int]:
        """Parts (of ``parts``, default all) whose shard is committed and still matches its checksum.

        A shard worker passes only its own parts so that it hashes only its own files.
        ``checksum=False`` trusts the recorded size (fast; for progress displays).
        """
        if self.is_finalized():
            manifest = load_manifest(self.root)
            listed = {s.part for s in manifest.shards}
            return listed if parts is None else listed & set(parts)
        wanted = range(self.num_parts) if parts is None else parts
        for part in wanted:
            self._check_part(part)
        return {part for part in wanted if self._marker(part, checksum=checksum) is not None}

    # -- writing ----------------------------------------------------------------------------
    def write_part(self, part: int, rows: list[dict[str, Any]] | pa.Table) -> fmt.ShardEntry:
        """Validate ``rows`` and commit them as the shard of ``part``; returns its entry."""
        self._check_part(part)
        if self.is_finalized():
            raise StoreError(f"{self.root} is finalized; it is read-only (write a new store to change it)")
        if isinstance(rows, pa.Table):
            table = conform_table(rows, self.schema)
        else:
            table = rows_to_table(list(rows), self.schema, self.topk)
        table = table.combine_chunks()
        self._validate(table, part)
        store_busy = (
            f"{self.root} is being finalized; wait for `finalize` to finish (the store is then read-only)"
        )
        part_busy = (
            f"part {part} of {self.root} is being written by another writer; give each worker distinct parts"
        )
        with (
            file_lock(
                self.root / fmt.STORE_LOCK_FILE, exclusive=False, blocking=False, busy_message=store_busy
            ),
            file_lock(
                self.root / fmt.PART_LOCK_TEMPLATE.format(part=part),
                exclusive=True,
                blocking=False,
                busy_message=part_busy,
            ),
        ):
            if self._marker(part, checksum=True) is not None:
                raise StoreError(
                    f"part {part} of {self.root} is already committed; skip it (see committed_parts())"
                )
            return self._write_locked(part, table)

    def _validate(self, table: pa.Table, part: int) -> None:
        problems = fmt.batch_problems(table, kind=self.kind, topk=self.topk)
        keys = list(zip(table.column("prompt_id").to_pylist(), table.column("sample_index").to_pylist()))
        if len(set(keys)) != len(keys):
            seen: set[tuple[str, int]] = set()
            duplicate = next(k for k in keys if k in seen or seen.add(k))
            problems.append(f"(prompt_id, sample_index) {duplicate} appears twice")
        if problems:
            raise StoreError(f"refusing to write part {part}: " + "; ".join(problems[:5]))

    def _write_locked(self, part: int, table: pa.Table) -> fmt.ShardEntry:
        final = self.root / fmt.shard_file(part)
        marker_path = self.root / fmt.commit_file(part)
        # A stale marker (its file changed or vanished) goes first, so a crash below cannot leave a
        # marker that seems to describe the new file.
        marker_path.unlink(missing_ok=True)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a writer that was killed; we hold the part lock
        tmp = self.root / fmt.TEMP_SHARD_TEMPLATE.format(part=part, pid=os.getpid())
        schema = self.disk_schema.with_metadata(fmt.shard_metadata(self.store_uuid, part))
        stored = fmt.encode_table(table, self.encoding)
        try:
            with open(tmp, "wb") as f:
                with pq.ParquetWriter(f, schema, **fmt.parquet_writer_options(schema)) as writer:
                    writer.write_table(
                        stored.replace_schema_metadata(schema.metadata), fmt.row_group_rows(table)
                    )
                f.flush()
                os.fsync(f.fileno())
            digest = sha256_file(tmp)
            size = tmp.stat().st_size
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StoreError(
                f"writing part {part} of {self.root} failed ({e}); committed parts are intact, fix the cause "
                "(e.g. free disk space) and rerun to resume"
            ) from e
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        stats = part_stats(table, kind=self.kind)
        entry = fmt.ShardEntry(
            file=fmt.shard_file(part),
            part=part,
            rows=table.num_rows,
            tokens=stats["tokens"],
            bytes=size,
            sha256=digest,
        )
        marker = {**to_dict(entry), "store_uuid": self.store_uuid, "stats": stats}
        try:
            write_json_atomic(marker_path, marker)
            fsync_dir(marker_path.parent)
        except OSError as e:
            raise StoreError(
                f"committing part {part} of {self.root} failed ({e}); its shard will be rewritten on rerun"
            ) from e
        return entry

    # -- finalize ---------------------------------------------------------------------------
    def finalize(self, num_shards: int | None = None, *, wait_s: float = FINALIZE_WAIT_S) -> fmt.Manifest:
        """Commit every part into ``manifest.json`` (idempotent); refuses while parts are missing.

        Two workers finishing together may both call this: the second waits (up to ``wait_s``) for
        the first and then returns the manifest it wrote.
        """
        if self.is_finalized():
            return load_manifest(self.root)
        busy = f"writers are still active on {self.root} (or another finalize is running); wait for them to finish"
        lock = self.root / fmt.STORE_LOCK_FILE
        with file_lock(lock, exclusive=True, blocking=False, busy_message=busy, wait_s=wait_s):
            if self.is_finalized():
                return load_manifest(self.root)
            markers = {part: self._marker(part, checksum=True) for part in range(self.num_parts)}
            missing = [part for part, marker in markers.items() if marker is None]
            if missing:
                raise StoreError(self._missing_message(missing, num_shards))
            manifest = self._build_manifest([markers[p] for p in range(self.num_parts)])
            manifest.validate()
            write_json_atomic(self.root / fmt.MANIFEST_FILE, manifest.to_dict())
            fsync_dir(self.root)
            self._write_card(manifest)
            return manifest

    def _write_card(self, manifest: fmt.Manifest) -> None:
        # The dataset card (README.md) is a convenience derived from the manifest: failing to write it
        # must not fail a store whose manifest is committed.
        try:
            write_card(self.root, manifest)
        except OSError as e:
            warnings.warn(
                f"could not write the dataset card of {self.root} ({e}); run `lopd store card {self.root}`",
                stacklevel=3,
            )

    def _missing_message(self, missing: list[int], num_shards: int | None) -> str:
        message = (
            f"cannot finalize {self.root}: {len(missing)} of {self.num_parts} parts are not committed "
            f"(parts {_ranges(missing)})"
        )
        if num_shards:
            indices = sorted({part % num_shards for part in missing})
            message += (
                f"; (re)run the workers with --shard-index {_ranges(indices)} --num-shards {num_shards}"
            )
        else:
            message += "; rerun the precompute workers that own them (they skip committed parts)"
        return message

    def _build_manifest(self, markers: list[dict[str, Any]]) -> fmt.Manifest:
        shards = [
            fmt.ShardEntry(**{k: m[k] for k in ("file", "part", "rows", "tokens", "bytes", "sha256")})
            for m in markers
        ]
        h = self.header
        return fmt.Manifest(
            format=fmt.FORMAT_NAME,
            format_version=fmt.FORMAT_VERSION,
            writer_version=lightning_opd.__version__,
            created_at=self.created_at,
            store_uuid=self.store_uuid,
            store_id=self.store_id,
            kind=h["kind"],
            teacher=h.get("teacher"),
            student=h["student"],
            teacher_consistency=h.get("teacher_consistency"),
            sampling=h["sampling"],
            horizon=h["horizon"],
            prompt_set=h["prompt_set"],
            topk=h.get("topk"),
            num_parts=self.num_parts,
            columns=self.schema.names,
            shards=shards,
            stats=aggregate_stats([m["stats"] for m in markers]),
            lineage=[],
            extra=h.get("extra") or {},
            encoding=h.get("encoding"),
        )
