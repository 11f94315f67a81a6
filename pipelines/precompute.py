"""Stage one: student rollouts, then teacher scoring, into a sharded Parquet logprob store.

    lopd precompute --student runs/sft --teacher runs/teacher --prompts prompts/opd.jsonl --out runs/store
    # the same in two steps (e.g. rollouts on one machine, scoring on another):
    lopd rollout --student runs/sft --prompts prompts/opd.jsonl --out runs/rollouts
    lopd score --rollouts runs/rollouts --teacher runs/teacher --out runs/store
    # scale out: N processes (any scheduler), then one merge
    lopd precompute ... --shard-index $i --num-shards N   # for i in 0..N-1
    lopd store finalize runs/store

Work is cut into fixed *parts* of the prompt set (``--part-size`` prompts each); worker i of N does
the parts with ``part % N == i``, so a sharded run writes exactly the parts a single run would. A part
is committed once written; a rerun after a crash skips committed parts. The sampler and the teacher
never share the device: all of this worker's rollouts are written first, then the teacher scores them.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from lightning_opd.config import check, prepare_output_dir
from lightning_opd.consistency import teacher_consistency
from lightning_opd.errors import InputError, StoreError
from lightning_opd.logprobs import score_sequences
from lightning_opd.modeling import (
    check_device_and_dtype,
    check_same_tokenizer,
    load_causal_lm,
    load_config,
    load_tokenizer,
    model_identity,
    resolve_device,
    resolve_dtype,
)
from lightning_opd.prompts import (
    check_chat_template_mode,
    encode_prompt,
    load_prompts,
    prompt_set_hash,
    unencodable,
)
from lightning_opd.stage1.rollout import SamplingConfig
from lightning_opd.stage1.samplers import make_sampler
from lightning_opd.store import StoreWriter, open_store
from lightning_opd.store.files import file_lock
from lightning_opd.store.reader import read_part, read_saved_header
from lightning_opd.store.registry import check_not_duplicate, register
from lightning_opd.verifiers import VERIFIERS, check_verifier, resolve_verifier
from storage_schemas.logprob_store_v1 import (
    LOCKS_DIR,
    ROLLOUTS_SUBDIR,
    SAMPLING_COLUMN,
    TOPK_TAIL_TREATMENTS,
    compute_store_id,
    prompt_set_section,
    sampling_section,
)


@dataclass
class RolloutConfig:
    student: str = field(metadata={"help": "SFT'd student model directory (samples the rollouts)"})
    prompts: str = field(metadata={"help": "OPD prompt set (.jsonl, .parquet or datasets dir)"})
    out: str = field(metadata={"help": "output store directory"})
    prompt_field: str = "prompt"
    chat_template: str = "auto"
    verifier: str = field(
        default="auto",
        metadata={
            "help": "grades responses into `reward` when answers exist: auto (addition for the toy's a+b= prompts, else math) | math | last_number | addition"
        },
    )
    n: int = field(default=1, metadata={"help": "rollouts per prompt"})
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = field(
        default=64, metadata={"help": "rollout horizon T (stage two may use any H <= T)"}
    )
    seed: int = 0
    backend: str = field(
        default="auto", metadata={"help": "rollout backend: auto (vLLM if installed) | vllm | transformers"}
    )
    sample_batch_size: int = 256
    part_size: int = field(
        default=256, metadata={"help": "prompts per part (the unit of commit, resume and sharding)"}
    )
    shard_index: int = 0
    num_shards: int = 1
    dtype: str = "auto"
    device: str = "auto"
    keep_text: bool = field(default=True, metadata={"help": "store decoded response text (RepRate needs it)"})
    overwrite: bool = False

    def __post_init__(self):
        check(self.n >= 1, f"n must be >= 1, got {self.n}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(self.part_size >= 1, f"part_size must be >= 1, got {self.part_size}")
        check(self.num_shards >= 1, f"num_shards must be >= 1, got {self.num_shards}")
        check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}",
        )
        check_verifier(self.verifier)
        check_chat_template_mode(self.chat_template)
        check_device_and_dtype(self.device, self.dtype)


@dataclass
class ScoreConfig:
    rollouts: str = field(metadata={"help": "rollouts store written by `lopd rollout`"})
    teacher: str = field(metadata={"help": "teacher model directory (must be the student's SFT teacher)"})
    out: str = field(metadata={"help": "output store directory"})
    topk: int = field(
        default=0, metadata={"help": "also store the teacher's top-k ids and log-probs per position"}
    )
    topk_tail: str = field(
        default="renormalize", metadata={"help": "how objectives treat mass outside the top-k"}
    )
    allow_inconsistent_teacher: bool = field(
        default=False,
        metadata={"help": "score with a teacher other than the SFT teacher (recorded in the manifest)"},
    )
    sft_teacher: str = field(
        default="", metadata={"help": "declare the SFT teacher of a student that has no provenance"}
    )
    allow_duplicate: bool = field(
        default=False, metadata={"help": "write even if a store with the same content id exists elsewhere"}
    )
    scoring_backend: str = field(
        default="transformers",
        metadata={"help": "teacher scoring: transformers (chunked) | vllm (prompt_logprobs)"},
    )
    max_tokens_per_batch: int = 16384
    chunk_size: int = 1024
    shard_index: int = 0
    num_shards: int = 1
    dtype: str = "auto"
    device: str = "auto"
    overwrite: bool = False

    def __post_init__(self):
        check(self.topk >= 0, f"topk must be >= 0, got {self.topk}")
        check(
            self.scoring_backend in SCORING_BACKENDS,
            f"scoring_backend must be one of {SCORING_BACKENDS}, got {self.scoring_backend!r}",
        )
        check(
            self.topk_tail in TOPK_TAIL_TREATMENTS,
            f"topk_tail must be one of {TOPK_TAIL_TREATMENTS}, got {self.topk_tail!r}",
        )
        check(
            0 <= self.shard_index < self.num_shards,
            f"shard_index must be in [0, {self.num_shards}), got {self.shard_index}",
        )
        check_device_and_dtype(self.device, self.dtype)


@dataclass
class PrecomputeConfig(RolloutConfig):
    teacher: str = field(
        default="", metadata={"help": "teacher model directory (must be the student's SFT teacher)"}
    )
    topk: int = 0
    topk_tail: str = "renormalize"
    allow_inconsistent_teacher: bool = False
    sft_teacher: str = ""
    allow_duplicate: bool = False
    scoring_backend: str = "transformers"
    max_tokens_per_batch: int = 16384
    chunk_size: int = 1024

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.teacher), "precompute needs --teacher (or run `lopd rollout` alone)")
        self.score_config()

    def score_config(self) -> ScoreConfig:
        return ScoreConfig(
            rollouts=str(Path(self.out) / ROLLOUTS_SUBDIR),
            teacher=self.teacher,
            out=self.out,
            topk=self.topk,
            topk_tail=self.topk_tail,
            allow_inconsistent_teacher=self.allow_inconsistent_teacher,
            sft_teacher=self.sft_teacher,
            allow_duplicate=self.allow_duplicate,
            scoring_backend=self.scoring_backend,
            max_tokens_per_batch=self.max_tokens_per_batch,
            chunk_size=self.chunk_size,
            shard_index=self.shard_index,
            num_shards=self.num_shards,
            dtype=self.dtype,
            device=self.device,
            overwrite=self.overwrite,
        )


SCORING_BACKENDS = ("transformers", "vllm")


def make_scorer(config: ScoreConfig):
    """``(score(prompts, responses) -> list[ScoredSequence], close())`` for the configured backend."""
    if config.scoring_backend == "vllm":
        from lightning_opd.stage1.vllm_backend import VLLMScorer

        scorer = VLLMScorer(config.teacher, dtype=config.dtype)
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


class TokenRate:
    """Tokens per second since creation, for the progress bars' postfix."""

    def __init__(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> str:
        self.tokens += tokens
        return f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f} tok/s"


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


