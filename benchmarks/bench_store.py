"""Storage cost and write/read throughput of the logprob store on random-but-realistic data.

    .venv/bin/python benchmarks/bench_store.py [--tokens 300000] [--seed 0]

Data: 150k vocabulary; token ids Zipf-distributed with frequent tokens at low ids (as BPE merge order
gives); 4 samples per prompt sharing a ~300-token prompt; response lengths spread around 2k tokens.
Sampled-token log-probs follow a peaked distribution (most tokens near-certain under temperature 0.7,
a long tail of uncertain ones); the teacher agrees up to noise; top-k log-probs decay from a dominant
first candidate. Bytes are file bytes (prompts included) per response token.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lightning_opd.store.arrow import rows_to_table
from lightning_opd.store.reader import open_store
from lightning_opd.store.writer import StoreWriter
from storage_schemas import logprob_store_v1 as fmt

VOCAB = 150_000
SAMPLES_PER_PROMPT = 4


def zipf_ids(rng: np.random.Generator, shape) -> np.ndarray:
    return np.minimum(rng.zipf(1.15, shape) - 1, VOCAB - 1).astype(np.int32)


def sampled_logprobs(rng: np.random.Generator, n: int) -> np.ndarray:
    confident = rng.random(n) < 0.6
    values = np.where(confident, -rng.exponential(0.003, n), -rng.exponential(0.9, n))
    return np.maximum(values, -25.0).astype(np.float32)


def topk_arrays(rng: np.random.Generator, response: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(response)
    ids = zipf_ids(rng, (n, k))
    ids[:, 0] = response  # the sampled token is usually the teacher's top candidate
    top1 = np.clip(1 - rng.exponential(0.15, n), 0.05, 0.9999)
    decay = rng.uniform(0.3, 0.8, (n, 1))
    rest = (1 - top1)[:, None] * (1 - decay) * decay ** np.arange(k - 1)[None, :]
    probs = np.concatenate([top1[:, None], rest], axis=1)
    return ids, np.log(probs).astype(np.float32)


def make_rows(total_tokens: int, topk: int | None, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows, tokens, prompt_index = [], 0, 0
    while tokens < total_tokens:
        prompt = zipf_ids(rng, int(rng.integers(150, 450)))
        for sample in range(SAMPLES_PER_PROMPT):
            length = int(np.clip(rng.lognormal(7.4, 0.6), 16, 16_384))
            response = zipf_ids(rng, length)
            behavior = sampled_logprobs(rng, length)
            noise = rng.normal(0, 0.4, length) * (behavior < -0.05)
            teacher = np.minimum(behavior + noise - rng.exponential(0.05, length), 0).astype(np.float32)
            row = {
                "prompt_id": f"prompt-{prompt_index:07d}",
                "sample_index": sample,
                "prompt_ids": prompt,
                "response_ids": response,
                "behavior_logprobs": behavior,
                "teacher_logprobs": teacher,
                "finish_reason": "length" if length == 16_384 else "stop",
            }
            if topk:
                row["teacher_topk_ids"], row["teacher_topk_logprobs"] = topk_arrays(rng, response, topk)
            rows.append(row)
            tokens += length
        prompt_index += 1
    return rows


def header(topk: int | None) -> dict:
    return {
        "kind": "scored",
        "teacher": {
            "path": "bench-teacher",
            "fingerprint": "t" * 64,
            "tokenizer_fingerprint": "k",
            "dtype": "bfloat16",
        },
        "student": {
            "path": "bench-student",
            "fingerprint": "s" * 64,
            "tokenizer_fingerprint": "k",
            "dtype": "bfloat16",
        },
        "teacher_consistency": {"consistent": True, "allowed": False, "note": "benchmark"},
        "sampling": {
            "backend": "synthetic",
            "n": 4,
            "temperature": 0.7,
            "top_p": 0.9,
            "max_new_tokens": 16384,
            "seed": 0,
        },
        "horizon": 16384,
        "prompt_set": {"source": "synthetic", "content_hash": "bench", "num_prompts": 0},
        "topk": {"k": topk, "tail_treatment": "tail_bucket", "note": ""} if topk else None,
        "extra": {},
    }


def encodings(schema: pa.Schema) -> dict[str, dict]:
    ours = fmt.parquet_writer_options(schema)
    floats_only = {
        **ours,
        "use_byte_stream_split": [p for p in ours["use_byte_stream_split"] if "ids" not in p],
    }
    return {
        "pyarrow defaults (snappy, dict)": {},
        "zstd + dict everywhere": {"compression": "zstd"},
        "ours, BSS on floats only": floats_only,
        "ours (zstd, dict on strings, BSS)": ours,
    }


def write_bytes(table: pa.Table, options: dict) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=fmt.row_group_rows(table), **options)
    return buffer.getvalue()


def column_bytes(data: bytes) -> dict[str, int]:
    """Compressed bytes per top-level column, summed over row groups."""
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            column = meta.row_group(g).column(c)
            name = column.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + column.total_compressed_size
    return sizes


def bench_sizes(tokens: int, seed: int) -> tuple[list[tuple[str, str, float]], dict[str, dict[str, float]]]:
    results, breakdown = [], {}
    for label, k in (("sampled token", None), ("top-k k=8", 8), ("top-k k=20", 20)):
        schema = fmt.store_schema("scored", topk=k)
        table = rows_to_table(make_rows(tokens, k, seed), schema, k)
        response_tokens = int(fmt.list_lengths(table.column("response_ids").combine_chunks()).sum())
        for name, options in encodings(schema).items():
            data = write_bytes(table, options)
            results.append((label, name, len(data) / response_tokens))
        breakdown[label] = {col: size / response_tokens for col, size in column_bytes(data).items()}
    return results, breakdown


def bench_throughput(tokens: int, seed: int) -> list[tuple[str, float, float, float]]:
    results = []
    for label, k in (("sampled token", None), ("top-k k=20", 20)):
        rows = make_rows(tokens, k, seed)
        n_tokens = sum(len(r["response_ids"]) for r in rows)
        half = len(rows) // 2
        with tempfile.TemporaryDirectory() as tmp:
            writer = StoreWriter(Path(tmp) / "store", header(k), num_parts=2, topk=k)
            start = time.perf_counter()
            writer.write_part(0, rows[:half])
            writer.write_part(1, rows[half:])
            writer.finalize()
            write_s = time.perf_counter() - start
            store = open_store(Path(tmp) / "store")
            start = time.perf_counter()
            for _ in store.iter_batches():
                pass
            batches_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in store.iter_rows():
                pass
            rows_s = time.perf_counter() - start
        results.append((label, n_tokens / write_s, n_tokens / batches_s, n_tokens / rows_s))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500_000, help="response tokens per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="benchmarks/results", help="directory for the CSV table and PNG chart"
    )
    args = parser.parse_args()

    print(f"Bytes per response token (~{args.tokens:,} response tokens per configuration, vocab {VOCAB:,})")
    print(f"{'signal':<15} {'encoding':<36} {'B/token':>8}")
    sizes, breakdown = bench_sizes(args.tokens, args.seed)
    for label, name, per_token in sizes:
        print(f"{label:<15} {name:<36} {per_token:>8.2f}")
    from lightning_opd.reporting.plots import write_benchmark

    by_signal: dict[str, dict] = {}
    for label, name, per_token in sizes:
        by_signal.setdefault(label, {"signal": label})[name] = per_token
    write_benchmark(
        args.out,
        "store_bytes_per_token",
        list(by_signal.values()),
        x="signal",
        ys=[name for name in dict.fromkeys(n for _, n, _ in sizes)],
        title="store size by encoding",
        ylabel="bytes per response token",
    )

    print("\nOur encoding, bytes per response token by column")
    for label, columns in breakdown.items():
        print(f"{label:<15} " + ", ".join(f"{c} {b:.2f}" for c, b in columns.items() if b >= 0.01))

    print(
        "\nStoreWriter / reader throughput (validation, sha256 and fsync included), response tokens per second"
    )
    print(f"{'signal':<15} {'write':>12} {'iter_batches':>14} {'iter_rows':>12}")
    for label, write, batches, rows in bench_throughput(args.tokens, args.seed):
        print(f"{label:<15} {write:>12,.0f} {batches:>14,.0f} {rows:>12,.0f}")


if __name__ == "__main__":
    main()
