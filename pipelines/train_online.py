"""Standard (online) on-policy distillation, METHODS.md §1: the baseline Lightning OPD replaces.

    lopd train-online --student runs/sft --teacher runs/teacher --prompts prompts/opd.jsonl --out runs/online \\
        --steps 100 --prompts-per-step 16 --n 4 --max-new-tokens 64 --lr 1e-5
    lopd train-online ... --objective opd_plus --divergence forward_kl           # OPD+ online
    lopd train-online ... --ref-kl-coef 0.01 --gold-nll-coef 0.1                 # StableOPD online
    lopd train-online ... --max-new-tokens 100 --objective topk --topk 20        # ESR online
    lopd train-online ... --write-store runs/online-store   # keep every step's rollouts as a store

Every step the current student samples ``--n`` responses for ``--prompts-per-step`` prompts (the
transformers sampler on the in-memory weights: vLLM loads weights from disk and cannot follow a
model that changes every step), the teacher — loaded in this process, and checked to be the
student's SFT teacher before anything is loaded — scores the sampled tokens, and the objective code
of offline training updates the student once, with the importance ratio to the sampler's log-probs.

Writes into ``--out``: ``config.json``, ``metrics.jsonl`` (per step: the objective's metrics, the
rollouts' TruncRate/RepRate/length/reward, time in sampling / teacher scoring / update), checkpoints
(``--save-every``; a rerun of the command resumes exactly) and ``final/`` with provenance
(stage ``online_opd``). One process: the teacher, the sampler and the trainer share the device.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed

from lightning_opd.config import check, prepare_output_dir
from lightning_opd.errors import ConfigError, InputError
from lightning_opd.models.consistency import teacher_consistency
from lightning_opd.models.loading import check_same_tokenizer, load_causal_lm, model_identity
from lightning_opd.packing import resolve_attn_implementation
from lightning_opd.progress import step_bar
from lightning_opd.prompts import encode_prompt, load_prompts, prompt_set_hash
from lightning_opd.scale import prepare_student
from lightning_opd.stage1.rollout import SamplingConfig
from lightning_opd.stage2.flags import RESUMABLE_FIELDS, TrainingFlags, warn_unused_objective_flags
from lightning_opd.stage2.gold import GoldSolutions
from lightning_opd.stage2.horizons import check_horizon, horizon_at
from lightning_opd.stage2.online import (
    OnlineSession,
    evaluate_greedy,
    online_step,
    optimizer_step,
    status_line,
)
from lightning_opd.stage2.runs import (
    MetricsLog,
    due,
    eval_records,
    resume,
    save_checkpoint,
    timer,
    write_final_model,
)
from lightning_opd.stage2.step import make_optimizer, update_inputs
from lightning_opd.store import StoreWriter
from lightning_opd.tracking import RunTracker
from storage_schemas.logprob_store_v1 import prompt_set_section, sampling_section


@dataclass
class OnlineConfig(TrainingFlags):
    """``lopd train-online``: the shared training flags (``TrainingFlags``) plus the live teacher and
    the sampler."""

    student: str = field(metadata={"help": "SFT'd student: it samples every step and is trained"})
    teacher: str = field(metadata={"help": "live teacher (must be the student's SFT teacher)"})
    prompts: str = field(metadata={"help": "OPD prompt set (answers graded into train_reward)"})
    out: str = field(metadata={"help": "output directory"})
    topk: int = field(default=0, metadata={"help": "teacher top-k scored live (objective topk needs it)"})
    prompts_per_step: int = 16
    n: int = field(default=4, metadata={"help": "samples per prompt (4 in the reference implementation)"})
    temperature: float = field(default=1.0, metadata={"help": "1.0: sample from pi_theta itself"})
    top_p: float = 1.0
    max_new_tokens: int = field(default=64, metadata={"help": "generation horizon T (the horizon is of T)"})
    sample_batch_size: int = 256
    max_tokens_per_batch: int = field(default=16384, metadata={"help": "teacher scoring batch budget"})
    teacher_dtype: str = "auto"
    prompt_field: str = "prompt"
    chat_template: str = "auto"
    write_store: str = field(
        default="", metadata={"help": "also write every step's rollouts as a part of a store here"}
    )
    allow_inconsistent_teacher: bool = False
    sft_teacher: str = field(
        default="", metadata={"help": "declare the SFT teacher of a student that has no provenance"}
    )

    on_policy: ClassVar[bool] = True  # StableOPD's ref-KL: the on-policy estimator, in the update step

    def __post_init__(self):
        super().__post_init__()
        check(self.prompts_per_step > 0, f"prompts_per_step must be positive, got {self.prompts_per_step}")
        check(self.topk >= 0, f"topk must be >= 0, got {self.topk}")
        check(
            not (self.objective == "topk" and self.topk == 0),
            "objective topk needs the teacher's top-k: pass --topk K (e.g. 20)",
        )
        self.sampling(0)
        check_horizon(self.horizon_config(), self.max_new_tokens)
        self.build_objective()
        warn_unused_objective_flags(self)

    def sampling(self, step: int) -> SamplingConfig:
        """Step ``step``'s sampler settings: its own seed, the horizon in force as max_new_tokens."""
        horizon = horizon_at(self.horizon_config(), step, self.max_new_tokens)
        return SamplingConfig(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=horizon,
            seed=self.seed + step,
            batch_size=self.sample_batch_size,
            backend="transformers",
        )


