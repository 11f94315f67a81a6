"""Bytes per response token of real stores, per column, and what other encodings would give.

    .venv/bin/python benchmarks/bench_store_size.py STORE [STORE ...] [--variants]

For each store: total shard bytes / response tokens, and per column the compressed bytes of its
column chunks (Parquet footer metadata) per response token. "sampled-token" is every column except
the top-k ones: the size the store would have without --topk (each column chunk is compressed on its
own, so the sum is exact). "files" adds the shard footers (a few KB each: they dominate tiny stores). ``--variants`` rewrites each store's data in memory under
other encodings (float32 / fixed16 / float16 log-probs; BYTE_STREAM_SPLIT, dictionary or DELTA
encodings of token ids; zstd levels) and prints their sizes and the largest log-prob error; then, for
a top-k store, other layouts of the two top-k columns (rank order vs ids sorted as gaps, an explicit
rank permutation, coarser top-k steps; the format's 1.3 compact top-k among them) with the largest
top-k log-prob error of each.
"""

from __future__ import annotations

import argparse
import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lightning_opd.store.reader import open_store
from storage_schemas import logprob_store_v1 as fmt
from storage_schemas.logprob_store_v1 import encoding

ID_COLUMNS = ("prompt_ids", "response_ids", "teacher_topk_ids")


