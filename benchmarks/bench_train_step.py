"""Stage-two speed, measured side by side in one run (ratios are what matter on noisy machines).

    .venv/bin/python benchmarks/bench_train_step.py [--layers 2 --hidden 128 --vocab 99 --rows 64 --len 64]

1. An offline OPD step (student forward + chunked log-probs + objective + backward + AdamW) vs a plain
   SFT step (cross-entropy on the same tokens, same batch). Target <= 1.1x.
2. Reader throughput: a store streamed through RolloutStream + collate on one core, in tokens/s, vs the
   tokens/s the training step consumes. The reader must never be the bottleneck.
3. Horizons: tokens processed and wall-clock for one pass over the store with truncated (10%, 25%) and
   progressive (staircase, linear) horizons, vs full.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_opd.stage0.sft import SFTExample, collate_sft, response_nll  # noqa: E402
from lightning_opd.stage2.batch import collate, student_token_batch  # noqa: E402
from lightning_opd.stage2.horizons import HorizonConfig, horizon_at  # noqa: E402
from lightning_opd.stage2.objectives import make_objective  # noqa: E402
from lightning_opd.store import RolloutStream, StoreWriter, open_store  # noqa: E402
from lightning_opd.toy.models import ToyModelSpec, build_model  # noqa: E402
from lightning_opd.toy.tokenizer import build_char_tokenizer  # noqa: E402


def synthetic_rows(n: int, prompt_len: int, resp_len: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(resp_len // 2, resp_len + 1))
        rows.append(
            {
                "prompt_id": f"p{i}",
                "sample_index": 0,
                "prompt_ids": rng.integers(4, vocab, prompt_len).tolist(),
                "response_ids": rng.integers(4, vocab, length).tolist(),
                "behavior_logprobs": (-rng.exponential(1.0, length)).astype(np.float32).tolist(),
                "teacher_logprobs": (-rng.exponential(1.0, length)).astype(np.float32).tolist(),
                "finish_reason": "stop" if length < resp_len else "length",
            }
        )
    return rows


def header(horizon: int) -> dict:
    ident = {
        "path": "bench",
        "fingerprint": "fp1:bench",
        "tokenizer_fingerprint": "tok1:bench",
        "dtype": "float32",
    }
    return {
        "kind": "scored",
        "teacher": ident,
        "student": {**ident, "sft_teacher_fingerprint": "fp1:bench"},
        "teacher_consistency": {"consistent": True, "allowed": False, "note": ""},
        "sampling": {
            "backend": "synthetic",
            "backend_version": "0",
            "n": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": horizon,
            "seed": 0,
            "behavior_logprobs": "raw_logprobs",
        },
        "horizon": horizon,
        "prompt_set": {"source": "synthetic", "content_hash": "x", "num_prompts": 0},
        "topk": None,
        "extra": {},
    }


def time_interleaved(fns: list, repeats: int) -> list[float]:
    """Median time of each function, run alternately so that machine noise hits all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--len", type=int, default=64)
    ap.add_argument("--store-rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results", help="directory for the CSV tables and PNG charts")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    spec = ToyModelSpec(
        layers=args.layers,
        hidden=args.hidden,
        heads=max(2, args.hidden // 64),
        intermediate=3 * args.hidden,
        max_positions=4096,
    )
    model = build_model(spec, tok).to(device).train()
    vocab = len(tok)
    rows = synthetic_rows(args.rows, args.prompt_len, args.len, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    objective = make_objective("lightning", sample_reduction="mean")

    opd_batch = collate(rows, args.len, tok.pad_token_id).to(device)
    sft_batch = {
        k: v.to(device)
        for k, v in collate_sft(
            [SFTExample(r["prompt_ids"], r["response_ids"]) for r in rows], tok.pad_token_id
        ).items()
    }

    def opd_step():
        loss, _ = objective(student_token_batch(model, opd_batch, needs_topk=False, chunk_size=1024))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sft_step():
        response_nll(model, sft_batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t_opd, t_sft = time_interleaved([opd_step, sft_step], args.repeats)
    tokens = int(opd_batch.attention_mask.sum())
    print(
        f"device: {device}, model {spec.describe()}, batch {args.rows} x <= {args.prompt_len}+{args.len} tokens, threads {torch.get_num_threads()}"
    )
    print("\n1. stage-two step vs plain SFT step (same batch)")
    print(f"   {'step':<22}{'median s':>10}{'tokens/s':>12}{'ratio':>8}")
    print(f"   {'SFT (cross-entropy)':<22}{t_sft:>10.4f}{tokens / t_sft:>12.0f}{1.0:>8.2f}")
    print(
        f"   {'offline OPD':<22}{t_opd:>10.4f}{tokens / t_opd:>12.0f}{t_opd / t_sft:>8.2f}   (target <= 1.10)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        store_rows = synthetic_rows(args.store_rows, args.prompt_len, args.len, vocab, seed=1)
        parts = 8
        writer = StoreWriter(Path(tmp) / "store", header(args.len), num_parts=parts)
        per = len(store_rows) // parts
        for p in range(parts):
            writer.write_part(p, store_rows[p * per : (p + 1) * per])
        writer.finalize()
        store = open_store(Path(tmp) / "store")
        torch.set_num_threads(1)
        stream = RolloutStream([store], shuffle_buffer=1024, seed=0)
        t = time.perf_counter()
        read_tokens = 0
        for _ in range(store.num_rows // args.rows):
            batch_rows = [next(stream) for _ in range(args.rows)]
            read_tokens += int(collate(batch_rows, args.len, tok.pad_token_id).attention_mask.sum())
        t_read = time.perf_counter() - t
        print("\n2. reader (RolloutStream + collate, 1 thread) vs training consumption")
        print(
            f"   reader {read_tokens / t_read:,.0f} tok/s   training step {tokens / t_opd:,.0f} tok/s   "
            f"ratio {read_tokens / t_read / (tokens / t_opd):.1f}x (must be > 1)"
        )
        torch.set_num_threads(max(1, os.cpu_count() or 1))

        print("\n3. one pass over the store with each horizon schedule (tokens and wall-clock vs full)")
        print(f"   {'horizon':<28}{'tokens':>10}{'seconds':>10}{'tokens x':>10}{'time x':>8}")
        schedules = {
            "full": HorizonConfig(),
            "TOPD 25% (fraction 0.25)": HorizonConfig(kind="fraction", fraction=0.25),
            "TOPD 10% (fraction 0.10)": HorizonConfig(kind="fraction", fraction=0.10),
            "POPD staircase": HorizonConfig(
                kind="staircase", h0=max(1, args.len // 8), dh=max(1, args.len // 8), dk=4
            ),
            "POPD linear": HorizonConfig(kind="linear", h0=max(1, args.len // 8), ramp_steps=32),
        }
        steps = min(16, store.num_rows // args.rows)
        base, horizon_rows = None, []
        for name, cfg in schedules.items():
            stream = RolloutStream([store], shuffle_buffer=1024, seed=0)
            t, n_tokens = time.perf_counter(), 0
            for step in range(steps):
                batch = collate(
                    [next(stream) for _ in range(args.rows)],
                    horizon_at(cfg, step, args.len),
                    tok.pad_token_id,
                ).to(device)
                loss, _ = objective(student_token_batch(model, batch, needs_topk=False, chunk_size=1024))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                n_tokens += int(batch.attention_mask.sum())
            elapsed = time.perf_counter() - t
            base = base or (n_tokens, elapsed)
            print(
                f"   {name:<28}{n_tokens:>10}{elapsed:>10.2f}{n_tokens / base[0]:>10.2f}{elapsed / base[1]:>8.2f}"
            )
        print(f"   ({steps} steps of {args.rows} rollouts; POPD ratios depend on the schedule constants)")
    from lightning_opd.reporting.plots import write_benchmark

    write_benchmark(
        args.out,
        "train_step",
        [
            {"step": "SFT", "seconds": t_sft, "ratio": 1.0},
            {"step": "offline OPD", "seconds": t_opd, "ratio": t_opd / t_sft},
        ],
        x="step",
        ys=["ratio"],
        title="stage-two step vs a plain SFT step (same batch)",
        ylabel="time ratio",
    )
    write_benchmark(
        args.out,
        "horizons",
        horizon_rows,
        x="horizon",
        ys=["tokens_x", "time_x"],
        title="one pass over a store, per horizon schedule (vs full)",
        ylabel="ratio to full",
    )
    print(f"\ntables and charts in {args.out}/")


if __name__ == "__main__":
    main()
