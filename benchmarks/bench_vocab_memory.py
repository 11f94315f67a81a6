"""Peak activation memory as the vocabulary grows, at a fixed batch: ours against naive full logits.

    .venv/bin/python benchmarks/bench_vocab_memory.py                 # CPU: ~3 minutes on 2 cores
    .venv/bin/python benchmarks/bench_vocab_memory.py --device cuda

Three paths, each ours (the library call) and naive (``model(...).logits`` -> fp32 ``log_softmax`` ->
gather, the code one writes first), on the same model, batch and tokens:

  scoring  stage-one teacher scoring: ``logprobs.score_sequences`` (sampled tokens + top-k)
  stage2   one stage-two micro-batch: ``stage2.step.accumulate_gradients``, default objective
           (``lightning``); ``stage2-topk`` the same with the ``topk`` objective (student log-probs
           at the teacher's top-k ids)
  sft      one stage-zero step: ``stage0.sft.response_nll`` + backward
  embedding  a reference, the same for ours and naive: a step whose loss reads only the input
           embedding (``embed(ids).square().mean()`` + backward). It shows the V x H fp32 gradient
           that autograd allocates for the (tied) embedding before adding it into ``.grad``: every
           PyTorch training step pays it, whatever its loss, and it grows with the vocabulary like
           the weights do. "minus embedding" rows subtract it from the training paths.

What is measured is the peak *activation* memory: the peak above what is held once the model is
built and, for the training paths, once one warm-up step has allocated the gradients and the AdamW
state (gradients are zeroed in place, not freed). Weights, gradients and optimizer state grow with
the vocabulary (the embedding and the LM head are ``V x H``); they are excluded here on purpose.
Every case runs in a fresh subprocess. CUDA: ``torch.cuda.max_memory_allocated`` above
``memory_allocated``. CPU: the peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs``) above the resident set at the reset, with glibc's mmap threshold pinned so
that a freed large buffer goes back to the system instead of hiding in the heap.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_opd.scoring import score_sequences  # noqa: E402
from lightning_opd.stage0.sft import SFTExample, collate_sft, response_nll  # noqa: E402
from lightning_opd.stage2.batch import collate  # noqa: E402
from lightning_opd.stage2.objectives import TokenBatch, make_objective  # noqa: E402
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients  # noqa: E402

PATHS = ("stage2", "sft", "scoring", "stage2-topk", "embedding")
TRAINING_PATHS = ("stage2", "sft", "stage2-topk")
TOPK = 8


def build(vocab: int, args) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return Qwen2ForCausalLM(config).to(device=args.device, dtype=dtype)


def make_rows(vocab: int, batch: int, prompt: int, response: int, seed: int = 0) -> list[dict]:
    """Store-shaped rows (what stage two reads); every response is exactly ``response`` tokens."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        rows.append(
            {
                "prompt_id": f"p{i}",
                "sample_index": 0,
                "prompt_ids": torch.randint(1, vocab, (prompt,), generator=g).tolist(),
                "response_ids": torch.randint(1, vocab, (response,), generator=g).tolist(),
                "behavior_logprobs": (-torch.rand(response, generator=g) * 10).tolist(),
                "teacher_logprobs": (-torch.rand(response, generator=g) * 10).tolist(),
                "teacher_topk_ids": torch.randint(1, vocab, (response, TOPK), generator=g).tolist(),
                "teacher_topk_logprobs": (-torch.rand(response, TOPK, generator=g) * 10).tolist(),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# The naive code, at the same shapes: full [B, S, V] logits, fp32 log-softmax, gather


def naive_logprobs(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, S-1, V] fp32


def naive_scoring(model, rows, args) -> None:
    batch = collate(rows, args.response, 0).to(args.device)
    with torch.inference_mode():
        logp = naive_logprobs(model, batch)
        logp.gather(-1, batch.targets.unsqueeze(-1))
        logp.topk(TOPK, dim=-1)


def naive_stage2(model, rows, args, objective) -> None:
    topk = TOPK if objective.needs_topk else None
    batch = collate(rows, args.response, 0, topk).to(args.device)
    logp = naive_logprobs(model, batch)
    student = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.mask
    student_topk = logp.gather(-1, batch.teacher_topk_ids) if topk else None
    tokens = TokenBatch(
        student_logprobs=student,
        teacher_logprobs=batch.teacher_logprobs,
        behavior_logprobs=batch.behavior_logprobs,
        mask=batch.mask,
        teacher_topk_ids=batch.teacher_topk_ids,
        teacher_topk_logprobs=batch.teacher_topk_logprobs,
        student_topk_logprobs=student_topk,
    )
    objective(tokens)[0].backward()


def naive_sft(model, batch) -> None:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    where = labels != -100
    (-logp[where].gather(-1, labels[where].unsqueeze(-1)).mean()).backward()


# ---------------------------------------------------------------------------------------------
# One case, in its own process


def run_case(path: str, impl: str, vocab: int, args) -> int:
    """Peak activation bytes of one (path, impl, vocab); called in a fresh subprocess."""
    model = build(vocab, args)
    rows = make_rows(vocab, args.batch, args.prompt, args.response)
    objective = make_objective("topk" if path == "stage2-topk" else "lightning")
    inputs = UpdateInputs(
        objective, horizon=args.response, pad_id=0, topk=TOPK if objective.needs_topk else None
    )
    inputs.micro_batch_size, inputs.chunk_size = args.batch, args.chunk_size
    examples = [SFTExample(r["prompt_ids"], r["response_ids"]) for r in rows]
    sft_batch = {k: v.to(args.device) for k, v in collate_sft(examples, 0).items()}

    def step(which_rows, which_sft):
        if path == "embedding":  # the same for ours and naive: see the module docstring
            return model.get_input_embeddings()(which_sft["input_ids"]).float().square().mean().backward()
        if path == "scoring":
            if impl == "naive":
                return naive_scoring(model, which_rows, args)
            prompts = [r["prompt_ids"] for r in which_rows]
            responses = [r["response_ids"] for r in which_rows]
            return score_sequences(
                model, prompts, responses, topk=TOPK, chunk_size=args.chunk_size, max_tokens_per_batch=1 << 30
            )
        if path == "sft":
            return (
                naive_sft(model, which_sft)
                if impl == "naive"
                else response_nll(model, which_sft, chunk_size=args.chunk_size).backward()
            )
        if impl == "naive":
            return naive_stage2(model, which_rows, args, objective)
        return accumulate_gradients(model, which_rows, inputs, step=1)

    if path == "scoring":
        model.eval()
    else:
        # Setup = weights + gradients + AdamW state: one warm-up step on a tiny batch allocates them.
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        tiny = make_rows(vocab, 1, 4, 4, seed=1)
        tiny_sft = {k: v.to(args.device) for k, v in collate_sft([SFTExample([1, 2], [3, 4])], 0).items()}
        step(tiny, tiny_sft)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(rows, sft_batch)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    step(rows, sft_batch)
    return (_status_kb("VmHWM") - base) * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status; the CPU memory measure needs Linux")


def spawn(path: str, impl: str, vocab: int) -> int:
    # Allocations above 64 KiB are mmapped and unmapped on free, so RSS follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--case", path, impl, str(vocab), *sys.argv[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"case {path}/{impl}/{vocab} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vocabs", type=int, nargs="+", default=[32768, 131072, 262144])
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--impls", nargs="+", choices=("ours", "naive"), default=["ours", "naive"])
    p.add_argument("--batch", type=int, default=2, help="2 x 576 keeps naive at 262k near 5 GB")
    p.add_argument("--prompt", type=int, default=32)
    # 2 x 544 = 1088 response tokens: more than one 1024-position chunk at 32k, so every vocabulary
    # runs at the library's logit cap (with fewer tokens 32k would be below it and look cheaper).
    p.add_argument("--response", type=int, default=544, help="sequence = prompt + response tokens")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=1024, help="the library's default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the table here")
    p.add_argument("--case", nargs=3, metavar=("PATH", "IMPL", "VOCAB"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    if args.case:
        path, impl, vocab = args.case
        print(json.dumps({"peak_bytes": run_case(path, impl, int(vocab), args)}))
        return
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"device {device}; batch {args.batch} x {args.prompt + args.response} tokens "
        f"({args.response} response), {args.layers}L-{args.hidden}H, chunk {args.chunk_size}; "
        "peak activation MiB above weights + grads + AdamW state"
    )
    table: dict[str, dict[str, dict[int, float]]] = {}
    for path in args.paths:
        for impl in args.impls:
            for vocab in args.vocabs:
                mib = spawn(path, impl, vocab) / 2**20
                table.setdefault(path, {}).setdefault(impl, {})[vocab] = mib
                print(f"  {path:12s} {impl:6s} vocab {vocab:7d}: {mib:8.1f} MiB", flush=True)
    lo, hi = min(args.vocabs), max(args.vocabs)
    head = "".join(f"{v // 1024:>8d}k" for v in args.vocabs)
    print(f"\n{'path':12s} {'impl':6s}{head} {f'{hi // 1024}k/{lo // 1024}k':>9s}")
    for path, impls in table.items():
        for impl, row in impls.items():
            cells = "".join(f"{row[v]:9.1f}" for v in args.vocabs)
            print(f"{path:12s} {impl:6s}{cells} {row[hi] / max(row[lo], 1e-9):8.2f}x")
        if len(impls) == 2:
            cells = "".join(f"{impls['ours'][v] / max(impls['naive'][v], 1e-9):9.2f}x" for v in args.vocabs)
            print(f"{'':12s} {'ours/naive':6s}{cells[4:]}")
    if "embedding" in table:
        # What the training paths hold above the embedding's own gradient transient.
        ref = table["embedding"]["ours" if "ours" in table["embedding"] else "naive"]
        for path in (p for p in TRAINING_PATHS if p in table and "ours" in table[path]):
            row = {v: table[path]["ours"][v] - ref[v] for v in args.vocabs}
            cells = "".join(f"{row[v]:9.1f}" for v in args.vocabs)
            print(f"{path:12s} {'ours':6s}{cells} {row[hi] / max(row[lo], 1e-9):8.2f}x  minus embedding")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "mib": table}, indent=1))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