def column_bytes(paths: list[Path]) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over every row group of ``paths``."""
    sizes: dict[str, int] = defaultdict(int)
    for path in paths:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                sizes[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
    return dict(sizes)


def store_report(root: Path) -> None:
    store = open_store(root)
    tokens = store.num_tokens
    total = sum(s.bytes for s in store.manifest.shards)
    sizes = column_bytes(store.shard_paths)
    topk = sum(v for k, v in sizes.items() if k in fmt.TOPK_COLUMNS)
    encoding = store.manifest.encoding
    print(
        f"\n{root}: {store.num_rows} rollouts, {tokens} response tokens, top-k {store.topk}, "
        f"encoding {encoding['logprobs'] if encoding else 'float32'}"
    )
    print(f"  {'column':<24} {'bytes':>10} {'B/token':>9}")
    for name in store.manifest.columns:
        print(f"  {name:<24} {sizes.get(name, 0):>10} {sizes.get(name, 0) / tokens:>9.2f}")
    data = sum(sizes.values())
    # Each shard also carries a footer (schema, column metadata: a few KB), which dominates tiny stores.
    print(f"  {'column data':<24} {data:>10} {data / tokens:>9.2f}")
    print(f"  {'files (data + footers)':<24} {total:>10} {total / tokens:>9.2f}")
    if store.topk:
        print(f"  {'sampled-token data':<24} {data - topk:>10} {(data - topk) / tokens:>9.2f}")


def _leaves(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    while pa.types.is_list(column.type):
        column = pc.list_flatten(column)
    return column.to_numpy()


def _with_leaf(table: pa.Table, leaf: pa.DataType) -> pa.Table:
    """``table`` (float32 log-probs) with its log-prob leaves cast to ``leaf`` (e.g. float16)."""
    schema = encoding._logprob_schema(table, leaf)
    return table.cast(schema)


def _options(schema: pa.Schema, *, ids: str, level: int) -> dict:
    options = fmt.parquet_writer_options(schema)
    options["compression_level"] = level
    id_paths = [p for p in options["use_byte_stream_split"] if p.split(".")[0] in ID_COLUMNS]
    if ids == "dictionary":
        options["use_byte_stream_split"] = [p for p in options["use_byte_stream_split"] if p not in id_paths]
        options["use_dictionary"] = options["use_dictionary"] + id_paths
    elif ids in ("DELTA_BINARY_PACKED", "PLAIN"):
        options["use_byte_stream_split"] = [p for p in options["use_byte_stream_split"] if p not in id_paths]
        options["column_encoding"] = {p: ids for p in id_paths}
    return options


def _size(table: pa.Table, options: dict) -> dict[str, int]:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=fmt.row_group_rows(table), **options)
    meta = pq.ParquetFile(io.BytesIO(sink.getvalue())).metadata
    sizes: dict[str, int] = defaultdict(int)
    for g in range(meta.num_row_groups):
        for c in range(meta.row_group(g).num_columns):
            chunk = meta.row_group(g).column(c)
            sizes[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
    sizes["_file"] = len(sink.getvalue())
    return sizes


def variants(root: Path) -> None:
    store = open_store(root)
    table = pa.Table.from_batches(list(store.iter_batches()), schema=store.schema)  # float32 log-probs
    tokens = store.num_tokens
    exact = {
        n: _leaves(table.column(n)).astype(np.float64) for n in fmt.LOGPROB_COLUMNS if n in table.column_names
    }
    fixed16 = fmt.fixed16_encoding()
    tables = {
        "float32": table,
        "fixed16": fmt.encode_table(table, fixed16),
        "float16": _with_leaf(table, pa.float16()),
    }
    errors = {"float32": 0.0}
    decoded = fmt.decode_batch(tables["fixed16"], fixed16)
    errors["fixed16"] = max(np.abs(_leaves(decoded.column(n)) - v).max() for n, v in exact.items())
    errors["float16"] = max(
        np.abs(_leaves(tables["float16"].column(n)).astype(np.float64) - v).max() for n, v in exact.items()
    )
    print(f"\n{root}: variants (bytes per response token; max |error| of log-probs in nats)")
    print(
        f"  {'log-probs':<9} {'ids':<20} {'zstd':>4} {'total':>7} {'sampled':>8} {'top-k':>7} {'ids':>6} {'max err':>9}"
    )
    runs = [
        ("float32", "BYTE_STREAM_SPLIT", 1),
        ("fixed16", "BYTE_STREAM_SPLIT", 1),
        ("float16", "BYTE_STREAM_SPLIT", 1),
    ]
    runs += [("fixed16", ids, 1) for ids in ("dictionary", "DELTA_BINARY_PACKED", "PLAIN")]
    runs += [("fixed16", "BYTE_STREAM_SPLIT", level) for level in (3, 9, 19)]
    for values, ids, level in runs:
        data = tables[values]
        sizes = _size(data, _options(data.schema, ids=ids, level=level))
        topk = sum(v for k, v in sizes.items() if k in fmt.TOPK_COLUMNS)
        id_bytes = sum(v for k, v in sizes.items() if k in ID_COLUMNS)
        print(
            f"  {values:<9} {ids:<20} {level:>4} {sizes['_file'] / tokens:>7.2f} "
            f"{(sizes['_file'] - topk) / tokens:>8.2f} {topk / tokens:>7.2f} {id_bytes / tokens:>6.2f} "
            f"{errors[values]:>9.2e}"
        )


def _topk_leaves(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(outer offsets, inner offsets, ids [n, k], log-probs [n, k]) of a table without null top-k rows."""
    outer, inner, ids, logprobs, _ = encoding._topk_lists(table)
    return outer, inner, ids.reshape(-1, k).astype(np.int64), logprobs.reshape(-1, k).astype(np.float64)


def _rank_deltas(codes: np.ndarray) -> np.ndarray:
    """[n, k] codes -> rank 1's code, then differences from the previous rank mod 2^16 (the 1.2 layout)."""
    out = codes.copy()
    out[:, 1:] = np.diff(codes, axis=1)
    return (out % 2**16).astype(np.uint16)


