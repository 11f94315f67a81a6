"""A store's identity: the header stage one passes in, its validation, and the content id derived from it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .encoding import encoding_problems
from .layout import KIND_ROLLOUTS, KIND_SCORED, KINDS, TOPK_TAIL_TREATMENTS, is_int, is_number
from .schema import SAMPLING_LOGPROBS_MODE

# ---------------------------------------------------------------------------------------------
# Identity: the header stage one passes in, and the content id derived from it
# ---------------------------------------------------------------------------------------------

SAMPLING_KEYS = ("backend", "n", "temperature", "top_p", "max_new_tokens", "seed")
HEADER_KEYS = (
    "kind",
    "teacher",
    "student",
    "teacher_consistency",
    "sampling",
    "horizon",
    "prompt_set",
    "topk",
    "extra",
    "encoding",  # since 1.2; optional (None: float32 log-probs)
)

# What the behaviour log-probs are (manifest ``sampling.behavior_logprobs``): both samplers write the
# raw log-prob of the sampled token under the model's unmodified distribution (temperature 1, no
# top-p), whatever temperature/top-p they sampled with (vLLM's ``logprobs_mode`` of the same name).
BEHAVIOR_LOGPROBS_DISTRIBUTION = "raw_logprobs"
# What the optional sampling log-probs are (manifest ``sampling.sampling_logprobs``): vLLM's name for
# log-probs after temperature and top-p, renormalised over the nucleus; the distribution drawn from.
SAMPLING_LOGPROBS_DISTRIBUTION = SAMPLING_LOGPROBS_MODE


# The inference engine's scale settings, recorded where an engine ran: ``sampling.engine`` for the
# rollout sampler and ``extra.scoring_engine`` for the teacher scorer; null for the transformers
# backend (not applicable), absent in stores written before they were recorded. They say how a
# store was made, not what it holds: they are not identity fields. Values are what was handed to the
# engine; a null inside means the engine chose (its hardware default, the model's context length).
# 1.4 added ``max_num_batched_tokens`` (the tokens of one engine step, which bound vLLM's prompt_logprobs
# memory); a 1.3 record has the first four keys only and stays valid. Keys beyond ENGINE_KEYS are
# accepted (a later minor version may add some): a reader checks the ones it knows.
ENGINE_KEYS_1_3 = ("tensor_parallel_size", "max_num_seqs", "gpu_memory_utilization", "max_model_len")
ENGINE_KEYS = (*ENGINE_KEYS_1_3, "max_num_batched_tokens")
SCORING_ENGINE_KEY = "scoring_engine"  # in manifest.extra, next to "scoring_backend"


def engine_section(
    *,
    tensor_parallel_size: int,
    max_num_seqs: int | None,
    gpu_memory_utilization: float | None,
    max_model_len: int | None,
    max_num_batched_tokens: int | None = None,
) -> dict[str, Any]:
    """One engine record (``sampling.engine`` / ``extra.scoring_engine``)."""
    return {
        "tensor_parallel_size": tensor_parallel_size,
        "max_num_seqs": max_num_seqs,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_num_batched_tokens,
    }


def sampling_section(
    backend: str, backend_version: str, config: Any, engine: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest's ``sampling`` section, from any config with n/temperature/top_p/max_new_tokens/seed;
    ``engine`` is the sampler engine's ``engine_section`` (None: the backend has no such settings)."""
    return {
        "backend": backend,
        "backend_version": backend_version,
        "n": config.n,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_new_tokens": config.max_new_tokens,
        "seed": config.seed,
        # Which sampler log-prob column holds what (vLLM's LogprobsMode names): raw (temperature 1,
        # full vocabulary) vs the distribution each token was drawn from (temperature + top-p).
        "behavior_logprobs": BEHAVIOR_LOGPROBS_DISTRIBUTION,
        "sampling_logprobs": SAMPLING_LOGPROBS_DISTRIBUTION,
        "engine": engine,
    }


