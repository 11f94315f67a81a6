"""How many tokens per engine step vLLM's scorer can take without overrunning device memory.

vLLM profiles its own memory, but ``prompt_logprobs`` (what teacher scoring reads) allocates outside
that profile, in proportion to the scheduled tokens and the vocabulary. On a GPU, an unset
``--scoring-max-num-batched-tokens`` is fitted here. Nothing here imports vLLM, so it is tested
everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_opd.stage1.vllm_backend import VLLMEngineConfig

# What vLLM's prompt_logprobs holds per scheduled token and vocabulary entry, outside the memory vLLM
# profiles for itself (measured, issue 20: ~7.5 GiB at 8k scheduled tokens and a 152k vocabulary).
PROMPT_LOGPROBS_BYTES = 6
SCORER_TOKENS_RANGE = (512, 16384)


def scoring_batched_tokens(
    vocab: int, total_bytes: int, free_bytes: int, utilization: float
) -> tuple[int, str]:
    """The scorer's ``max_num_batched_tokens`` when none is given, and why: half the device memory left
    beside vLLM's share (``utilization`` of the total, from what is free now) goes to prompt_logprobs'
    ``PROMPT_LOGPROBS_BYTES x tokens x vocab``; a multiple of 256 within ``SCORER_TOKENS_RANGE``."""
    headroom = max(0, free_bytes - int(utilization * total_bytes))
    low, high = SCORER_TOKENS_RANGE
    tokens = max(low, min(high, int(headroom / 2 / (PROMPT_LOGPROBS_BYTES * vocab)) // 256 * 256))
    gib = 2**30
    why = (
        f"prompt_logprobs holds ~{PROMPT_LOGPROBS_BYTES} B x {tokens} tokens x {vocab} vocabulary = "
        f"{PROMPT_LOGPROBS_BYTES * tokens * vocab / gib:.1f} GiB outside vLLM's memory profile, within half "
        f"the {headroom / gib:.1f} GiB left beside its {utilization:.2f} share of the device "
        "(--scoring-max-num-batched-tokens to choose)"
    )
    return tokens, why


def fit_scorer_engine(engine: VLLMEngineConfig, model_dir: str, log) -> VLLMEngineConfig:
    """``engine`` with a ``max_num_batched_tokens`` fitted to the teacher's vocabulary on a GPU (vLLM's
    own default, 8-16k tokens, makes prompt_logprobs overrun its memory at a 150k vocabulary); as given
    on CPU or when set."""
    import torch

    if engine.max_num_batched_tokens is not None or not torch.cuda.is_available():
        return engine
    from lightning_opd.logprobs import text_config
    from lightning_opd.models.loading import load_config

    vocab = int(text_config(load_config(model_dir)).vocab_size)
    free, total = torch.cuda.mem_get_info()
    tokens, why = scoring_batched_tokens(vocab, total, free, engine.settings()["gpu_memory_utilization"])
    log(f"stage 1 scoring: max_num_batched_tokens {tokens}: {why}")
    return dataclasses.replace(engine, max_num_batched_tokens=tokens)
