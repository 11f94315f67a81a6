"""Derived stores (lopd store filter / merge / export): identity, lineage and merge rules."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from .layout import parse_version
from .manifest import Manifest

# ---------------------------------------------------------------------------------------------
# Derived stores (lopd store filter / merge / export): identity, lineage, merge rules
# ---------------------------------------------------------------------------------------------
#
# Identity: a derived store's ``prompt_set.content_hash`` is replaced by ``derived_content_hash``
# (operation, source store ids, parameters), so its store_id differs from every source and the same
# command on the same sources always yields the same id.
#
# Lineage: the writer does not pass ``Manifest.lineage`` through (it writes ``[]``), so the record of
# how a store was derived lives in ``manifest.extra[LINEAGE_KEY]``: one entry per operation, each
# naming its sources (store_id, path, manifest sha256, and their own lineage, nested).
#
# Merge rules (checked field by field, refusing with both values named): ``MERGE_MUST_MATCH`` below —
# same format major, kind 'scored', teacher and student (fingerprint, tokenizer fingerprint, dtype),
# teacher_consistency, top-k (k, tail treatment), sampling temperature and top_p, horizon (stage two
# cuts every store at one horizon) and columns. Prompt sets, sampling seed, n and backend may differ;
# each source's values are kept in its lineage entry. The merged header records ``sampling.seed`` /
# ``backend`` as a list when they differ, and ``sampling.n`` as the most samples any prompt set now
# has. Sources sharing a prompt set get their ``sample_index`` shifted by the n of earlier sources
# with that prompt set, so (prompt_id, sample_index) stays unique; prompt ids of different prompt
# sets are kept as they are (lineage maps each output part to its source).

LINEAGE_KEY = "lineage"  # in manifest.extra
DERIVED_HASH_PREFIX = "derived1:"
EXPORT_MANIFEST = "lopd_manifest.json"  # the manifest's name in a `lopd store export --to parquet` copy


def derived_content_hash(op: str, source_ids: list[str], params: dict[str, Any]) -> str:
    """The prompt_set.content_hash of a derived store: a function of what it was derived from."""
    canonical = json.dumps(
        {"op": op, "sources": source_ids, "params": params}, sort_keys=True, separators=(",", ":")
    )
    return DERIVED_HASH_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()


# (field name in messages, how to read it from a manifest); every source must agree on each.
MERGE_MUST_MATCH: tuple[tuple[str, Callable[[Manifest], Any]], ...] = (
    ("format major version", lambda m: parse_version(m.format_version)[0]),
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
    # Parts of one store share one encoding: convert with `lopd store compact` first.
    ("encoding", lambda m: m.encoding),
)