def prompt_set_section(
    source: str, *, content_hash: str, num_prompts: int, skipped: int, part_size: int
) -> dict[str, Any]:
    """The manifest's ``prompt_set`` section: where the prompts came from and their content hash."""
    return {
        "source": source,
        "content_hash": content_hash,
        "num_prompts": num_prompts,
        "skipped_prompts": skipped,
        "part_size": part_size,
    }


# What makes two stores hold the same content. Paths are left out (moving a model does not change
# its outputs); the backend version is left out (a patch release must not orphan a half-written store).
IDENTITY_FIELDS = (
    "kind",
    "teacher.fingerprint",
    "teacher.tokenizer_fingerprint",
    "teacher.dtype",
    "student.fingerprint",
    "student.tokenizer_fingerprint",
    "student.dtype",
    "prompt_set.content_hash",
    "prompt_set.num_prompts",
    "sampling.backend",
    "sampling.n",
    "sampling.temperature",
    "sampling.top_p",
    "sampling.max_new_tokens",
    "sampling.seed",
    "horizon",
    "topk.k",
    "topk.tail_treatment",
)
# Identity fields that count only when set: a 1.0/1.1 store (no encoding) keeps the id it always had,
# and a compact store of the same content gets another id (its values differ by up to the stated error).
OPTIONAL_IDENTITY_FIELDS = ("encoding",)


def _get_dotted(data: dict[str, Any], dotted: str) -> Any:
    value: Any = data
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def identity(header: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of a header, flat and dotted (missing ones are None; optional ones left out)."""
    fields = {name: _get_dotted(header, name) for name in IDENTITY_FIELDS}
    fields.update({name: header[name] for name in OPTIONAL_IDENTITY_FIELDS if header.get(name) is not None})
    return fields


def compute_store_id(header: dict[str, Any]) -> str:
    """Content id of a store: sha256 of the canonical JSON of its identity fields."""
    canonical = json.dumps(identity(header), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted names of the identity fields on which two headers differ."""
    ia, ib = identity(a), identity(b)
    return [name for name in (*IDENTITY_FIELDS, *OPTIONAL_IDENTITY_FIELDS) if ia.get(name) != ib.get(name)]


def _model_problems(kind: Any, student: Any, teacher: Any, consistency: Any) -> list[str]:
    problems = []
    if not isinstance(student, dict) or not student.get("fingerprint"):
        problems.append(f"header student must be a dict with a 'fingerprint', got {student!r}")
    if teacher is not None and not isinstance(teacher, dict):
        problems.append(f"header teacher must be a dict or None, got {teacher!r}")
    if kind != KIND_SCORED:
        return problems
    if not isinstance(teacher, dict) or not teacher.get("fingerprint"):
        problems.append(f"a 'scored' store needs header teacher with a 'fingerprint', got {teacher!r}")
    # consistent is None when nothing records who wrote the SFT data (the note says so).
    if (
        not isinstance(consistency, dict)
        or consistency.get("consistent") not in (True, False, None)
        or not isinstance(consistency.get("allowed"), bool)
    ):
        problems.append(
            f"a 'scored' store needs teacher_consistency {{consistent: bool|None, allowed: bool}}, got {consistency!r}"
        )
    elif consistency.get("consistent") is False and not consistency["allowed"]:
        problems.append(
            "teacher_consistency says the scoring teacher is not the SFT teacher and it was not allowed"
        )
    return problems


def _sampling_problems(sampling: Any, horizon: Any) -> list[str]:
    if not isinstance(sampling, dict):
        return [f"header sampling must be a dict, got {sampling!r}"]
    problems = [f"header sampling lacks {key!r}" for key in SAMPLING_KEYS if key not in sampling]
    rules = {
        "n": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
        "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
        "top_p": (lambda v: is_number(v) and 0 < v <= 1, "in (0, 1]"),
        "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an int >= 1"),
    }
    for key, (ok, expected) in rules.items():
        if key in sampling and not ok(sampling[key]):
            problems.append(f"sampling.{key} must be {expected}, got {sampling[key]!r}")
    if not (is_int(horizon) and horizon >= 1):
        problems.append(f"header horizon must be an int >= 1, got {horizon!r}")
    elif "max_new_tokens" in sampling and horizon != sampling["max_new_tokens"]:
        problems.append(
            f"header horizon must equal sampling.max_new_tokens, got {horizon} vs {sampling['max_new_tokens']}"
        )
    return problems


