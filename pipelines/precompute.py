"""Stage one: student rollouts, then teacher scoring, into a sharded Parquet logprob store.

    lopd precompute --student runs/sft --teacher runs/teacher --prompts prompts/opd.jsonl --out runs/store
    # the same in two steps (e.g. rollouts on one machine, scoring on another):
    lopd rollout --student runs/sft --prompts prompts/opd.jsonl --out runs/rollouts
    lopd score --rollouts runs/rollouts --teacher runs/teacher --out runs/store
    # scale out: N processes (any scheduler), then one merge
    lopd precompute ... --shard-index $i --num-shards N   # for i in 0..N-1
    lopd store finalize runs/store
    # the same as a Slurm job array or Ray tasks: examples/slurm/submit.sh, examples/ray_precompute.py
    # every GPU of one machine (each worker pinned to its GPUs), then the manifest, in one command:
    lopd precompute ... --local-workers 8
    # vLLM engines: --tensor-parallel-size/--max-num-seqs/--gpu-memory-utilization/--max-model-len/
    # --max-num-batched-tokens
    # (sampler), --scoring-... (scorer); recorded in the manifest (sampling.engine, extra.scoring_engine)

Work is cut into fixed *parts* of the prompt set (``--part-size`` prompts each); worker i of N does
the parts with ``part % N == i``, so a sharded run writes exactly the parts a single run would. A part
is committed once written; a rerun after a crash skips committed parts. The sampler and the teacher
never share the device: all of this worker's rollouts are written first, then the teacher scores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lightning_opd.config import check, prepare_output_dir
from lightning_opd.evaluation.verifiers import check_verifier
from lightning_opd.models.loading import check_device_and_dtype
from lightning_opd.prompts import check_chat_template_mode
from lightning_opd.stage1.build import (
    ENGINE_FIELDS,
    SCORING_BACKENDS,
    SHARD_FIELDS,
    SamplerEngineFlags,
    ScoringEngineFlags,
    check_engine_fields,
    run_rollouts,
    run_scoring,
)
from lightning_opd.stage1.local import run_local_workers
from lightning_opd.stage1.served import SERVER_FIELDS, ServerFlags, preflight
from lightning_opd.store import StoreWriter, open_store
from lightning_opd.store.files import file_lock
from storage_schemas import logprob_store_v1 as fmt
from storage_schemas.logprob_store_v1 import (
    LOCKS_DIR,
    ROLLOUTS_SUBDIR,
    TOPK_TAIL_TREATMENTS,
)

TEACHER_HELP = (
    "teacher model directory (must be the student's SFT teacher); with --scoring-backend server, its "
    "tokenizer and config (weights optional)"
)


@dataclass
class RolloutConfig(SamplerEngineFlags):
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
        check_engine_fields(self, "", self.backend, "--backend")


@dataclass
class ScoreConfig(ScoringEngineFlags, ServerFlags):
    rollouts: str = field(metadata={"help": "rollouts store written by `lopd rollout`"})
    teacher: str = field(metadata={"help": TEACHER_HELP})
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
        metadata={
            "help": "teacher scoring: transformers (chunked) | vllm (prompt_logprobs) | server (--teacher-url)"
        },
    )
    compact_logprobs: bool = field(
        default=False,
        metadata={
            "help": "store log-probs as 16-bit fixed point (format 1.2: error <= 2.4e-4 nats on "
            "[-32, 0], clamped below; about half the bytes)"
        },
    )
    compact_topk_scale: int = field(
        default=0,
        metadata={
            "help": "also compact the top-k (format 1.3; implies --compact-logprobs): ids sorted and stored "
            "as gaps, top-k log-probs in steps of 1/N nats (error <= 1/(2N)); N a power of two <= 2048, "
            f"e.g. {fmt.SUGGESTED_TOPK_SCALE}; 0 = off"
        },
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
        if self.compact_topk_scale:
            check(self.topk > 0, "--compact-topk-scale compacts the top-k columns: it needs --topk > 0")
            problems = fmt.encoding_problems(fmt.fixed16_encoding(topk_scale=self.compact_topk_scale))
            check(not problems, f"--compact-topk-scale: {'; '.join(problems)}")
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
        check_engine_fields(self, "scoring_", self.scoring_backend, "--scoring-backend")
        self.check_server_flags()


@dataclass
class PrecomputeConfig(RolloutConfig, ScoringEngineFlags, ServerFlags):
    teacher: str = field(default="", metadata={"help": TEACHER_HELP})
    topk: int = 0
    topk_tail: str = "renormalize"
    allow_inconsistent_teacher: bool = False
    sft_teacher: str = ""
    allow_duplicate: bool = False
    scoring_backend: str = "transformers"
    compact_logprobs: bool = False
    compact_topk_scale: int = 0
    max_tokens_per_batch: int = 16384
    chunk_size: int = 1024
    local_workers: int = field(
        default=1,
        metadata={
            "help": "run N shard workers on this machine, each on its own GPUs (max of the two tensor-parallel "
            "sizes each), then commit the store; a rerun resumes"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.teacher), "precompute needs --teacher (or run `lopd rollout` alone)")
        check(self.local_workers >= 1, f"local_workers must be >= 1, got {self.local_workers}")
        check(
            self.local_workers == 1 or self.num_shards == 1,
            "--local-workers starts the shard workers itself; drop --shard-index/--num-shards",
        )
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
            compact_logprobs=self.compact_logprobs,
            compact_topk_scale=self.compact_topk_scale,
            max_tokens_per_batch=self.max_tokens_per_batch,
            chunk_size=self.chunk_size,
            **{f"scoring_{name}": getattr(self, f"scoring_{name}") for name in ENGINE_FIELDS},
            **{name: getattr(self, name) for name in SERVER_FIELDS},
            shard_index=self.shard_index,
            num_shards=self.num_shards,
            dtype=self.dtype,
            device=self.device,
            overwrite=self.overwrite,
        )


def run(config: RolloutConfig | ScoreConfig | PrecomputeConfig, log=print):
    if isinstance(config, PrecomputeConfig) and config.local_workers > 1:
        return run_local(config, log)
    prepare_output_dir(
        config.out,
        config,
        overwrite=config.overwrite,
        name="config.json",
        ignore=SHARD_FIELDS | SERVER_FIELDS,
    )
    with worker_lock(config):
        if isinstance(config, PrecomputeConfig):
            rollout_config = RolloutConfig(
                **{k: getattr(config, k) for k in RolloutConfig.__dataclass_fields__}
            )
            rollout_config.out = str(Path(config.out) / ROLLOUTS_SUBDIR)
            preflight(config.score_config(), config.student, log)  # a served teacher: checked before rollouts
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


def run_local(config: PrecomputeConfig, log=print) -> Path:
    """``--local-workers N``: N shard workers on this machine (stage1/local.py), then the manifest."""
    out = run_local_workers(config, "precompute", log)
    if not (out / "manifest.json").exists():  # all done, but none saw the others finish
        StoreWriter.reopen(out).finalize(wait_s=0)
    open_store(out)
    log(f"stage 1: {config.local_workers} local workers done: {out}")
    return out
