"""Reusable logprob datasets: the store tools, one module each.

- ``filter``: a new store of the rollouts that pass a row filter;
- ``merge``: one new store from compatible scored stores;
- ``compact``: a new store with 16-bit log-probs (format 1.2);
- ``export``: a Hugging Face datasets directory, or plain Parquet + manifest + README;
- ``diff``: what differs between two stores' manifests;
- ``card``: the dataset card (README.md) that makes a store a Hugging Face dataset;
- ``histogram``: token-level distributions (notebooks, ``lopd store plot``);
- ``derive``: what the tools that write derived stores share (output checks, sources, lineage).

The rules for derived stores' identity, lineage and merging are part of the format
(``storage_schemas.logprob_store_v1``, "Derived stores"). This module gathers the tools' public
names for ``from lightning_opd.store import tools``.
"""

from lightning_opd.store.card import card_text, write_card
from lightning_opd.store.compact import compact_header, compact_store
from lightning_opd.store.derive import (
    check_output_dir,
    derived_content_hash,
    manifest_sha256,
    read_checked_shard,
    source_record,
)
from lightning_opd.store.diff import DIFF_SECTIONS, DiffRow, diff_manifests, diff_stores, format_diff
from lightning_opd.store.export import EXPORT_FORMATS, export_hf, export_parquet, export_readme
from lightning_opd.store.filter import FilterSpec, filter_header, filter_store, finish_reasons_from_flags
from lightning_opd.store.histogram import DEFAULT_LOGRATIO_EDGES, Histogram, logratio_histogram
from lightning_opd.store.merge import merge_plan, merge_problems, merge_stores
from storage_schemas.logprob_store_v1 import (
    DERIVED_HASH_PREFIX,
    EXPORT_MANIFEST,
    LINEAGE_KEY,
    MERGE_MUST_MATCH,
)

__all__ = [
    "finish_reasons_from_flags",
    "DERIVED_HASH_PREFIX",
    "DEFAULT_LOGRATIO_EDGES",
    "DIFF_SECTIONS",
    "EXPORT_FORMATS",
    "EXPORT_MANIFEST",
    "LINEAGE_KEY",
    "MERGE_MUST_MATCH",
    "DiffRow",
    "FilterSpec",
    "Histogram",
    "card_text",
    "check_output_dir",
    "compact_header",
    "compact_store",
    "derived_content_hash",
    "diff_manifests",
    "diff_stores",
    "export_hf",
    "export_parquet",
    "export_readme",
    "filter_header",
    "filter_store",
    "format_diff",
    "logratio_histogram",
    "manifest_sha256",
    "merge_plan",
    "merge_problems",
    "merge_stores",
    "read_checked_shard",
    "source_record",
    "write_card",
]
