"""Content addressing of logprob stores: a small on-disk index from store_id to where the store lives.

A store's ``store_id`` is the sha256 of its identity fields (``storage_schemas.logprob_store_v1.
compute_store_id``): two stores with the same id hold rollouts of the same student, scored by the
same teacher, on the same prompts with the same sampling. Precomputing one costs hours of GPU time,
so before writing a new store stage one asks this index whether that content already exists.

The index is a directory (default ``$LOPD_STORE_CACHE``, else ``~/.cache/lightning-opd/stores``)
with one JSON file per store id: ``<store_id>.json`` = {store_id, path, created_at, registered_at,
summary}. It only points at stores, it never holds one, so deleting it loses nothing but the
look-up. An entry is trusted only after checking that its path still holds a finalized store with
that id; stale entries are reported by ``list_stores`` and ignored by ``find_existing``.
Re-registering an id from another path replaces the entry (the newest copy wins).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_opd.config import to_dict, write_json_atomic
from lightning_opd.errors import StoreError
from lightning_opd.store.reader import LogprobStore, open_store
from storage_schemas import logprob_store_v1 as fmt

CACHE_ENV = "LOPD_STORE_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/lightning-opd/stores")
ID_CHARS = 12


def cache_dir_path(cache_dir: str | Path | None = None) -> Path:
    """The index directory: ``cache_dir`` if given, else ``$LOPD_STORE_CACHE``, else the default."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def _entry_path(store_id: str, cache_dir: str | Path | None) -> Path:
    # The id names a file, so it must be exactly what compute_store_id produces (no path tricks).
    if not (
        isinstance(store_id, str) and len(store_id) == 64 and all(c in "0123456789abcdef" for c in store_id)
    ):
        raise StoreError(f"store_id must be 64 lowercase hex characters, got {store_id!r}")
    return cache_dir_path(cache_dir) / f"{store_id}.json"


@dataclass
class RegistryEntry:
    """One index file; ``valid`` says whether ``path`` still holds a finalized store with this id."""

    store_id: str
    path: str
    created_at: str
    registered_at: str
    summary: dict[str, Any]
    valid: bool = False


def _summary(manifest: fmt.Manifest) -> dict[str, Any]:
    """What a person choosing among cached stores wants to see without opening them."""
    return {
        "kind": manifest.kind,
        "rows": manifest.stats.num_rollouts,
        "tokens": manifest.stats.num_response_tokens,
        "horizon": manifest.horizon,
        "topk": manifest.topk_k,
        "teacher": (manifest.teacher or {}).get("fingerprint", "")[:ID_CHARS] or None,
        "student": (manifest.student or {}).get("fingerprint", "")[:ID_CHARS] or None,
        "prompts": manifest.prompt_set.get("num_prompts"),
        "derived": bool((manifest.extra or {}).get("lineage")),
    }


def _open_quietly(root: Path) -> LogprobStore | None:
    """The store at ``root`` or None; a newer minor version's warning is irrelevant to a look-up."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return open_store(root)
        except StoreError:
            return None


def _holds(root: Path, store_id: str) -> bool:
    store = _open_quietly(root)
    return store is not None and store.store_id == store_id


def register(store_root: str | Path, cache_dir: str | Path | None = None) -> RegistryEntry:
    """Record the finalized store at ``store_root`` in the index; returns the entry written."""
    root = Path(store_root).resolve()
    store = open_store(root)  # raises a StoreError saying why when it is not a finalized store
    manifest = store.manifest
    entry = RegistryEntry(
        store_id=manifest.store_id,
        path=str(root),
        created_at=manifest.created_at,
        registered_at=fmt.utc_now(),
        summary=_summary(manifest),
        valid=True,
    )
    path = _entry_path(manifest.store_id, cache_dir)
    record = {k: v for k, v in to_dict(entry).items() if k != "valid"}
    try:
        write_json_atomic(path, record)
    except OSError as e:
        raise StoreError(
            f"cannot write the store index entry {path} ({e}); point ${CACHE_ENV} at a writable directory"
        ) from e
    return entry


def _read_entry(path: Path) -> RegistryEntry | None:
    try:
        data = json.loads(path.read_text())
        entry = RegistryEntry(
            **{k: data[k] for k in ("store_id", "path", "created_at", "registered_at", "summary")}
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a torn or foreign file in the index: ignore it, it is only a pointer
    entry.valid = entry.store_id == path.stem and _holds(Path(entry.path), entry.store_id)
    return entry


def find_existing(store_id: str, cache_dir: str | Path | None = None) -> Path | None:
    """Where a finalized store with ``store_id`` lives, or None (no entry, or the entry is stale)."""
    path = _entry_path(store_id, cache_dir)
    if not path.is_file():
        return None
    entry = _read_entry(path)
    return Path(entry.path) if entry is not None and entry.valid else None


def list_stores(cache_dir: str | Path | None = None) -> list[RegistryEntry]:
    """Every entry of the index, newest registration first, each with ``valid`` checked."""
    directory = cache_dir_path(cache_dir)
    if not directory.is_dir():
        return []
    entries = [_read_entry(p) for p in sorted(directory.glob("*.json"))]
    return sorted((e for e in entries if e is not None), key=lambda e: e.registered_at, reverse=True)


def check_not_duplicate(store_id: str, out_dir: str | Path, cache_dir: str | Path | None = None) -> None:
    """Refuse to write a store whose content already exists at another path (stage one's door).

    Writing into the directory that already holds it is fine (a resume). Raises StoreError naming
    the existing store, how to reuse it and how to override.
    """
    existing = find_existing(store_id, cache_dir)
    if existing is None or existing.resolve() == Path(out_dir).resolve():
        return
    raise StoreError(
        f"a store with the same content (store_id {store_id[:ID_CHARS]}) already exists at {existing}; "
        f"reuse it (e.g. `lopd train --stores {existing}`), or pass --allow-duplicate to write a second copy "
        f"at {out_dir}"
    )


def format_entries(entries: list[RegistryEntry]) -> str:
    """The index as an aligned table, one store per line."""
    header = ("store_id", "kind", "rows", "tokens", "horizon", "topk", "status", "path")
    lines = [
        (
            e.store_id[:ID_CHARS],
            str(e.summary.get("kind")),
            str(e.summary.get("rows")),
            str(e.summary.get("tokens")),
            str(e.summary.get("horizon")),
            str(e.summary.get("topk") or "-"),
            "ok" if e.valid else "stale",
            e.path,
        )
        for e in entries
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(cells[:-1], widths)), cells[-1]])
        for cells in [header, *lines]
    )
