"""The store's dataset card: ``README.md`` at the store root, so that a store is also a Hugging Face
dataset (``datasets.load_dataset(store_dir)``, or the Hub after ``hf upload``).

The YAML front matter names one ``default`` config whose data files are ``data/*.parquet`` (the
temporary shards in ``data/`` start with a dot and never match; ``_rollouts/``, ``commits/`` and
``locks/`` are outside the pattern) and the features of the shards' Arrow schema. The prose says
what the store is and how to read it. Everything is derived from the manifest, which stays the
authority: the card is not in the manifest, not checksummed, and can be rewritten at any time
(``lopd store card STORE``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa

from lightning_opd.store.files import fsync_dir
from lightning_opd.store.reader import load_manifest
from storage_schemas import logprob_store_v1 as fmt

CARD_FILE = "README.md"
DATA_FILES = f"{fmt.DATA_DIR}/*.parquet"

# Arrow leaf types of the store schema -> the `dtype` names of datasets' Value features.
_DTYPES = {
    pa.string(): "string",
    pa.large_string(): "string",
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def _feature(arrow_type: pa.DataType) -> dict[str, Any]:
    """One feature in the card's YAML. Lists as ``sequence``: every datasets release reads that
    spelling (4.x and later also write ``list``, which 3.x cannot read)."""
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        inner = _feature(arrow_type.value_type)
        return {"sequence": inner.get("dtype", inner)}
    if arrow_type not in _DTYPES:
        raise ValueError(f"no datasets feature for Arrow type {arrow_type}")
    return {"dtype": _DTYPES[arrow_type]}


def features_yaml(schema: pa.Schema) -> list[dict[str, Any]]:
    """The ``dataset_info.features`` list for ``schema``, as datasets' YAML has it."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """A tiny YAML writer for the card's nested dicts/lists of scalars (no PyYAML dependency)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}:")
                lines += _yaml(item, indent + 2)
            else:
                lines.append(f"{pad}{key}: {_scalar(item)}")
    else:
        for item in value:
            inner = _yaml(item, indent + 2) if isinstance(item, (dict, list)) else [f"{pad}  {_scalar(item)}"]
            lines.append(f"{pad}- {inner[0].lstrip()}")
            lines += inner[1:]
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def card_metadata(manifest: fmt.Manifest) -> dict[str, Any]:
    """The front matter: the default config, the features, tags. No ``splits`` sizes: datasets wants
    their decoded byte size too, which the manifest does not record (the prose gives the counts)."""
    return {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
        "dataset_info": {"features": features_yaml(manifest.schema())},  # on disk: codes in a compact store
        "tags": ["lightning-opd", "logprob-store", "on-policy-distillation"],
    }


def _model(section: dict[str, Any] | None) -> str:
    if not section:
        return "none (a rollouts store: not scored yet)"
    name = Path(str(section.get("path", "?"))).name or section.get("path")
    dtype = f", {section['dtype']}" if section.get("dtype") else ""
    return f"`{name}` (fingerprint `{section.get('fingerprint')}`{dtype})"


def _encoding(encoding: dict[str, Any] | None) -> str:
    if not encoding:
        return "float32 log-probs"
    text = f"`{encoding.get('logprobs')}`: log-prob = -code / {encoding.get('scale')} (uint16 codes)"
    if encoding.get("topk_scale"):
        text += (
            f"; top-k ids sorted and stored as gaps, top-k log-probs in steps of 1/{encoding['topk_scale']}"
        )
    return text + " — lopd's readers decode them; `lopd store export --to parquet` writes float32"


