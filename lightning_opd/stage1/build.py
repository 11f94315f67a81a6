"""Stage one's work, for ``lopd precompute`` / ``rollout`` / ``score`` (``pipelines/precompute.py``):
student rollouts into a rollouts store, then teacher scoring into a scored store, part by part.

Work is cut into fixed parts of the prompt set; worker i of N does the parts with ``part % N == i``
(``my_parts``), commits each part once written, and the last worker to finish finalizes the store.
``config`` is the job's ``RolloutConfig`` / ``ScoreConfig``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lightning_opd.errors import ConfigError, InputError, StoreError
from lightning_opd.evaluation.verifiers import VERIFIERS, resolve_verifier
from lightning_opd.models.consistency import teacher_consistency
from lightning_opd.models.loading import (
    check_same_tokenizer,
    load_causal_lm,
    load_config,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from lightning_opd.progress import TokenRate, progress_bar
from lightning_opd.prompts import encode_prompt, load_prompts, prompt_set_hash, unencodable
from lightning_opd.scoring import score_sequences
from lightning_opd.stage1.rollout import SamplingConfig
from lightning_opd.stage1.samplers import make_sampler
from lightning_opd.store import StoreWriter
from lightning_opd.store.reader import read_part, read_saved_header
from lightning_opd.store.registry import check_not_duplicate, register
from storage_schemas.logprob_store_v1 import (
    SAMPLING_COLUMN,
    SCORING_ENGINE_KEY,
    compute_store_id,
    fixed16_encoding,
    prompt_set_section,
    sampling_section,
)

SCORING_BACKENDS = ("transformers", "vllm", "server")  # server: stage1/served.py
# The vLLM engine's scale settings, one config field each: plain names for the rollout sampler
# (RolloutConfig), "scoring_"-prefixed for the teacher scorer (ScoreConfig, PrecomputeConfig).
ENGINE_FIELDS = (
    "tensor_parallel_size", "max_num_seqs", "gpu_memory_utilization", "max_model_len", "max_num_batched_tokens"
)  # fmt: skip
ENGINE_FIELD_HELP = {
    "tensor_parallel_size": "GPUs one vLLM engine spans (tensor parallel)",
    "max_num_seqs": "sequences per vLLM engine step (default: vLLM's for the hardware)",
    "gpu_memory_utilization": "share of device memory vLLM may take (default: 0.92 on a GPU, 0.2 on CPU)",
    "max_model_len": "vLLM context length (default: the model's)",
    "max_num_batched_tokens": "tokens per vLLM engine step; bounds prompt_logprobs' memory, ~6 B x tokens x "
    "vocabulary outside vLLM's profiling (default: vLLM's; the scorer on a GPU: fitted to the vocabulary)",
}


def _engine_field(name: str, default, who: str = ""):
    return field(default=default, metadata={"help": who + ENGINE_FIELD_HELP[name]})


@dataclass(kw_only=True)
class SamplerEngineFlags:
    """The rollout sampler's vLLM engine (--backend vllm); recorded in the manifest's sampling.engine."""

    tensor_parallel_size: int = _engine_field("tensor_parallel_size", 1)
    max_num_seqs: int | None = _engine_field("max_num_seqs", None)
    gpu_memory_utilization: float | None = _engine_field("gpu_memory_utilization", None)
    max_model_len: int | None = _engine_field("max_model_len", None)
    max_num_batched_tokens: int | None = _engine_field("max_num_batched_tokens", None)


@dataclass(kw_only=True)
class ScoringEngineFlags:
    """The teacher scorer's vLLM engine (--scoring-backend vllm); recorded in the manifest's extra.scoring_engine."""

    scoring_tensor_parallel_size: int = _engine_field("tensor_parallel_size", 1, "scorer: ")
    scoring_max_num_seqs: int | None = _engine_field("max_num_seqs", None, "scorer: ")
    scoring_gpu_memory_utilization: float | None = _engine_field("gpu_memory_utilization", None, "scorer: ")
    scoring_max_model_len: int | None = _engine_field("max_model_len", None, "scorer: ")
    scoring_max_num_batched_tokens: int | None = _engine_field("max_num_batched_tokens", None, "scorer: ")


def engine_config(config, prefix: str = "", *, max_logprobs: int = 20):
    """The ``VLLMEngineConfig`` from a stage-one config's engine fields (``prefix`` "scoring_" for the scorer)."""
    from lightning_opd.stage1.vllm_backend import VLLMEngineConfig  # does not import vllm itself

    return VLLMEngineConfig(
        **{name: getattr(config, prefix + name) for name in ENGINE_FIELDS}, max_logprobs=max_logprobs
    )


