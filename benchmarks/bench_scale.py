"""Stage two at scale: what gradient checkpointing and LoRA cost in time and save in memory, and how
the memory plan (``lopd plan``) compares with what is measured. Side by side in one run.

    python benchmarks/bench_scale.py                      # CPU: small Qwen3/Gemma3 shapes, ~1 minute
    python benchmarks/bench_scale.py --device cuda        # GPU: Gemma-3-270M's shape, bf16, real peaks

Table 1, activations: the bytes autograd saves in the decoder layers of a whole student (every
layer, ``--batch x --seq`` tokens) against the plan's estimate, which measured one layer at 32 and 64
tokens and extrapolated. Table 2, steps: one stage-two update (``accumulate_gradients`` + AdamW) for
full / LoRA x checkpointing off / on: step time as a ratio to full + off, tokens/s, and on CUDA the
peak allocated memory (``torch.cuda.max_memory_allocated``) next to the plan's estimate for it
(the plan's 2 GiB CUDA-context allowance left out, as the allocator does not see the context).
Random weights: memory and time do not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_opd.plan import GIB, OVERHEAD_GIB, Choice, architecture_shapes, estimate, layer_saved_bytes  # noqa: E402
from lightning_opd.scale import ScaleFlags, make_adamw, prepare_student, trainable_parameters  # noqa: E402
from lightning_opd.stage2.objectives import make_objective  # noqa: E402
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients  # noqa: E402


def gemma3_270m() -> Gemma3TextConfig:
    """Gemma-3-270M's shape (18 layers, 640 wide, 262,144-token vocabulary, 5 local : 1 global)."""
    return Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, max_position_embeddings=32768,
    )  # fmt: skip


def small_configs() -> dict:
    return {
        "qwen3 (256 wide, 4 layers)": Qwen3Config(
            vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        ),
        "gemma3 (192 wide, 6 layers)": Gemma3TextConfig(
            vocab_size=8192, hidden_size=192, intermediate_size=512, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=1, head_dim=48, sliding_window=128,
            layer_types=(["sliding_attention"] * 2 + ["full_attention"]) * 2,
        ),
    }  # fmt: skip


def build(config, device):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).train()


def activation_table(configs: dict, args) -> list[dict]:
    rows = []
    ids = torch.randint(3, 8000, (args.batch, args.seq))
    for name, config in configs.items():
        shapes = architecture_shapes(config, args.precision)
        for ckpt in (False, True):
            model = build(config, "cpu")
            if ckpt:
                model = prepare_student(model, ScaleFlags(gradient_checkpointing=True)).train()
            measured = layer_saved_bytes(model, ids, args.precision)
            planned = estimate(shapes, Choice(0, False, ckpt, tokens=ids.numel()), 1)["activations"]
            rows.append(
                {"model": name, "checkpointing": ckpt, "tokens": ids.numel(), "measured_MiB": measured / 2**20,
                 "planned_MiB": planned / 2**20, "planned/measured": planned / measured}
            )  # fmt: skip
    return rows


def training_rows(vocab: int, batch: int, seq: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    prompt = seq // 8
    return [
        {
            "prompt_id": f"p{i}", "sample_index": 0,
            "prompt_ids": torch.randint(3, vocab, (prompt,), generator=g).tolist(),
            "response_ids": torch.randint(3, vocab, (seq - prompt,), generator=g).tolist(),
            "teacher_logprobs": (-torch.rand(seq - prompt, generator=g) * 5).tolist(),
            "behavior_logprobs": (-torch.rand(seq - prompt, generator=g) * 5).tolist(),
        }
        for i in range(batch)
    ]  # fmt: skip


def step_table(config, args) -> list[dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    shapes = architecture_shapes(config, args.precision)
    rows_in = training_rows(config.vocab_size, args.batch, args.seq)
    inputs = UpdateInputs(
        objective=make_objective("lightning"), horizon=args.seq, pad_id=0, micro_batch_size=args.batch
    )
    dtype = {"bf16": torch.bfloat16}.get(args.precision)
    base = build(config, "cpu")
    out = []
    try:
        import peft  # noqa: F401

        ranks = (0, args.lora_rank)
    except ImportError:  # a bare GPU machine may lack it: carry a peft wheel (gpu_check.sh)
        print("peft is not installed: the LoRA rows are skipped")
        ranks = (0,)
    for lora, ckpt in ((r, c) for r in ranks for c in (False, True)):
        model = prepare_student(copy.deepcopy(base), ScaleFlags(gradient_checkpointing=ckpt, lora_rank=lora))
        model = model.to(device).train()
        optimizer = make_adamw(trainable_parameters(model), lr=1e-6)
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                accumulate_gradients(model, rows_in, inputs, step=i + 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        planned = estimate(shapes, Choice(lora, False, ckpt, tokens=args.batch * args.seq), 1)["total"]
        row = {
            "lora_rank": lora, "checkpointing": ckpt, "step_s": min(times),
            "tokens_per_s": args.batch * args.seq / min(times),
            "planned_GiB": planned / GIB - OVERHEAD_GIB,
        }  # fmt: skip
        if cuda:
            row["peak_GiB"] = torch.cuda.max_memory_allocated() / GIB
            row["planned/peak"] = row["planned_GiB"] / row["peak_GiB"]
        out.append(row)
        del model, optimizer
        if cuda:
            torch.cuda.empty_cache()
    for row in out:
        row["time_vs_full"] = row["step_s"] / out[0]["step_s"]
    return out


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", choices=["bf16", "no"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=0, help="tokens per row (default: 512 on CPU, 2048 on CUDA)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps; the fastest counts")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    args.seq = args.seq or (2048 if cuda else 512)
    print(
        f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, precision {args.precision}, torch {torch.__version__}"
    )
    print("\n1. activations saved in the decoder layers, whole student vs plan")
    acts = activation_table(small_configs(), args)
    print_table(acts)
    config = gemma3_270m() if cuda else small_configs()["qwen3 (256 wide, 4 layers)"]
    print(
        f"\n2. one update, {args.batch} x {args.seq} tokens, {'Gemma-3-270M shape' if cuda else 'qwen3 small'}"
    )
    steps = step_table(config, args)
    print_table(steps)
    if args.json:
        Path(args.json).write_text(json.dumps({"activations": acts, "steps": steps}, indent=2))


if __name__ == "__main__":
    main()