def _facts(manifest: fmt.Manifest) -> list[tuple[str, str]]:
    s, stats = manifest.sampling, manifest.stats
    topk = manifest.topk or {}
    lineage = (manifest.extra or {}).get(fmt.LINEAGE_KEY) or []
    facts = [
        ("kind", f"`{manifest.kind}`"),
        ("teacher", _model(manifest.teacher)),
        ("student (sampled the rollouts)", _model(manifest.student)),
        (
            "sampling",
            f"{s.get('backend')} {s.get('backend_version', '')}".strip()
            + f", n={s.get('n')}, temperature={s.get('temperature')}, top_p={s.get('top_p')}, "
            f"max_new_tokens={s.get('max_new_tokens')}, seed={s.get('seed')}",
        ),
        ("horizon", f"{manifest.horizon} tokens"),
        ("top-k", f"k={topk['k']}, tail `{topk.get('tail_treatment')}`" if topk else "none"),
        (
            "format",
            f"`{fmt.FORMAT_NAME}` {manifest.format_version} (written by lightning-opd {manifest.writer_version})",
        ),
        ("encoding", _encoding(manifest.encoding)),
        ("rows (rollouts)", f"{stats.num_rollouts:,} in {len(manifest.shards)} shards"),
        (
            "response tokens",
            f"{stats.num_response_tokens:,} (mean {stats.mean_response_length:.1f}, max {stats.max_response_length})",
        ),
        ("truncated at the horizon", f"{100 * stats.trunc_rate:.1f}%"),
        (
            "prompt set",
            f"{manifest.prompt_set.get('num_prompts')} prompts, `{manifest.prompt_set.get('content_hash')}`",
        ),
        ("store_id", f"`{manifest.store_id}`"),
        ("created", manifest.created_at),
    ]
    if (manifest.extra or {}).get("scoring_backend"):
        facts.append(("teacher scoring", str(manifest.extra["scoring_backend"])))
    if lineage:
        facts.append(("derived", "; ".join(_lineage(entry) for entry in lineage)))
    return facts


def _lineage(entry: Any) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    sources = ", ".join(f"`{str(src.get('store_id', '?'))[:12]}`" for src in entry.get("sources") or [])
    return f"{entry.get('op', '?')} of {sources or 'unknown stores'}"


def card_text(manifest: fmt.Manifest) -> str:
    """The whole ``README.md`` of the store described by ``manifest``."""
    what = (
        "every sampled token carries the teacher's log-prob"
        if manifest.kind == fmt.KIND_SCORED
        else "not scored by a teacher yet (`lopd score` fills in the teacher's log-probs)"
    )
    lines = ["---", *_yaml(card_metadata(manifest)), "---", ""]
    lines += [
        f"# Logprob store `{manifest.store_id[:12]}`",
        "",
        f"Rollouts sampled by the student and stored by lightning-opd for offline on-policy distillation: "
        f"one row per rollout; {what}.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in _facts(manifest)],
        "",
        "## Reading it",
        "",
        "`manifest.json` is the authority: it lists every shard with its sha256, and lightning-opd's "
        "readers trust only the shards it lists. This card is derived from it (`lopd store card DIR` "
        "rewrites it).",
        "",
        "```python",
        "from lightning_opd.store import open_store    # checks the manifest, decodes compact log-probs",
        'store = open_store("STORE_DIR")',
        "",
        "import polars as pl",
        'df = pl.scan_parquet("STORE_DIR/data/*.parquet")',
        "",
        "import duckdb",
        "duckdb.sql(\"SELECT prompt_id, len(response_ids) FROM 'STORE_DIR/data/*.parquet'\")",
        "",
        "import datasets",
        'ds = datasets.load_dataset("STORE_DIR", split="train")   # or the Hub repo id after `hf upload`',
        "```",
        "",
        "`lopd store verify STORE_DIR` checks every shard's checksum, schema and rows "
        "(run it on a downloaded copy before training on it).",
        "",
        "## Columns",
        "",
        "| column | type | description |",
        "|---|---|---|",
    ]
    lines += [f"| `{f.name}` | `{f.type}` | {fmt.COLUMN_DESCRIPTIONS[f.name]} |" for f in manifest.schema()]
    return "\n".join(lines) + "\n"


def write_card(root: str | Path, manifest: fmt.Manifest | None = None) -> Path:
    """Write ``root/README.md`` for the finalized store at ``root`` (atomically: temp file, rename)."""
    root = Path(root)
    manifest = manifest or load_manifest(root)
    path = root / CARD_FILE
    tmp = root / f".{CARD_FILE}.tmp-{os.getpid()}"
    tmp.write_text(card_text(manifest), encoding="utf-8")
    os.replace(tmp, path)
    fsync_dir(root)
    return path
