"""Stage-one rollouts: the student answers each prompt; we keep its exact token ids and log-probs.

Two backends produce the same ``Rollout`` records:

- ``TransformersSampler`` (here): ``model.generate`` with one logits processor of ours that does the
  sampling itself (see ``_SeededTokenPicker`` for why), batched with left padding.
- ``VLLMSampler`` (``lightning_opd.stage1.vllm_backend``): the vLLM engine, for real scale.

Conventions both backends follow, so a store does not depend on which one wrote it:

- A response that ends on an EOS token *includes* that token (the teacher must score the decision to
  stop) and has ``finish_reason="stop"``; one cut by the horizon has ``finish_reason="length"``.
- ``behavior_logprobs[t]`` is the log-softmax of the model's *raw* logits at temperature 1 for the
  sampled token, not the log-prob under the temperature/top-p distribution it was drawn from (see
  ``storage_schemas.logprob_store_v1.BEHAVIOR_LOGPROBS_DISTRIBUTION``). ``sampling_logprobs[t]`` is the
  log-prob under that distribution, q(y) = softmax(z/τ) renormalised over the top-p nucleus (0 for
  greedy; ``SAMPLING_LOGPROBS_DISTRIBUTION`` there): what an importance ratio to the sampler needs.
- Sample ``s`` of prompt ``key`` is drawn with its own random stream seeded from ``(seed, key, s)``
  (``sample_seed``), so a rollout does not depend on which other prompts shared its batch, up to
  floating-point differences between batch shapes (which can flip a near-tie).
- ``max_new_tokens`` is the horizon. A prompt whose horizon would run past the model's context gets
  the remaining context instead (its rollout ends with "length"); a prompt that leaves no room at
  all is refused with ``InputError`` — callers skip those before sampling (``max_context``).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from lightning_opd.config import check
from lightning_opd.errors import InputError
from lightning_opd.logprobs import text_config
from lightning_opd.progress import progress_bar

BACKENDS = ("auto", "vllm", "transformers")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FINISH_REASONS = ("stop", "length")


@dataclass
class SamplingConfig:
    """How stage one samples. Defaults are the Lightning OPD recipe (METHODS.md §2)."""

    n: int = 1  # samples per prompt
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 16384  # the generation horizon
    seed: int = 0
    batch_size: int = 16  # sequences per generate call (transformers backend only)
    backend: str = "auto"  # "auto": vLLM when installed and given a model directory
    dtype: str = "auto"  # weights/compute dtype when the sampler loads the model itself

    def __post_init__(self) -> None:
        check(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n}")
        check(
            math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0 (0 = greedy), got {self.temperature}",
        )
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens}",
        )
        check(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed}")
        check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an integer >= 1, got {self.batch_size}",
        )
        check(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check(
            not (self.temperature == 0 and self.n > 1),
            f"temperature 0 (greedy) with n={self.n} gives {self.n} identical samples; set n=1 or temperature > 0",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollout:
    """One sampled response, exactly as the sampler produced it (token ids are never re-tokenised)."""

    prompt_id: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]  # includes the EOS token when finish_reason == "stop"
    behavior_logprobs: list[float]  # one per response token: raw log-probs (see the module docstring)
    finish_reason: str  # "stop" | "length"
    response_text: str  # decoded without special tokens; for reading and grading only
    # One per response token, see SAMPLING_LOGPROBS_DISTRIBUTION; None when the sampler did not give them.
    sampling_logprobs: list[float] | None = None

    def store_row(self, *, teacher_logprobs, reward, response_text) -> dict:
        """This rollout as a store row (the store's column names): the one place a sampler's output
        becomes a row, for stage one and for online training's ``--write-store`` alike."""
        return {
            "prompt_id": self.prompt_id,
            "sample_index": self.sample_index,
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "behavior_logprobs": self.behavior_logprobs,
            "sampling_logprobs": self.sampling_logprobs,
            "teacher_logprobs": teacher_logprobs,
            "finish_reason": self.finish_reason,
            "reward": reward,
            "response_text": response_text,
        }


class Sampler(Protocol):
    """What stage one needs from a rollout backend."""

    name: str  # "transformers" | "vllm"
    version: str  # the backend package's version, for the manifest
    max_context: int  # prompt + response tokens the model accepts

    def sample(
        self, prompt_ids: list[list[int]], prompt_keys: list[str], seed: int | None = None
    ) -> list[Rollout]:
        """``n`` rollouts per prompt, ordered by prompt then ``sample_index``; deterministic in ``seed``."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------------
# Helpers shared by both backends


def sample_seed(seed: int, prompt_key: str, sample_index: int) -> int:
    """A 63-bit seed for one sample, from a hash: independent of batching and of the other prompts."""
    digest = hashlib.blake2b(f"{seed}\x00{prompt_key}\x00{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: fits a signed int64 everywhere seeds go


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS plus the model's generation-config EOS ids.

    vLLM stops on the same union, so both backends agree (chat models often list two, e.g. Qwen's
    ``<|im_end|>`` and ``<|endoftext|>``).
    """
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    extra = getattr(generation_config, "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise InputError("the tokenizer and the model define no EOS token; generation could never stop")
    return ids


def check_prompts(prompt_ids: Sequence[Sequence[int]], prompt_keys: Sequence[str], vocab_size: int) -> None:
    """One key per prompt, unique keys (they seed the samples), non-empty prompts of valid ids."""
    if len(prompt_ids) != len(prompt_keys):
        raise InputError(
            f"got {len(prompt_ids)} prompts but {len(prompt_keys)} prompt keys; pass one key per prompt"
        )
    if len(set(prompt_keys)) != len(prompt_keys):
        duplicates = sorted(k for k, count in collections.Counter(prompt_keys).items() if count > 1)[:5]
        raise InputError(f"prompt keys must be unique (they seed the samples); duplicated: {duplicates}")
    for key, ids in zip(prompt_keys, prompt_ids):
        if len(ids) == 0:
            raise InputError(f"prompt {key!r} is empty; give every prompt at least one token (e.g. BOS)")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise InputError(
                f"prompt {key!r} has token ids outside [0, {vocab_size}); it was encoded with another tokenizer"
            )


def horizon(prompt_len: int, max_new_tokens: int, max_context: int, key: str) -> int:
    """New tokens allowed for one prompt: the horizon, cut to the context the prompt leaves."""
    room = max_context - prompt_len
    if room < 1:
        raise InputError(
            f"prompt {key!r} has {prompt_len} tokens and the model's context is {max_context}: no room to "
            "generate; skip prompts longer than max_context - 1 before sampling"
        )
    return min(max_new_tokens, room)


def plan_requests(
    prompt_ids: Sequence[Sequence[int]], prompt_keys: Sequence[str], config, vocab_size: int, max_context: int
) -> list[tuple[int, int]]:
    """``(prompt index, sample index)`` for every sample, after refusing bad or over-long prompts up front.

    Shared by every sampler, so both backends refuse the same inputs before any work starts.
    """
    check_prompts(prompt_ids, prompt_keys, vocab_size)
    for ids, key in zip(prompt_ids, prompt_keys):
        horizon(len(ids), config.max_new_tokens, max_context, key)
    return [(i, s) for i in range(len(prompt_ids)) for s in range(config.n)]


def finish(tokens: Sequence[int], eos_ids: Sequence[int], limit: int) -> tuple[int, str]:
    """``(length, finish_reason)`` of a response: through the first EOS (kept), else cut at ``limit``."""
    eos = set(eos_ids)
    for i, token in enumerate(tokens[:limit]):
        if token in eos:
            return i + 1, "stop"
    return min(limit, len(tokens)), "length"


# ----------------------------------------------------------------------------------------------
# transformers backend


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest most-likely set whose mass reaches ``top_p`` (vLLM's rule).

    ``probs`` is ``[B, V]``; the result is unnormalised (``torch.multinomial`` does not need it).
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # The most likely token always survives: its mass_before is 0 < top_p.
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


class _SeededTokenPicker:
    """A logits processor that picks the next token itself and forces ``generate`` to take it.

    ``generate`` runs in greedy mode with this as its only processor. Each call it receives the raw
    fp32 logits of the last position ([B, V]: ``generate`` computes no others), samples one token per
    row from temperature + top-p with that row's own ``torch.Generator``, records the *raw*
    log-softmax of the pick and its log-prob under the tempered nucleus it was drawn from
    (renormalised; 0 for greedy), and returns scores whose argmax is the pick.

    Why not ``generate(do_sample=True)``: (1) its raw logits come only through ``output_logits``,
    which keeps [B, T, V] (≈ 600 GB for 64 × 16k tokens × 150k vocab); (2) it draws every row from
    one global random stream, so a rollout would depend on its batch-mates; a generator per row
    gives the per-sample seeding vLLM has. Why not a hand-written KV-cache loop: ``generate`` already
    handles left-padded positions and every architecture's cache.
    """

    def __init__(self, temperature: float, top_p: float, generators: list[torch.Generator]):
        self.temperature = temperature
        self.top_p = top_p
        self.generators = generators
        self.picked: list[torch.Tensor] = []  # per step, [B] int64
        self.logprobs: list[torch.Tensor] = []  # per step, [B] fp32: O(B·T) in all
        self.sampling_logprobs: list[torch.Tensor] = []  # per step, [B] fp32: log q(pick)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        sampled_logprob = None
        if self.temperature == 0:
            picked = scores.argmax(dim=-1)
        else:
            tempered = scores / self.temperature
            probs = nucleus(torch.softmax(tempered, dim=-1), self.top_p)
            picked = torch.cat(
                [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
            )
            if not (self.temperature == 1 and self.top_p >= 1):
                # log q(pick): the tempered log-softmax renormalised over the kept (nucleus) tokens.
                logp = torch.log_softmax(tempered, dim=-1)
                kept = logp.masked_fill(probs <= 0, -math.inf)
                sampled_logprob = logp.gather(-1, picked[:, None]).squeeze(-1) - torch.logsumexp(kept, dim=-1)
        chosen = scores.gather(-1, picked[:, None]).squeeze(-1)
        raw = chosen - torch.logsumexp(scores, dim=-1)
        self.logprobs.append(raw)
        if sampled_logprob is None:  # greedy: q(pick) = 1; temperature 1 without top-p: q is the raw p
            sampled_logprob = torch.zeros_like(raw) if self.temperature == 0 else raw
        self.sampling_logprobs.append(sampled_logprob)
        self.picked.append(picked)
        forced = torch.full_like(scores, -math.inf)
        return forced.scatter_(-1, picked[:, None], 0.0)


class TransformersSampler:
    """Rollouts with a transformers causal LM (any device), batched with left padding.

    Deterministic: the same prompts, keys, seed and ``batch_size`` give the same rollouts. Different
    batching gives the same rollouts except where batch-shape-dependent rounding flips a near-tie.
    Memory: the KV cache plus O(batch_size · vocab) per step; never [B, T, V].
    """

    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer,
        config: SamplingConfig,
        device: str | torch.device | None = None,
        *,
        max_context: int | None = None,
        progress: str = "",
    ):
        import transformers

        self.version = transformers.__version__
        self.config = config
        self.progress = progress  # a bar's label over the sequences of one sample() call ("" = none)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, model.generation_config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        text = text_config(model.config)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_context = int(max_context or text.max_position_embeddings)

    def sample(
        self, prompt_ids: list[list[int]], prompt_keys: list[str], seed: int | None = None
    ) -> list[Rollout]:
        seed = self.config.seed if seed is None else seed
        requests = plan_requests(prompt_ids, prompt_keys, self.config, self.vocab_size, self.max_context)
        rollouts: list[Rollout] = []
        bar = progress_bar(total=len(requests), desc=self.progress, unit="seq", enabled=bool(self.progress))
        for start in range(0, len(requests), self.config.batch_size):
            batch = requests[start : start + self.config.batch_size]
            rollouts.extend(self._sample_batch(prompt_ids, prompt_keys, batch, seed))
            bar.update(len(batch))
        bar.close()
        return rollouts

    def _sample_batch(
        self, prompt_ids, prompt_keys, batch: list[tuple[int, int]], seed: int
    ) -> list[Rollout]:
        from transformers import GenerationConfig, LogitsProcessorList

        prompts = [list(prompt_ids[i]) for i, _ in batch]
        keys = [prompt_keys[i] for i, _ in batch]
        limits = [
            horizon(len(p), self.config.max_new_tokens, self.max_context, k) for p, k in zip(prompts, keys)
        ]
        input_ids, attention_mask = _left_pad(prompts, self.pad_id, self.device)
        generators = [
            torch.Generator(device=self.device).manual_seed(sample_seed(seed, prompt_keys[i], s))
            for i, s in batch
        ]
        picker = _SeededTokenPicker(self.config.temperature, self.config.top_p, generators)
        generation_config = GenerationConfig(
            do_sample=False,  # the picker samples; greedy decoding then takes its pick
            num_beams=1,
            max_new_tokens=max(limits),
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        with _bare_generation_defaults(self.model), torch.inference_mode():
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([picker]),
            )
        new_tokens = sequences[:, input_ids.shape[1] :].tolist()
        picked = torch.stack(picker.picked, dim=1).tolist()
        logprobs = torch.stack(picker.logprobs, dim=1).tolist()
        sampling_logprobs = torch.stack(picker.sampling_logprobs, dim=1).tolist()

        rollouts = []
        for row, ((_, sample_index), key, prompt, limit) in enumerate(zip(batch, keys, prompts, limits)):
            length, reason = finish(new_tokens[row], self.eos_ids, limit)
            response = new_tokens[row][:length]
            # Internal invariant: generate took exactly the picker's tokens (our logprobs belong to them).
            assert response == picked[row][:length], "generate did not follow the picked tokens"
            rollouts.append(
                Rollout(
                    prompt_id=key,
                    sample_index=sample_index,
                    prompt_ids=prompt,
                    response_ids=response,
                    behavior_logprobs=logprobs[row][:length],
                    finish_reason=reason,
                    response_text=self.tokenizer.decode(response, skip_special_tokens=True),
                    sampling_logprobs=sampling_logprobs[row][:length],
                )
            )
        return rollouts

    def close(self) -> None:
        self.model = None  # drop our reference; the caller may still hold the model

    def __enter__(self) -> TransformersSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every row's last prompt token sits at the same column, where generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def _bare_generation_defaults(model):
    """Hide the checkpoint's ``generation_config`` during one ``generate`` call.

    ``generate`` fills every field we leave unset from ``model.generation_config`` (a checkpoint may
    ship ``repetition_penalty``, ``suppress_tokens``, ``bad_words_ids``...), and those processors would
    run *before* the picker, so its log-probs would no longer be raw. A bare config leaves only
    transformers' neutral defaults.
    """
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved
