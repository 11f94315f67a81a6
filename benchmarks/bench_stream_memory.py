"""Stage two's host memory per process: the shuffle buffer bounded in rows vs in bytes, one process vs
one rank of several (each rank decodes only its own rows of every global batch).

    OMP_NUM_THREADS=2 python benchmarks/bench_stream_memory.py        # ~1-2 minutes on 2 cores

A synthetic store with top-20 teacher columns and reasoning-like response lengths (lognormal, median
``--median`` tokens, capped at 4x that) is streamed through ``RolloutStream`` in global batches of
``--batch`` rows, as ``lopd train`` reads it, for ``--steps`` steps. Per configuration, side by side
in one run: the decoded rows a process holds at most (the stream's own byte accounting, and numpy's
peak through tracemalloc), rows decoded per step, and the reading time per step as a ratio to the
row-bounded single process (what stage two did before the byte bound: a row count only, and every
rank decoding every row; ``--buffer-rows`` scales ``lopd train``'s 4,096 down with the store). Rank 0 of N is run in this one process: the other ranks do the same, on their rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train_step import header  # noqa: E402
from lightning_opd.store import RolloutStream, StoreWriter, open_store  # noqa: E402

TOPK = 20


def write_store(root: Path, rows: int, median: int, vocab: int, parts: int = 8) -> Path:
    rng = np.random.default_rng(0)
    cap = 4 * median
    lengths = np.minimum(cap, np.maximum(1, rng.lognormal(np.log(median), 0.8, rows).astype(int)))
    head = header(cap)
    head["topk"] = {"k": TOPK, "tail_treatment": "tail_bucket", "note": "synthetic"}
    writer = StoreWriter(root, head, num_parts=parts, topk=TOPK)
    per = rows // parts
    for part in range(parts):
        batch = []
        for i in range(part * per, (part + 1) * per):
            n = int(lengths[i])
            batch.append(
                {
                    "prompt_id": f"p{i}",
                    "sample_index": 0,
                    "prompt_ids": rng.integers(4, vocab, 256),
                    "response_ids": rng.integers(4, vocab, n),
                    "behavior_logprobs": -rng.exponential(1.0, n),
                    "teacher_logprobs": -rng.exponential(1.0, n),
                    "finish_reason": "stop" if n < cap else "length",
                    "teacher_topk_ids": rng.integers(4, vocab, (n, TOPK)),
                    "teacher_topk_logprobs": -np.sort(rng.exponential(2.0, (n, TOPK)), axis=1),
                }
            )
        writer.write_part(part, batch)
    writer.finalize()
    return root


def measure(store, *, rows: int, mib: int | None, world: int, batch: int, steps: int) -> dict:
    stream = RolloutStream(
        [store],
        shuffle_buffer=rows,
        shuffle_buffer_bytes=None if mib is None else mib * 2**20,
        seed=0,
        rank=0,
        world_size=world,
    )
    tracemalloc.start()
    held = decoded = 0
    started = time.perf_counter()
    for _ in range(steps):
        got = [next(stream) for _ in range(batch)]
        decoded += sum("response_ids" in r for r in got)
        held = max(held, stream.held_bytes()[0])
        del got
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"held": held, "peak": peak, "decoded": decoded / steps, "time": elapsed / steps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2048, help="rollouts in the synthetic store")
    parser.add_argument("--median", type=int, default=512, help="median response length, tokens")
    parser.add_argument("--batch", type=int, default=64, help="rollouts per optimizer step (global)")
    parser.add_argument("--steps", type=int, default=24, help="steps streamed per configuration")
    parser.add_argument("--buffer-rows", type=int, default=512, help="the row bound (lopd train: 4096)")
    parser.add_argument("--mib", type=int, default=16, help="the byte bound, MiB over all processes")
    parser.add_argument("--vocab", type=int, default=151_936)
    args = parser.parse_args()
    rows = args.buffer_rows
    configs = [
        (f"{rows} rows, no byte bound, 1 process (before; every rank)", dict(rows=rows, mib=None, world=1)),
        (f"{rows} rows + {args.mib} MiB, 1 process", dict(rows=rows, mib=args.mib, world=1)),
        (f"{rows} rows, no byte bound, rank 0 of 8", dict(rows=rows, mib=None, world=8)),
        (f"{rows} rows + {args.mib} MiB, rank 0 of 8", dict(rows=rows, mib=args.mib, world=8)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(write_store(Path(tmp) / "store", args.rows, args.median, args.vocab))
        print(
            f"store: {store.num_rows} rollouts, {store.num_tokens:,} response tokens, top-{TOPK}; "
            f"global batch {args.batch}, {args.steps} steps per configuration"
        )
        results = [(name, measure(store, batch=args.batch, steps=args.steps, **kw)) for name, kw in configs]
    base = results[0][1]
    print(f"reading time of the first configuration: {1000 * base['time']:.1f} ms per step")
    print(
        f"\n{'configuration':<56} {'held MiB':>9} {'numpy peak MiB':>15} {'rows decoded/step':>18} {'read time':>10}"
    )
    for name, r in results:
        print(
            f"{name:<56} {r['held'] / 2**20:>9.1f} {r['peak'] / 2**20:>15.1f} {r['decoded']:>18.1f} "
            f"{r['time'] / base['time']:>9.2f}x"
        )


if __name__ == "__main__":
    main()
