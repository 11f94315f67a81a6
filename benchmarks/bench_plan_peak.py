"""``lopd plan``'s peak against the measured peak of real training steps, on the CPU.

    OMP_NUM_THREADS=2 python benchmarks/bench_plan_peak.py            # ~10 minutes on 2 cores
    python benchmarks/bench_plan_peak.py --shapes toy --lengths 8192  # one point

Each point runs in a fresh process: build the student (random weights), then two stage-two updates of
two single-row micro-batches of ``length`` tokens (bf16 autocast over fp32 weights, AdamW), so the
steady state (weights, moments, the first micro-batch's gradients and the second one's activations at
once) is reached. Measured peak = the process's peak resident memory (``VmHWM``) minus its resident
memory before the student was built. glibc is told to serve every allocation above 64 KiB by ``mmap``
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the process at once and the resident size follows
the live tensors. Planned = the plan's total for one GPU without its CUDA-context allowance.

AdamW is the fused implementation here (as on CUDA, where lopd uses it): the CPU default (foreach)
allocates parameter-sized temporaries during the step that no CUDA run has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("toy", "gemma3-270m", "qwen3-0.4b")
LENGTHS = {"toy": (4096, 8192, 16384), "gemma3-270m": (256, 512, 1024), "qwen3-0.4b": (512, 1024, 2048)}


def config_of(shape: str):
    from transformers import Qwen3Config

    if shape == "toy":
        from lightning_opd.toy.models import STUDENT_SPEC, build_model
        from lightning_opd.toy.tokenizer import build_char_tokenizer

        return build_model(STUDENT_SPEC, build_char_tokenizer(), 0).config
    if shape == "gemma3-270m":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_scale import gemma3_270m

        return gemma3_270m()
    return Qwen3Config(  # a Qwen3-0.6B-like shape at half the depth
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=14,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    )  # fmt: skip


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(shape: str, length: int) -> dict:
    """One point, in this process (the parent runs each in a fresh one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_opd.plan import GIB, OVERHEAD_GIB, Choice, architecture_shapes, estimate
    from lightning_opd.stage2.objectives import make_objective
    from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients, apply_update

    config = config_of(shape)
    planned = estimate(architecture_shapes(config, "bf16"), Choice(0, False, False, tokens=length), 1)
    g = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt_id": f"p{i}", "sample_index": 0, "prompt_ids": [5, 6, 7, 8],
            "response_ids": torch.randint(4, config.vocab_size, (length - 4,), generator=g).tolist(),
            "teacher_logprobs": [-1.0] * (length - 4), "behavior_logprobs": [-1.2] * (length - 4),
        }
        for i in range(2)
    ]  # fmt: skip
    inputs = UpdateInputs(objective=make_objective("lightning"), horizon=length, pad_id=0, micro_batch_size=1)
    base = _rss_kib("VmRSS")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for step in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            accumulate_gradients(model, rows, inputs, step=step + 1)
        apply_update(None, model, optimizer, scheduler, grad_clip=1.0, step=step)
    measured = (_rss_kib("VmHWM") - base) * 1024
    plan = planned["total"] - OVERHEAD_GIB * GIB
    return {"shape": shape, "tokens": length, "measured_GiB": measured / GIB, "planned_GiB": plan / GIB,
            "planned/measured": plan / measured}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--lengths", default="", help="comma list (default: three per shape)")
    p.add_argument("--json", default=None)
    p.add_argument("--_point", default=None, help=argparse.SUPPRESS)  # shape:length, in the child
    args = p.parse_args(argv)
    if args._point:
        shape, length = args._point.split(":")
        print(json.dumps(measure(shape, int(length))))
        return
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "PYTHONPATH": str(ROOT),
    }
    results = []
    print("shape | tokens | measured GiB | planned GiB | planned/measured")
    for shape in args.shapes.split(","):
        lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else LENGTHS[shape]
        for length in lengths:
            out = subprocess.run(
                [sys.executable, __file__, "--_point", f"{shape}:{length}"],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{shape} | {length} | {r['measured_GiB']:.3f} | {r['planned_GiB']:.3f} | {r['planned/measured']:.2f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
