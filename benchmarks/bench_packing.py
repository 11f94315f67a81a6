"""Padding waste on long-tailed rollout lengths: padded vs token-budgeted vs packed micro-batches.

    OMP_NUM_THREADS=2 python benchmarks/bench_packing.py          # ~2 minutes on 2 cores
    python benchmarks/bench_packing.py --device cuda              # + peak memory

Table 1 (arithmetic, no model): response lengths drawn like reasoning rollouts (lognormal, median
3,000 tokens, sigma ``--sigma``, capped at 16,384; 256-token prompts), 4,096 rows in stream order,
micro-batched by stage two's own ``micro_batches``: computed / useful tokens for ``--micro-batch-size``
2/4/8 (padded to the longest), for a token budget (padded, grouped by length), and packed.

Table 2 (a real stage-two update, toy student, side by side in one run): the same distribution scaled
down 32x (median ~94 tokens, cap 512) so that it runs on a CPU; each configuration updates on the same
64 rows; step time as a ratio to padded micro-batches of 4, and on CUDA the peak allocated memory.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_opd.packing import micro_batches, row_length  # noqa: E402
from lightning_opd.stage2.objectives import make_objective  # noqa: E402
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients  # noqa: E402
from lightning_opd.toy.models import STUDENT_SPEC, build_model  # noqa: E402
from lightning_opd.toy.tokenizer import build_char_tokenizer  # noqa: E402


def rollout_rows(n: int, *, median: float, cap: int, prompt: int, sigma: float, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = np.minimum(cap, np.maximum(1, rng.lognormal(np.log(median), sigma, n).astype(int)))
    return [
        {
            "prompt_id": f"p{i}", "sample_index": 0,
            "prompt_ids": rng.integers(4, vocab, prompt).tolist(),
            "response_ids": rng.integers(4, vocab, int(length)).tolist(),
            "teacher_logprobs": (-rng.exponential(1.0, int(length))).tolist(),
            "behavior_logprobs": (-rng.exponential(1.0, int(length))).tolist(),
        }
        for i, length in enumerate(lengths)
    ]  # fmt: skip


def waste(rows, horizon: int, step_rows: int, **kwargs) -> float:
    """Computed / useful tokens over all steps of ``step_rows`` rows."""
    computed = useful = 0
    for s in range(0, len(rows), step_rows):
        for group in micro_batches(rows[s : s + step_rows], horizon=horizon, **kwargs):
            ls = [row_length(r, horizon) for r in group]
            useful += sum(ls)
            computed += sum(ls) if kwargs.get("packed") else len(ls) * max(ls)
    return computed / useful


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=3, help="timed updates per configuration; the fastest counts")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")

    full = rollout_rows(4096, median=3000, cap=16384, prompt=256, sigma=args.sigma, vocab=1000)
    step_rows, horizon = 64, 16384
    print(
        f"1. computed / useful tokens, lognormal(median 3000, sigma {args.sigma}) capped at 16k, 256-token prompts"
    )
    print("micro-batching | computed / useful")
    for mbs in (2, 4, 8):
        print(
            f"padded, {mbs} rows in stream order | {waste(full, horizon, step_rows, micro_batch_size=mbs):.2f}"
        )
    budget = 4 * 3256
    print(
        f"padded, budget {budget} tokens, by length | {waste(full, horizon, step_rows, micro_batch_size=4, max_tokens=budget):.2f}"
    )
    print(
        f"packed, budget {budget} tokens | {waste(full, horizon, step_rows, micro_batch_size=4, max_tokens=budget, packed=True):.2f}"
    )
    print(
        f"packed, 4 rows in stream order | {waste(full, horizon, step_rows, micro_batch_size=4, packed=True):.2f}"
    )

    tokenizer = build_char_tokenizer()
    model = build_model(STUDENT_SPEC, tokenizer, seed=0).to(args.device).train()
    rows = rollout_rows(64, median=3000 / 32, cap=512, prompt=8, sigma=args.sigma, vocab=len(tokenizer))
    small_budget = 4 * 110
    configs = {
        "padded, 4 rows": {},
        f"padded, budget {small_budget}": {"max_tokens": small_budget},
        "packed, 4 rows": {"packed": True},
        f"packed, budget {small_budget}": {"max_tokens": small_budget, "packed": True},
    }
    print(f"\n2. one update of 64 rows (toy student, median ~94 tokens, cap 512), {args.device}")
    print("micro-batching | step s | time vs padded | computed tokens" + (" | peak GiB" if cuda else ""))
    reference = None
    for name, kwargs in configs.items():
        inputs = UpdateInputs(
            make_objective("lightning"), horizon=512, pad_id=0, micro_batch_size=4, **kwargs
        )
        times, stats = [], None
        trained = copy.deepcopy(model)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.steps + 1):
            start = time.perf_counter()
            stats = accumulate_gradients(trained, rows, inputs, step=1)
            trained.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        best = min(times)
        reference = reference or best
        line = f"{name} | {best:.3f} | {best / reference:.2f} | {stats['computed_tokens']}"
        if cuda:
            line += f" | {torch.cuda.max_memory_allocated() / 2**30:.2f}"
        print(line)


if __name__ == "__main__":
    main()