def topk_layouts(table: pa.Table, k: int) -> list[tuple[str, dict[str, pa.Array], str, float]]:
    """Other layouts of the top-k columns: (name, columns replacing them, id encoding, max |error|)."""
    outer, inner, ids, lp = _topk_leaves(table, k)

    def nested(values: np.ndarray, leaf: pa.DataType) -> pa.Array:
        return encoding._nested(outer, inner, values.ravel(), leaf, None)

    def codes(scale: int) -> np.ndarray:
        return np.clip(np.rint(-lp * scale), 0, fmt.FIXED16_MAX_CODE).astype(np.int64)

    def error(scale: int) -> float:
        return float(np.abs(-codes(scale) / scale - lp).max())

    order = np.argsort(ids, axis=1, kind="stable")  # sorted slot j holds rank order[j]
    sorted_ids = np.take_along_axis(ids, order, 1)
    gaps = sorted_ids.copy()
    gaps[:, 1:] = np.diff(sorted_ids, axis=1)
    rank_ids = nested(ids.astype(np.int32), pa.int32())
    layouts = []
    for scale in (2048, 256, 64, 32):
        name = (
            "rank order, fixed16 rank deltas (1.2)" if scale == 2048 else f"rank order, 1/{scale} rank deltas"
        )
        values = nested(_rank_deltas(codes(scale)), pa.uint16())
        layouts.append(
            (name, {"teacher_topk_ids": rank_ids, "teacher_topk_logprobs": values}, "split", error(scale))
        )
    values = nested(_rank_deltas(codes(2048)), pa.uint16())
    layouts.append(
        (
            "rank order, ids PLAIN",
            {"teacher_topk_ids": rank_ids, "teacher_topk_logprobs": values},
            "plain",
            error(2048),
        )
    )
    layouts.append(
        (
            "rank order, 1/32, ids PLAIN",
            {
                "teacher_topk_ids": rank_ids,
                "teacher_topk_logprobs": nested(_rank_deltas(codes(32)), pa.uint16()),
            },
            "plain",
            error(32),
        )
    )
    for scale in (2048, 32):
        columns = {
            "teacher_topk_ids": nested(gaps.astype(np.int32), pa.int32()),
            "teacher_topk_logprobs": nested(_rank_deltas(codes(scale)), pa.uint16()),
            "topk_rank": nested(order.astype(np.uint8), pa.uint8()),  # the rank order, stored explicitly
        }
        layouts.append(
            (f"sorted gaps + rank permutation, 1/{scale} rank deltas", columns, "split", error(scale))
        )
    for scale in (2048, 256, 64, 32, 16):
        encoded = fmt.encode_table(
            table.select(list(fmt.TOPK_COLUMNS)), fmt.fixed16_encoding(topk_scale=scale)
        )
        columns = {name: encoded.column(name).combine_chunks() for name in fmt.TOPK_COLUMNS}
        layouts.append((f"1.3 compact top-k, topk_scale {scale}", columns, "split", error(scale)))
    return layouts


def topk_variants(root: Path) -> None:
    store = open_store(root)
    if not store.topk:
        return
    table = pa.Table.from_batches(list(store.iter_batches()), schema=store.schema)
    table = table.filter(pc.is_valid(table.column("teacher_topk_ids")))
    tokens = store.num_tokens
    base = fmt.encode_table(table, fmt.fixed16_encoding())  # sampled-token columns as 1.2 compact stores them
    rest = base.drop_columns(list(fmt.TOPK_COLUMNS))
    print(
        f"\n{root}: top-k layouts on fixed16 stores (bytes per response token; max |error| of top-k log-probs)"
    )
    print(f"  {'layout':<50} {'total':>7} {'top-k':>7} {'ids':>6} {'values':>7} {'max err':>9}")
    for name, columns, ids, error in topk_layouts(table, store.topk):
        data = rest
        for column, array in columns.items():
            data = data.append_column(column, pa.chunked_array([array]))
        options = _options(data.schema, ids="BYTE_STREAM_SPLIT", level=1)
        if ids == "plain":
            split = options["use_byte_stream_split"]
            options["use_byte_stream_split"] = [p for p in split if not p.startswith("teacher_topk_ids.")]
            options["column_encoding"] = {p: "PLAIN" for p in split if p.startswith("teacher_topk_ids.")}
        sizes = _size(data, options)
        topk = sum(v for c, v in sizes.items() if c in columns)
        id_bytes = sizes["teacher_topk_ids"] + sizes.get("topk_rank", 0)
        print(
            f"  {name:<50} {sum(v for c, v in sizes.items() if c != '_file') / tokens:>7.2f} {topk / tokens:>7.2f} "
            f"{id_bytes / tokens:>6.2f} {sizes['teacher_topk_logprobs'] / tokens:>7.2f} {error:>9.2e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", type=Path)
    parser.add_argument("--variants", action="store_true", help="also size other encodings (in memory)")
    args = parser.parse_args()
    for root in args.stores:
        store_report(root)
        if args.variants:
            variants(root)
            topk_variants(root)


if __name__ == "__main__":
    main()