def _topk_problems(kind: Any, topk: Any) -> list[str]:
    if topk is None:
        return []
    if kind == KIND_ROLLOUTS:
        return [f"header topk applies to 'scored' stores only (the teacher writes it), got {topk!r}"]
    if (
        not isinstance(topk, dict)
        or not (is_int(topk.get("k")) and topk["k"] >= 1)
        or topk.get("tail_treatment") not in TOPK_TAIL_TREATMENTS
    ):
        return [
            f"header topk must be None or {{k: int >= 1, tail_treatment: one of {TOPK_TAIL_TREATMENTS}}}, got {topk!r}"
        ]
    return []


def _engine_problems(where: str, engine: Any) -> list[str]:
    """An engine record is absent/None or a dict with at least ``ENGINE_KEYS_1_3``, each a positive
    number or None (``max_num_batched_tokens`` since 1.4; keys a later version adds are let through)."""
    if engine is None:
        return []
    if not isinstance(engine, dict) or not set(ENGINE_KEYS_1_3) <= set(engine):
        return [f"header {where} must be None or a dict with keys {list(ENGINE_KEYS)}, got {engine!r:.80}"]
    return [
        f"{where}.{key} must be a positive number or None, got {value!r}"
        for key, value in engine.items()
        if key in ENGINE_KEYS and value is not None and not (is_number(value) and value > 0)
    ]


def header_problems(header: dict[str, Any]) -> list[str]:
    """What is wrong with a store header (the identity sections); empty when it is valid."""
    if not isinstance(header, dict):
        return [f"store header must be a dict, got {type(header).__name__}"]
    problems = []
    unknown = sorted(set(header) - set(HEADER_KEYS))
    if unknown:
        problems.append(f"header has unknown keys {unknown}; known keys are {list(HEADER_KEYS)}")
    kind = header.get("kind")
    if kind not in KINDS:
        problems.append(f"header kind must be one of {KINDS}, got {kind!r}")
    problems += _model_problems(
        kind, header.get("student"), header.get("teacher"), header.get("teacher_consistency")
    )
    problems += _sampling_problems(header.get("sampling"), header.get("horizon"))
    prompt_set = header.get("prompt_set")
    if not isinstance(prompt_set, dict) or not prompt_set.get("content_hash"):
        problems.append(f"header prompt_set must be a dict with a 'content_hash', got {prompt_set!r}")
    elif not (is_int(prompt_set.get("num_prompts")) and prompt_set["num_prompts"] >= 0):
        problems.append(f"prompt_set.num_prompts must be an int >= 0, got {prompt_set.get('num_prompts')!r}")
    problems += _topk_problems(kind, header.get("topk"))
    problems += encoding_problems(header.get("encoding"))
    if header.get("extra") is not None and not isinstance(header.get("extra"), dict):
        problems.append(f"header extra must be a dict, got {header.get('extra')!r}")
    for section, key in (("sampling", "engine"), ("extra", SCORING_ENGINE_KEY)):
        if isinstance(header.get(section), dict):
            problems += _engine_problems(f"{section}.{key}", header[section].get(key))
    try:
        json.dumps(header, allow_nan=False)
    except (TypeError, ValueError) as e:
        problems.append(f"header must be plain JSON (str/int/float/bool/None/list/dict): {e}")
    return problems


def topk_of(header: dict[str, Any]) -> int | None:
    topk = header.get("topk")
    return topk.get("k") if isinstance(topk, dict) else None
