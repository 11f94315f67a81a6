"""Where things are in a store and which format version it is: names, path templates, versions."""

from __future__ import annotations

import math
import warnings
from datetime import datetime, timezone
from typing import Any

from lightning_opd.errors import StoreVersionError

FORMAT_NAME = "lightning-opd-logprob-store"
FORMAT_VERSION = "1.4"  # major.minor: a new major breaks readers, a new minor only adds
# 1.1 added the optional sampling_logprobs column (1.0 stores lack it and stay readable).
# 1.2 added the optional compact log-prob encoding (manifest ``encoding``; 1.0/1.1 stores have none).
# 1.3 added the optional compact top-k layout (``encoding.topk_scale``): sorted ids stored as gaps and
# coarser top-k log-probs. A 1.2 reader refuses such a manifest (its ``encoding`` check wants the exact
# 1.2 section) instead of misreading the columns; 1.3 stores without it read as 1.2 stores do.
# 1.4 added ``max_num_batched_tokens`` to the engine records (``sampling.engine``,
# ``extra.scoring_engine``). A 1.3 reader refuses such a record (it wanted exactly four keys); 1.4
# readers accept engine keys they do not know, so later additions stay readable.

MANIFEST_FILE = "manifest.json"
DATA_DIR = "data"
COMMITS_DIR = "commits"
LOCKS_DIR = "locks"
# `lopd precompute` keeps its intermediate rollouts store here, inside the final store's directory.
ROLLOUTS_SUBDIR = "_rollouts"
SHARD_TEMPLATE = "data/part-{part:06d}.parquet"
COMMIT_TEMPLATE = "commits/part-{part:06d}.json"
HEADER_FILE = "commits/header.json"
PART_LOCK_TEMPLATE = "locks/part-{part:06d}.lock"
STORE_LOCK_FILE = "locks/store.lock"
HEADER_LOCK_FILE = "locks/header.lock"
# Temporary shard names start with a dot so that `data/*.parquet` globs (polars, duckdb, datasets)
# never pick up a half-written file.
TEMP_SHARD_TEMPLATE = "data/.part-{part:06d}.parquet.tmp-{pid}"

KIND_ROLLOUTS = "rollouts"  # sampled by the student, not yet scored by the teacher
KIND_SCORED = "scored"  # every sampled token carries the teacher's log-prob
KINDS = (KIND_ROLLOUTS, KIND_SCORED)
FINISH_REASONS = ("stop", "length")
# How a consumer should treat the teacher's mass outside the stored top-k (METHODS.md §7): rescale the
# k log-probs to sum to one, or keep 1 - sum(top-k) as one extra "tail" bucket. The stored values
# are full-vocabulary log-probs either way, so the tail mass is always recoverable.
TOPK_TAIL_TREATMENTS = ("renormalize", "tail_bucket")

# Log-probs computed in fp32 can land a hair above zero (log-sum-exp rounding); anything larger
# means a bug upstream (e.g. a bf16 log-softmax, or logits stored instead of log-probs).
LOGPROB_TOLERANCE = 1e-4

# Keys of the Parquet key-value metadata in every shard: a shard copied in from another store is
# detected by its store_uuid even when its schema matches.
META_FORMAT = b"lopd.format"
META_FORMAT_VERSION = b"lopd.format_version"
META_STORE_UUID = b"lopd.store_uuid"
META_PART = b"lopd.part"


def shard_metadata(store_uuid: str, part: int) -> dict[bytes, bytes]:
    """Key-value metadata written into every shard's footer."""
    return {
        META_FORMAT: FORMAT_NAME.encode(),
        META_FORMAT_VERSION: FORMAT_VERSION.encode(),
        META_STORE_UUID: store_uuid.encode(),
        META_PART: str(part).encode(),
    }


def shard_file(part: int) -> str:
    return SHARD_TEMPLATE.format(part=part)


def commit_file(part: int) -> str:
    return COMMIT_TEMPLATE.format(part=part)


def parse_version(version: Any) -> tuple[int, int]:
    """'1.0' -> (1, 0); anything else raises StoreVersionError."""
    parts = str(version).split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise StoreVersionError(f"store format version must look like 'MAJOR.MINOR', got {version!r}")
    return int(parts[0]), int(parts[1])


def check_format_version(found: Any, *, where: str = "store") -> None:
    """Refuse another major version (saying what to do); warn about a newer minor version."""
    major, minor = parse_version(found)
    our_major, our_minor = parse_version(FORMAT_VERSION)
    if major > our_major:
        raise StoreVersionError(
            f"{where} uses logprob store format {found}, this lightning-opd reads {our_major}.x; "
            "upgrade lightning-opd (pip install -U lightning-opd) to read it"
        )
    if major < our_major:
        raise StoreVersionError(
            f"{where} uses logprob store format {found}, this lightning-opd reads {our_major}.x; "
            "re-run `lopd precompute` to rebuild it with this version"
        )
    if minor > our_minor:
        warnings.warn(
            f"{where} uses logprob store format {found}, newer than {FORMAT_VERSION}; reading it, "
            "but columns or manifest fields added since will be ignored (upgrade lightning-opd)",
            stacklevel=2,
        )


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# JSON value checks shared by the validators (a bool is not an int in a manifest).
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