class _ScheduleState:
    """Stands in for the offline reader in checkpoints: the prompt schedule is a function of the step."""

    def state_dict(self) -> dict:
        return {"prompt_schedule": "prompt_batch(seed, step)"}


def check_teacher(config: OnlineConfig, log) -> tuple[dict, object]:
    """The stage-one gate (METHODS §2), before any model is loaded: same tokenizer, the SFT teacher."""
    teacher_id = model_identity(config.teacher)
    check_same_tokenizer(model_identity(config.student), teacher_id, "online OPD")
    consistency = teacher_consistency(
        student_path=config.student,
        teacher=teacher_id,
        allow_inconsistent=config.allow_inconsistent_teacher,
        declared_sft_teacher=config.sft_teacher or None,
        log=log,
    )
    return consistency, teacher_id


def encode_prompts(config: OnlineConfig, records, tokenizer, max_context: int):
    """Token ids of the prompts that leave room for the horizon; the rest are skipped with a warning."""
    encoded = [encode_prompt(tokenizer, r.prompt, config.chat_template) for r in records]
    keep = [
        i for i, ids in enumerate(encoded) if len(ids) > 0 and len(ids) + config.max_new_tokens <= max_context
    ]
    if len(keep) < len(records):
        warnings.warn(
            f"online OPD: skipped {len(records) - len(keep)} of {len(records)} prompts that do not leave "
            f"{config.max_new_tokens} tokens of the {max_context}-token context",
            stacklevel=2,
        )
    if len(keep) < config.prompts_per_step:
        raise InputError(
            f"{config.prompts} has {len(keep)} usable prompts, fewer than --prompts-per-step {config.prompts_per_step}"
        )
    return [records[i] for i in keep], [encoded[i] for i in keep]


def open_online_store(config: OnlineConfig, records, student_id, teacher_id, consistency) -> StoreWriter:
    """A scored store with one part per step. ``student`` is the *initial* student; part k holds the
    rollouts of the student after k updates, with that student's log-probs as behaviour log-probs."""
    header = {
        "kind": "scored",
        "student": {**asdict(student_id), "sft_teacher_fingerprint": consistency["sft_teacher_fingerprint"]},
        "teacher": asdict(teacher_id),
        "teacher_consistency": consistency,
        "sampling": sampling_section("transformers", transformers.__version__, config),
        "horizon": config.max_new_tokens,
        "prompt_set": prompt_set_section(
            str(Path(config.prompts).resolve()),
            content_hash=prompt_set_hash(records),
            num_prompts=len(records),
            skipped=0,
            part_size=config.prompts_per_step,
        ),
        "topk": {"k": config.topk, "tail_treatment": config.topk_tail} if config.topk else None,
        "extra": {
            "online": {
                "run_id": config.run_id(),
                "policy": "part k was sampled by the student after k online updates (behaviour log-probs are its)",
                "horizon_schedule": asdict(config.horizon_config()),
            }
        },
    }
    return StoreWriter(
        config.write_store,
        header,
        num_parts=config.steps,
        topk=config.topk or None,
        with_text=True,
        with_reward=True,
        with_sampling=True,
    )


