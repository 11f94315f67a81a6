"""The Markdown reference of the format, generated from its definitions."""

from __future__ import annotations

import json

from .encoding import LOGPROB_COLUMNS, SUGGESTED_TOPK_SCALE, fixed16_encoding
from .layout import (
    COMMIT_TEMPLATE,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_FILE,
    KIND_SCORED,
    LOCKS_DIR,
    MANIFEST_FILE,
    META_FORMAT,
    META_FORMAT_VERSION,
    META_PART,
    META_STORE_UUID,
    SHARD_TEMPLATE,
)
from .schema import (
    COLUMN_DESCRIPTIONS,
    REWARD_COLUMN,
    ROW_GROUP_MAX_ROWS,
    ROW_GROUP_TARGET_BYTES,
    SAMPLING_COLUMN,
    TEXT_COLUMN,
    TOPK_COLUMNS,
    parquet_writer_options,
    store_schema,
)


def describe_format() -> str:
    """Markdown reference of the format (layout, columns, encodings), generated from the definitions here."""
    schema = store_schema(KIND_SCORED, topk=1, with_reward=True, with_text=True, with_sampling=True)
    optional = {*TOPK_COLUMNS, REWARD_COLUMN, TEXT_COLUMN, SAMPLING_COLUMN}
    lines = [
        f"# {FORMAT_NAME}, format {FORMAT_VERSION}",
        "",
        "```",
        f"{MANIFEST_FILE}   {HEADER_FILE}   {SHARD_TEMPLATE}   {COMMIT_TEMPLATE}   {LOCKS_DIR}/",
        "```",
        "",
        "| column | type | nullable | required | description |",
        "|---|---|---|---|---|",
    ]
    for f in schema:
        nullable = "in 'rollouts' stores" if f.name == "teacher_logprobs" else ("yes" if f.nullable else "no")
        required = "optional" if f.name in optional else "required"
        lines.append(f"| `{f.name}` | `{f.type}` | {nullable} | {required} | {COLUMN_DESCRIPTIONS[f.name]} |")
    options = parquet_writer_options(schema)
    lines += [
        "",
        f"Parquet: {options['compression']} (level {options['compression_level']}), dictionary encoding only on "
        f"string columns, BYTE_STREAM_SPLIT on numeric list leaves, row groups of about "
        f"{ROW_GROUP_TARGET_BYTES // 2**20} MiB decoded (at most {ROW_GROUP_MAX_ROWS} rows). Footer key-value "
        f"metadata: {', '.join(k.decode() for k in (META_FORMAT, META_FORMAT_VERSION, META_STORE_UUID, META_PART))}.",
        "",
        "Compact stores (format 1.2+, opt-in: `lopd precompute --compact-logprobs`, `lopd store compact`): the "
        f"log-prob columns ({', '.join(f'`{c}`' for c in LOGPROB_COLUMNS)}) hold `uint16` codes instead of "
        "`float32`, decoded as value = -code / scale nats. The manifest's `encoding` section states it: "
        f"`{json.dumps(fixed16_encoding())}`. Outside [min_logprob, 0] a value is clamped (the error bound "
        "holds only inside the range). Readers decode transparently; a store is compact or not as a whole. "
        "`encoding` joins the store's identity only when set, so older stores keep their ids.",
        "",
        "Compact top-k (format 1.3+, opt-in on top of the above: `--compact-topk-scale N`, `lopd store compact "
        "--topk-scale N`): `teacher_topk_ids` holds each position's ids sorted ascending as the first id, then "
        "the gaps to the previous id; `teacher_topk_logprobs` holds their log-probs in that id order as "
        "`uint16` codes at the coarser `topk_scale` (value = -code / topk_scale, |error| <= "
        "`topk_max_abs_error` = 0.5 / topk_scale). The rank order is not stored: readers sort each position "
        "by decreasing decoded log-prob, ties by increasing id, so entries whose codes tie may come back in "
        "another order than written (the top-k objectives are sums over the k entries and do not see it). "
        "With N = 32: "
        f"`{json.dumps({k: v for k, v in fixed16_encoding(topk_scale=SUGGESTED_TOPK_SCALE).items() if k.startswith('topk')})}`"
        " (other keys as above). A 1.2 reader refuses such a manifest; a 1.3 store without `topk_scale` "
        "is read by 1.2 as before.",
    ]
    return "\n".join(lines) + "\n"