def _changed_engine_flags(config, prefix: str) -> str:
    defaults = {f.name: f.default for f in fields(config)}
    changed = [prefix + n for n in ENGINE_FIELDS if getattr(config, prefix + n) != defaults[prefix + n]]
    return ", ".join("--" + name.replace("_", "-") for name in changed)


def check_engine_fields(config, prefix: str, backend: str, backend_flag: str) -> None:
    """Validate the engine fields; refuse them with a backend that has no engine (they would be ignored)."""
    try:
        engine_config(config, prefix)  # range checks; their messages start with the field's name
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    flags = _changed_engine_flags(config, prefix)
    if flags and backend in ("transformers", "server"):  # no engine of ours runs (a server has its own)
        raise ConfigError(
            f"{flags} configure the vLLM engine, but {backend_flag} is {backend!r}; "
            f"pass {backend_flag} vllm or drop them"
        )


def make_scorer(config, log=print, served=None):
    """``(score(prompts, responses) -> list[ScoredSequence], close())`` for the configured backend
    (``served``: the checked ``stage1.served.ServedTeacher`` of ``--scoring-backend server``)."""
    if config.scoring_backend == "server":
        return (lambda prompts, responses: served.score(prompts, responses, config.topk)), (lambda: None)
    if config.scoring_backend == "vllm":
        from lightning_opd.stage1.scorer_memory import fit_scorer_engine
        from lightning_opd.stage1.vllm_backend import VLLMScorer, running_settings

        # vLLM caps top-k log-probs at max_logprobs (default 20): lift the cap to the asked top-k.
        engine = engine_config(config, "scoring_", max_logprobs=max(20, config.topk))
        engine = fit_scorer_engine(engine, config.teacher, log)
        scorer = VLLMScorer(config.teacher, dtype=config.dtype, engine=engine)
        log(f"stage 1 scoring: vLLM engine runs with {running_settings(scorer.llm)}")
        return (
            lambda prompts, responses: scorer.score_sequences(prompts, responses, topk=config.topk)
        ), scorer.close
    teacher, _ = load_causal_lm(config.teacher, dtype=config.dtype, device=config.device)

    def score(prompts, responses):
        return score_sequences(
            teacher,
            prompts,
            responses,
            topk=config.topk,
            max_tokens_per_batch=config.max_tokens_per_batch,
            chunk_size=config.chunk_size,
        )

    return score, (lambda: None)


# Workers of one sharded run share the output directory and differ only in these.
SHARD_FIELDS = frozenset({"shard_index"})


def my_parts(num_parts: int, shard_index: int, num_shards: int) -> list[int]:
    return [p for p in range(num_parts) if p % num_shards == shard_index]


def finalize_if_complete(writer: StoreWriter, num_shards: int, log) -> bool:
    if writer.is_complete():
        manifest = writer.finalize(num_shards)
        if manifest.kind == "scored":
            try:
                register(writer.root)  # the store cache lists it by content id for later reuse
            except StoreError as e:
                log(f"WARNING: could not record the store in the store cache: {e}")
        log(
            f"stage 1: store {writer.root} complete: {manifest.stats.num_rollouts} rollouts, {len(manifest.shards)} shards"
        )
        return True
    if num_shards > 1:
        log(
            f"stage 1: this worker's parts are committed; after all {num_shards} workers finish, run `lopd store finalize {writer.root}`"
        )
    return False