def run_rollouts(config: RolloutConfig, log=print) -> Path:
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
    sampler = make_sampler(config.student, sampling, config.device)
    header = {
        "kind": "rollouts",
        "student": {**asdict(student_id), "sft_teacher_fingerprint": None},
        "sampling": sampling_section(sampler.name, sampler.version, config),
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
    from lightning_opd.provenance import read_provenance

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
    bar = tqdm(todo, desc="rollout parts", unit="part")
    throughput = TokenRate()
    for part in bar:
        idx = keep[part * config.part_size : (part + 1) * config.part_size]
        rollouts = sampler.sample(
            [encoded[i] for i in idx], [records[i].prompt_id for i in idx], config.seed + part
        )
        rows = [
            {
                "prompt_id": r.prompt_id,
                "sample_index": r.sample_index,
                "prompt_ids": r.prompt_ids,
                "response_ids": r.response_ids,
                "behavior_logprobs": r.behavior_logprobs,
                "sampling_logprobs": r.sampling_logprobs,
                "teacher_logprobs": None,
                "finish_reason": r.finish_reason,
                "reward": None
                if answers[r.prompt_id] is None
                else grade(r.response_text, answers[r.prompt_id]),
                "response_text": r.response_text if config.keep_text else None,
            }
            for r in rollouts
        ]
        writer.write_part(part, rows)
        bar.set_postfix_str(throughput.add(sum(len(r["response_ids"]) for r in rows)))
    sampler.close()
    finalize_if_complete(writer, config.num_shards, log)
    return out


def run_scoring(config: ScoreConfig, log=print) -> Path:
    rollouts_root = Path(config.rollouts)
    if not (rollouts_root / "commits").exists() and not (rollouts_root / "manifest.json").exists():
        raise StoreError(f"{rollouts_root} holds no rollouts store; run `lopd rollout` first")
    rollout_header = StoreWriter.read_header(rollouts_root)
    student = rollout_header["student"]
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
    teacher_id.dtype = str(resolve_dtype(config.dtype, resolve_device(config.device))).replace("torch.", "")
    header = {
        **rollout_header,
        # A declared SFT teacher (--sft-teacher) fills in what the student's provenance could not say.
        "student": {**student, "sft_teacher_fingerprint": consistency["sft_teacher_fingerprint"]},
        "kind": "scored",
        "teacher": asdict(teacher_id),
        "teacher_consistency": consistency,
        "topk": None if not config.topk else {"k": config.topk, "tail_treatment": config.topk_tail},
        "extra": {**(rollout_header.get("extra") or {}), "scoring_backend": config.scoring_backend},
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
        with_reward="reward" in columns,
        with_sampling=SAMPLING_COLUMN in columns,
    )
    mine = my_parts(writer.num_parts, config.shard_index, config.num_shards)
    done = writer.committed_parts(mine)
    todo = [p for p in mine if p not in done]
    log(f"stage 1 scoring: {len(todo)} parts to score with {teacher_id.short()} ({config.scoring_backend})")
    score, close = make_scorer(config) if todo else (None, lambda: None)
    try:
        bar = tqdm(todo, desc="scoring parts", unit="part")
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


def run(config: RolloutConfig | ScoreConfig | PrecomputeConfig, log=print):
    prepare_output_dir(
        config.out, config, overwrite=config.overwrite, name="config.json", ignore=SHARD_FIELDS
    )
    with worker_lock(config):
        if isinstance(config, PrecomputeConfig):
            rollout_config = RolloutConfig(
                **{k: getattr(config, k) for k in RolloutConfig.__dataclass_fields__}
            )
            rollout_config.out = str(Path(config.out) / ROLLOUTS_SUBDIR)
            run_rollouts(rollout_config, log)
            out = run_scoring(config.score_config(), log)
        elif isinstance(config, RolloutConfig):
            out = run_rollouts(config, log)
        else:
            out = run_scoring(config, log)
    if (Path(out) / "manifest.json").exists():
        open_store(out)  # reopen through the reader: what a user gets is what we checked
    return out


def worker_lock(config: RolloutConfig | ScoreConfig):
    """Held for a whole run: a second run of the same worker (same --out and --shard-index) is refused at
    once instead of racing the first for the same parts. Workers with other shard indices run freely."""
    path = Path(config.out) / LOCKS_DIR / f"worker-{config.shard_index}.lock"
    busy = (
        f"another run is writing shard {config.shard_index} of {config.out} right now; wait for it to finish "
        "(a rerun then resumes), or choose another --out"
    )
    return file_lock(path, exclusive=True, blocking=False, busy_message=busy)
