"""Stage-two model FLOPs utilisation on a GPU: our chunked step against naive full logits.

    python benchmarks/bench_gpu_mfu.py                 # CUDA: a ~0.5B Qwen2-shaped model, ~1-2 minutes
    python benchmarks/bench_gpu_mfu.py --smoke         # CPU: a tiny model, checks the code paths only

One stage-two update (``stage2.step.accumulate_gradients`` with the default objective + AdamW step)
on random weights built from a Qwen2-0.5B-shaped config (24 layers, 896 wide, vocabulary 151,936,
tied head; bf16 weights), ``--batch`` rows of ``--prompt + --response`` tokens, against the same step
with naive code (``model(...).logits`` -> fp32 ``log_softmax`` -> gather -> the same objective).

MFU = 6 · params · tokens / step time / peak, with params every parameter counted once (the tied
head included: its matmul runs at every trained position), tokens every position of the batch
(prompt + response), and peak the device's dense bf16 rate: 989 TFLOPS for an H100 SXM or an H200
(NVIDIA's spec sheets, without sparsity), 312 for an A100; ``--peak-tflops`` for anything else. The
6·N·T rule counts no attention FLOPs, so at 2k tokens it slightly understates the work done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_opd.stage2.batch import collate  # noqa: E402
from lightning_opd.stage2.objectives import TokenBatch, make_objective  # noqa: E402
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0}


def model_config(smoke: bool) -> Qwen2Config:
    if smoke:
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        return Qwen2Config(vocab_size=4096, num_key_value_heads=1, tie_word_embeddings=True, **shape)
    return Qwen2Config(  # Qwen2-0.5B's shape
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def make_rows(vocab: int, args) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "prompt_id": f"p{i}",
            "sample_index": 0,
            "prompt_ids": torch.randint(1, vocab, (args.prompt,), generator=g).tolist(),
            "response_ids": torch.randint(1, vocab, (args.response,), generator=g).tolist(),
            "behavior_logprobs": (-torch.rand(args.response, generator=g) * 10).tolist(),
            "teacher_logprobs": (-torch.rand(args.response, generator=g) * 10).tolist(),
        }
        for i in range(args.batch)
    ]


def naive_step(model, rows, inputs: UpdateInputs, device) -> None:
    batch = collate(rows, inputs.horizon, inputs.pad_id).to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    student = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.mask
    tokens = TokenBatch(
        student_logprobs=student,
        teacher_logprobs=batch.teacher_logprobs,
        behavior_logprobs=batch.behavior_logprobs,
        mask=batch.mask,
    )
    inputs.objective(tokens)[0].backward()


def time_steps(name: str, step, model, optimizer, args) -> dict:
    cuda = args.device.startswith("cuda")
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
            if i == args.warmup:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"method": name, "step_s": min(times), "peak_GiB": peak}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model and batch: checks the code on CPU")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--response", type=int, default=1792, help="sequence = prompt + response tokens")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps; the fastest counts")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.prompt, args.response, args.warmup, args.steps = 2, 8, 24, 1, 1
    return args


def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke to check the code on CPU")
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).train()
    params = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows = make_rows(config.vocab_size, args)
    tokens = args.batch * (args.prompt + args.response)
    inputs = UpdateInputs(make_objective("lightning"), horizon=args.response, pad_id=0)
    inputs.micro_batch_size, inputs.chunk_size = args.batch, args.chunk_size
    results = [
        time_steps(
            "ours (chunked)",
            lambda: accumulate_gradients(model, rows, inputs, step=1),
            model,
            optimizer,
            args,
        ),
        time_steps(
            "naive (full logits)", lambda: naive_step(model, rows, inputs, device), model, optimizer, args
        ),
    ]
    peak = peak_tflops(args)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"device {name}; {params / 1e6:.0f}M params, vocab {config.vocab_size}, {args.batch} x "
        f"{args.prompt + args.response} tokens ({args.response} trained), {dtype}; "
        f"peak {peak or 'unknown'} TFLOPS dense bf16"
    )
    print(f"{'method':22s} {'step s':>8s} {'tokens/s':>10s} {'TFLOPS':>8s} {'MFU':>6s} {'peak GiB':>9s}")
    for r in results:
        r["tokens_per_s"] = tokens / r["step_s"]
        r["tflops"] = 6 * params * tokens / r["step_s"] / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
        mfu = f"{r['mfu']:6.1%}" if r["mfu"] is not None else "   n/a"
        print(
            f"{r['method']:22s} {r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {mfu} "
            f"{r['peak_GiB']:9.2f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": name, "params": params, "tokens": tokens, "peak_tflops": peak}
        Path(args.json).write_text(json.dumps({**meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