def run_rollouts(config, log=print) -> Path:
    out = Path(config.out)
    student_id = model_identity(config.student)
    records = load_prompts(config.prompts, prompt_field=config.prompt_field)
    tokenizer = load_tokenizer(config.student)
    student_id.dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).replace("torch.", "")
    context = getattr(load_config(config.student), "max_position_embeddings", None) or 10**9
    encoded = [encode_prompt(tokenizer, r.prompt, config.chat_template) for r in records]
    # A prompt with no room left for even one response token cannot be rolled out: skip and count it.
    # So is one with characters the tokenizer cannot encode (its ids would hold the unknown token).
    bad_chars = {i: unencodable(tokenizer, r.prompt) for i, r in enumerate(records)}
    unknown = {i for i, char in bad_chars.items() if char is not None}
    if unknown:
        first = min(unknown)
        warnings.warn(
            f"stage 1: skipped {len(unknown)} of {len(records)} prompts with characters the student's tokenizer "
            f"cannot encode (first: prompt_id {records[first].prompt_id!r}, character {bad_chars[first]!r}); "
            "counted in the manifest's prompt_set.skipped_prompts",
            stacklevel=1,
        )
    keep = [i for i, ids in enumerate(encoded) if 0 < len(ids) < context and i not in unknown]
    skipped = len(records) - len(keep) - len(unknown)
    if skipped:
        warnings.warn(
            f"stage 1: skipped {skipped} of {len(records)} prompts that are empty or do not fit the student's {context}-token context",
            stacklevel=1,
        )
    skipped += len(unknown)
    if not keep:
        raise InputError(
            f"stage 1: no prompt in {config.prompts} fits the student's {context}-token context and encodes "
            "with its tokenizer"
        )
    sampling = SamplingConfig(
        n=config.n,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        batch_size=config.sample_batch_size,
        backend=config.backend,
        dtype=config.dtype,
    )
    # Given the directory, the sampler loads the model itself: vLLM when installed, else transformers.
    engine = engine_config(config)
    # closing(): the engine is shut down on the way out, error or not (left to the interpreter's exit,
    # vLLM's engine can abort it after the work is done).
    with contextlib.closing(make_sampler(config.student, sampling, config.device, engine=engine)) as sampler:
        if sampler.name == "vllm":
            from lightning_opd.stage1.vllm_backend import running_settings

            log(f"stage 1 rollouts: vLLM engine runs with {running_settings(sampler.llm)}")
        elif _changed_engine_flags(config, ""):
            warnings.warn(
                f"stage 1: --backend auto chose transformers (vLLM is not installed), so "
                f"{_changed_engine_flags(config, '')} are ignored",
                stacklevel=1,
            )
        header = {
            "kind": "rollouts",
            "student": {**asdict(student_id), "sft_teacher_fingerprint": None},
            "sampling": sampling_section(
                sampler.name,
                sampler.version,
                config,
                engine=engine.settings() if sampler.name == "vllm" else None,
            ),
            "horizon": config.max_new_tokens,
            "prompt_set": prompt_set_section(
                str(Path(config.prompts).resolve()),
                content_hash=prompt_set_hash(records),
                num_prompts=len(records),
                skipped=skipped,
                part_size=config.part_size,
            ),
            "teacher": None,
            "teacher_consistency": None,
            "topk": None,
            "extra": {},
        }
        from lightning_opd.models.provenance import read_provenance

        provenance = read_provenance(config.student)
        if provenance and provenance.sft_teacher:
            header["student"]["sft_teacher_fingerprint"] = provenance.sft_teacher["fingerprint"]
        num_parts = math.ceil(len(keep) / config.part_size)
        writer = StoreWriter(
            out,
            header,
            num_parts=num_parts,
            topk=None,
            with_text=config.keep_text,
            with_reward=True,
            with_sampling=True,
        )
        mine = my_parts(num_parts, config.shard_index, config.num_shards)
        done = writer.committed_parts(mine)  # checksums each of this worker's shards once
        todo = [p for p in mine if p not in done]
        log(
            f"stage 1 rollouts: {len(keep)} prompts in {num_parts} parts; this worker: {len(todo)} to do ({sampler.name} {sampler.version})"
        )
        answers = {r.prompt_id: r.answer for r in records}
        grade = VERIFIERS[resolve_verifier(config.verifier, records)]
        bar = progress_bar(todo, desc="rollout parts", unit="part")
        throughput = TokenRate()
        for part in bar:
            idx = keep[part * config.part_size : (part + 1) * config.part_size]
            rollouts = sampler.sample(
                [encoded[i] for i in idx], [records[i].prompt_id for i in idx], config.seed + part
            )
            rows = [
                r.store_row(
                    teacher_logprobs=None,  # a rollouts store: `lopd score` fills them
                    reward=None
                    if answers[r.prompt_id] is None
                    else grade(r.response_text, answers[r.prompt_id]),
                    response_text=r.response_text if config.keep_text else None,
                )
                for r in rollouts
            ]
            writer.write_part(part, rows)
            bar.set_postfix_str(throughput.add(sum(len(r["response_ids"]) for r in rows)))
    finalize_if_complete(writer, config.num_shards, log)
    return out


