"""Stage zero: teacher-consistent SFT. The teacher answers the SFT prompts; the student learns them.

    lopd sft --teacher runs/teacher --student runs/student-init --prompts prompts/sft.jsonl --out runs/sft

Writes into ``--out``: ``sft_config.json`` (this job's config; ``config.json`` is the model's),
``sft_data.jsonl`` (the teacher's answers,
reusable), the fine-tuned student (``save_pretrained``), ``metrics.jsonl`` and
``lopd_provenance.json``, which records the teacher's identity: stage one refuses to score this
student with any other teacher.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning_opd.config import check, prepare_output_dir
from lightning_opd.errors import InputError
from lightning_opd.evaluation.verifiers import VERIFIERS, resolve_verifier
from lightning_opd.models.fingerprint import (
    STAGE0_BEHAVIOR_MAX_BYTES,
    local_behavior,
    model_fingerprint,
    tokenizer_fingerprint,
    weight_bytes,
)
from lightning_opd.models.loading import (
    check_device_and_dtype,
    check_same_tokenizer,
    load_causal_lm,
    load_tokenizer,
    model_identity,
)
from lightning_opd.models.provenance import Provenance, write_provenance
from lightning_opd.prompts import check_chat_template_mode, encode_prompt, load_prompts
from lightning_opd.scale import ScaleFlags, prepare_student, resolve_save_dtype, save_student
from lightning_opd.stage0.sft import SFTExample, SFTTrainConfig, refuse_several_processes, train_sft
from lightning_opd.stage1.rollout import SamplingConfig
from lightning_opd.stage1.samplers import make_sampler
from lightning_opd.tracking import RunTracker, check_report_to

SFT_CONFIG_FILE = "sft_config.json"


@dataclass
class SFTJobConfig(ScaleFlags):
    teacher: str = field(metadata={"help": "teacher model directory (writes the SFT answers)"})
    student: str = field(metadata={"help": "student model directory to fine-tune"})
    prompts: str = field(metadata={"help": "SFT prompt set (.jsonl, .parquet or datasets dir)"})
    out: str = field(metadata={"help": "output directory for the fine-tuned student"})
    prompt_field: str = "prompt"
    samples_per_prompt: int = field(default=1, metadata={"help": "teacher answers per prompt"})
    temperature: float = field(default=0.7, metadata={"help": "teacher sampling temperature (0 = greedy)"})
    top_p: float = 0.9
    max_new_tokens: int = 64
    keep_correct_only: bool = field(
        default=False, metadata={"help": "drop teacher answers the verifier rejects"}
    )
    verifier: str = field(
        default="auto",
        metadata={
            "help": "auto (addition for the toy's a+b= prompts, else math) | math | last_number | addition"
        },
    )
    keep_truncated: bool = field(
        default=False,
        metadata={"help": "also train on answers cut at --max-new-tokens (off: they teach rambling)"},
    )
    steps: int = field(default=400, metadata={"help": "training steps (the most, with --stop-at-match)"})
    batch_size: int = 64
    micro_batch_size: int = field(
        default=0, metadata={"help": "examples per forward pass (gradient accumulation); 0 = the whole batch"}
    )
    max_tokens_per_micro_batch: int = field(
        default=0,
        metadata={
            "help": "token budget per forward pass instead of --micro-batch-size: the batch's examples "
            "grouped by length, longest first (rows x longest, or their sum with --pack); 0 = off"
        },
    )
    pack: bool = field(
        default=False,
        metadata={"help": "concatenate each micro-batch into one sequence (no padding): the same gradient"},
    )
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    mixed_precision: str = "no"
    seed: int = 0
    dtype: str = "auto"
    device: str = "auto"
    backend: str = field(
        default="auto", metadata={"help": "teacher sampling backend: auto|vllm|transformers"}
    )
    chat_template: str = "auto"
    holdout: int = field(
        default=0,
        metadata={"help": "hold out the teacher's answers to the last N prompts (never trained on)"},
    )
    stop_at_match: float = field(
        default=0.0,
        metadata={
            "help": "stop once the student reproduces this share of the held-out answers token for "
            "token (teacher-forced argmax; needs --holdout; 0 = train all --steps)"
        },
    )
    report_to: str = "none"
    overwrite: bool = False

    def __post_init__(self):
        check_report_to(self.report_to)
        check(self.samples_per_prompt >= 1, f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_chat_template_mode(self.chat_template)
        check_device_and_dtype(self.device, self.dtype)
        check(self.holdout >= 0, f"holdout must be >= 0, got {self.holdout}")
        check(
            self.stop_at_match == 0 or self.holdout > 0,
            "--stop-at-match needs --holdout N: the answers to check the student against",
        )
        self.check_scale_flags()
        self.train_config()  # validates the training fields early

    def train_config(self) -> SFTTrainConfig:
        return SFTTrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
            seed=self.seed,
            mixed_precision=self.mixed_precision,
            stop_at_match=self.stop_at_match,
            optim=self.optim,
            micro_batch_size=self.micro_batch_size,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            pack=self.pack,
        )


def sft_teacher_behavior(config: SFTJobConfig) -> dict:
    """The teacher's behaviour record, which lets stage one check a teacher it reaches only through a
    server (--scoring-backend server) without these weights; left to stage one for large teachers."""
    if weight_bytes(config.teacher) > STAGE0_BEHAVIOR_MAX_BYTES:
        return {}
    return {"behavior": local_behavior(config.teacher, config.device)}


def teacher_answers(config: SFTJobConfig, records, log) -> list[dict]:
    """Sample the teacher's answers (cached in sft_data.jsonl so a rerun skips generation)."""
    cache = Path(config.out) / "sft_data.jsonl"
    if cache.exists():
        log(f"stage 0: reusing teacher answers in {cache}")
        return [json.loads(line) for line in cache.read_text().splitlines()]
    tokenizer = load_tokenizer(config.teacher)
    sampling = SamplingConfig(
        n=config.samples_per_prompt,
        temperature=config.temperature,
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed,
        backend=config.backend,
        dtype=config.dtype,
        batch_size=256,
    )
    prompt_ids = [encode_prompt(tokenizer, r.prompt, config.chat_template) for r in records]
    log(f"stage 0: teacher answers {len(records)} prompts x {config.samples_per_prompt}")
    with contextlib.closing(
        make_sampler(config.teacher, sampling, config.device, progress="sft: teacher answers")
    ) as sampler:
        rollouts = sampler.sample(prompt_ids, [r.prompt_id for r in records], config.seed)
    answers = {r.prompt_id: r.answer for r in records}
    grade = VERIFIERS[resolve_verifier(config.verifier, records)]
    rows = []
    for r in rollouts:
        correct = None if answers[r.prompt_id] is None else grade(r.response_text, answers[r.prompt_id])
        rows.append(
            {
                "prompt_id": r.prompt_id,
                "sample_index": r.sample_index,
                "prompt_ids": r.prompt_ids,
                "response_ids": r.response_ids,
                "response_text": r.response_text,
                "finish_reason": r.finish_reason,
                "correct": correct,
            }
        )
    tmp = cache.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(cache)
    return rows