def run(config: OnlineConfig, log=print) -> Path:
    consistency, teacher_id = check_teacher(config, log)  # refuse before writing or loading anything
    tracker = RunTracker.for_run(config, "lopd-train-online")  # --report-to
    accelerator = Accelerator(mixed_precision=config.mixed_precision, **tracker.accelerator_kwargs())
    if accelerator.num_processes > 1:
        raise ConfigError(
            "online OPD runs in one process (sampler, teacher and trainer share it); drop accelerate launch"
        )
    out = prepare_output_dir(config.out, config, overwrite=config.overwrite, ignore=RESUMABLE_FIELDS)
    tracker.start(accelerator)
    set_seed(config.seed)
    device = str(accelerator.device)  # the trainer's device; teacher and sampler share it
    attention = resolve_attn_implementation(config.attn_implementation, device)
    model, tokenizer = load_causal_lm(
        config.student, dtype="float32", device=device, attn_implementation=attention
    )
    teacher, _ = load_causal_lm(config.teacher, dtype=config.teacher_dtype, device=device)
    teacher.requires_grad_(False)
    # π_ref of StableOPD is the initial student; online it no longer samples, so a frozen copy scores.
    reference = copy.deepcopy(model).requires_grad_(False).eval() if config.ref_kl_coef > 0 else None
    max_context = int(model.config.max_position_embeddings)
    records, encoded = encode_prompts(
        config, load_prompts(config.prompts, prompt_field=config.prompt_field), tokenizer, max_context
    )
    gold = None
    if config.gold_nll_coef > 0:
        gold = GoldSolutions.load(config.gold_prompts or config.prompts, tokenizer)
    objective = config.build_objective()
    model = prepare_student(model, config)  # after the reference copy: π_ref is the plain student
    model.train()
    optimizer, scheduler = make_optimizer(model, config)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run_id = config.run_id()
    start_step, _ = resume(accelerator, config, run_id, log, "online OPD")
    writer = None
    if config.write_store:
        student_id = model_identity(config.student)
        writer = open_online_store(config, records, student_id, teacher_id, consistency)
    metrics = MetricsLog(out / "metrics.jsonl", truncate_after_step=start_step, tracker=tracker)
    eval_prompts = eval_records(config)
    inputs = update_inputs(
        config,
        objective,
        horizon=config.max_new_tokens,
        pad_id=tokenizer.pad_token_id,
        topk=config.topk if objective.needs_topk else None,
        gold=gold,
    )
    log(
        f"online OPD: {len(records)} prompts, {config.prompts_per_step}x{config.n} rollouts per step, "
        f"T={config.max_new_tokens}, objective {config.objective}, teacher {teacher_id.short()} in process"
    )
    session = OnlineSession(
        config, accelerator, model, teacher, reference, tokenizer, records, encoded, inputs, writer
    )
    started = timer()
    for step in step_bar(start_step, config.steps, "online OPD"):
        row = online_step(session, step)
        optimizer_step(accelerator, model, optimizer, scheduler, config, step, row)
        row["elapsed_s"] = timer() - started
        if eval_prompts and due(config.eval_every, step + 1, config.steps):
            result = evaluate_greedy(
                accelerator.unwrap_model(model),
                tokenizer,
                eval_prompts,
                verifier=config.verifier,  # resolved against the eval prompts
                max_new_tokens=config.max_new_tokens,
                chat_template=config.chat_template,
            )
            row.update({f"eval_{k}": v for k, v in result.items()})
        metrics.write(row)
        if due(config.log_every, step + 1, config.steps):
            log(status_line(row))
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            save_checkpoint(accelerator, out, step + 1, _ScheduleState(), run_id, config.keep_checkpoints)
    metrics.close()
    if writer is not None and not writer.is_finalized():
        manifest = writer.finalize()
        log(f"online OPD: {manifest.stats.num_rollouts} rollouts kept as a store in {writer.root}")
    return save_final(
        accelerator, model, tokenizer, config, out, teacher_id, consistency, records, writer, log
    )


def save_final(
    accelerator, model, tokenizer, config, out: Path, teacher_id, consistency, records, writer, log
) -> Path:
    final = out / "final"
    inputs = {
        "teacher": asdict(teacher_id),
        "teacher_consistency": consistency,
        "prompt_set": {"path": config.prompts, "content_hash": prompt_set_hash(records)},
    }
    if writer is not None:
        inputs["store"] = {"path": str(writer.root), "store_id": writer.store_id}
    write_final_model(accelerator, model, tokenizer, final, stage="online_opd", config=config, inputs=inputs)
    log(f"online OPD: trained student saved to {final}")
    return final