def run_scoring(config, log=print) -> Path:
    rollouts_root = Path(config.rollouts)
    if not (rollouts_root / "commits").exists() and not (rollouts_root / "manifest.json").exists():
        raise StoreError(f"{rollouts_root} holds no rollouts store; run `lopd rollout` first")
    rollout_header = StoreWriter.read_header(rollouts_root)
    student = rollout_header["student"]
    served = None
    if config.scoring_backend == "server":  # checked, and known by its behaviour (stage1/served.py)
        from lightning_opd.models.consistency import served_identity
        from lightning_opd.stage1.served import SERVED_TEACHER_KEY, connect

        served = connect(config, log)
        teacher_id, consistency = served_identity(config, served, student["path"], log)
    else:
        teacher_id = model_identity(config.teacher)
        # Every check that can fail does so before the teacher is loaded.
        check_same_tokenizer(model_identity(student["path"]), teacher_id, "stage 1 (scoring)")
        consistency = teacher_consistency(
            student_path=student["path"],
            teacher=teacher_id,
            allow_inconsistent=config.allow_inconsistent_teacher,
            declared_sft_teacher=config.sft_teacher or None,
            log=log,
        )
        teacher_id.dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).replace(
            "torch.", ""
        )
    header = {
        **rollout_header,
        # A declared SFT teacher (--sft-teacher) fills in what the student's provenance could not say.
        "student": {**student, "sft_teacher_fingerprint": consistency["sft_teacher_fingerprint"]},
        "kind": "scored",
        "teacher": asdict(teacher_id),
        "teacher_consistency": consistency,
        "topk": None if not config.topk else {"k": config.topk, "tail_treatment": config.topk_tail},
        "extra": {
            **(rollout_header.get("extra") or {}),
            "scoring_backend": config.scoring_backend,
            SCORING_ENGINE_KEY: (
                engine_config(config, "scoring_").settings() if config.scoring_backend == "vllm" else None
            ),
            # The served model's name and behaviour fingerprint; the URL is where, not what (left out).
            **({SERVED_TEACHER_KEY: served.manifest_record()} if served else {}),
        },
        # The rollouts store stays float32; only the final store is compact (readers decode it).
        "encoding": (
            fixed16_encoding(topk_scale=config.compact_topk_scale or None)
            if config.compact_logprobs or config.compact_topk_scale
            else None
        ),
    }
    if not config.allow_duplicate:
        # Content addressing: the same teacher, student, prompts and sampling make the same store. Reuse it.
        check_not_duplicate(compute_store_id(header), config.out)
    saved = read_saved_header(rollouts_root)
    columns = set(saved["columns"])
    writer = StoreWriter(
        Path(config.out),
        header,
        num_parts=int(saved["num_parts"]),
        topk=config.topk or None,
        with_text="response_text" in columns,
        with_sampling=SAMPLING_COLUMN in columns,
        with_reward="reward" in columns,
    )
    mine = my_parts(writer.num_parts, config.shard_index, config.num_shards)
    done = writer.committed_parts(mine)
    todo = [p for p in mine if p not in done]
    log(f"stage 1 scoring: {len(todo)} parts to score with {teacher_id.short()} ({config.scoring_backend})")
    score, close = make_scorer(config, log, served) if todo else (None, lambda: None)
    try:
        bar = progress_bar(todo, desc="scoring parts", unit="part")
        throughput = TokenRate()
        for part in bar:
            rows = read_part(rollouts_root, part).to_pylist()
            scored = score([r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows])
            for row, s in zip(rows, scored):
                row["teacher_logprobs"] = s.logprobs.tolist()
                if config.topk:
                    row["teacher_topk_ids"] = s.topk_ids.tolist()
                    row["teacher_topk_logprobs"] = s.topk_logprobs.tolist()
            writer.write_part(part, rows)
            bar.set_postfix_str(
                throughput.add(sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows))
            )
    finally:
        close()  # a vLLM engine holds the device until closed
    finalize_if_complete(writer, config.num_shards, log)
    return Path(config.out)