def run(config: SFTJobConfig, log=print) -> Path:
    refuse_several_processes()  # before the teacher answers anything
    tracker = RunTracker.for_run(config, "lopd-sft")  # --report-to: a missing package fails here, not later
    # Not config.json: --out is also the student's model directory, whose save_pretrained writes that name.
    # A tracker does not make another run: --report-to may change between reruns (teacher answers reused).
    out = prepare_output_dir(
        config.out, config, overwrite=config.overwrite, name=SFT_CONFIG_FILE, ignore=frozenset({"report_to"})
    )
    # Identity and tokenizer checks come first: a mismatch must fail before minutes of generation.
    teacher_id = model_identity(config.teacher)
    student_id = model_identity(config.student)
    check_same_tokenizer(student_id, teacher_id, "stage 0 (SFT)")
    records = load_prompts(config.prompts, prompt_field=config.prompt_field)
    if config.holdout >= len(records):
        raise InputError(
            f"--holdout {config.holdout} leaves nothing to train on: {config.prompts} has "
            f"{len(records)} prompts; hold out fewer"
        )
    rows = teacher_answers(config, records, log)
    if config.keep_correct_only:
        rows = [r for r in rows if r["correct"]]
    held_out = {r.prompt_id for r in records[len(records) - config.holdout :]} if config.holdout else set()
    # Truncated answers teach the student to ramble; keep only the ones that ended on EOS.
    usable = [r for r in rows if r["finish_reason"] == "stop" or config.keep_truncated]
    examples = [
        SFTExample(r["prompt_ids"], r["response_ids"]) for r in usable if r["prompt_id"] not in held_out
    ]
    holdout = [SFTExample(r["prompt_ids"], r["response_ids"]) for r in usable if r["prompt_id"] in held_out]
    if config.stop_at_match and not holdout:
        raise InputError("stage 0: no usable held-out teacher answers for --stop-at-match; raise --holdout")
    if not examples:
        raise InputError(
            "stage 0: no usable teacher answers (all truncated or rejected); raise --max-new-tokens"
        )
    correct = [r["correct"] for r in rows if r["correct"] is not None]
    if correct:
        log(
            f"stage 0: {len(examples)} SFT examples; teacher answers correct: {100 * sum(correct) / len(correct):.1f}%"
        )
    # fp32 master weights; --mixed-precision bf16 runs the compute in bf16.
    student, tokenizer = load_causal_lm(config.student, dtype="float32", device=config.device)
    student = prepare_student(student, config)  # gradient checkpointing, LoRA adapters
    history = train_sft(
        student,
        examples,
        config.train_config(),
        pad_id=tokenizer.pad_token_id,
        log=log,
        holdout=holdout,
        tracker=tracker,
    )
    save_student(student, student.state_dict(), out, resolve_save_dtype(config.save_dtype, config.student))
    tokenizer.save_pretrained(out)
    (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    write_provenance(
        out,
        Provenance(
            stage="sft",
            model_fingerprint=model_fingerprint(out),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            sft_teacher={**asdict(teacher_id), **sft_teacher_behavior(config)},
            config=asdict(config),
            inputs={
                "student_init": asdict(student_id),
                "num_examples": len(examples),
                "num_holdout": len(holdout),
                # Where training ended and the held-out match there (with --stop-at-match).
                "stopped": history[-1] if history and "val_match" in history[-1] else None,
            },
        ),
    )
    log(f"stage 0: fine-tuned student saved to {out}")
    return out
