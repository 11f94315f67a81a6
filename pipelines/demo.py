"""The whole pipeline on the embedded toy task, end to end, offline next to online, with one table.

    lopd demo                      # ~2.5 min on 2 CPU cores once the toy teacher is cached
    lopd demo --seeds 3            # the whole pipeline (prompts, SFT, store, stage two) per seed: mean ± 95% CI
    lopd demo --workdir runs/demo2 --opd-steps 60

toy teacher (trained once, cached) -> per seed: stage 0 (SFT of a smaller student on the teacher's
answers) -> stage 1 (student rollouts + teacher scoring into a logprob store) -> stage 2 (offline
Lightning OPD from that store, no teacher process) next to standard online OPD (live teacher) ->
greedy accuracy of every model on held-out problems, and the wall time of offline vs online.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning_opd.config import check, prepare_output_dir, write_json_atomic
from lightning_opd.evaluation.accuracy import evaluate_model
from lightning_opd.models.loading import load_causal_lm
from lightning_opd.prompts import load_prompts
from lightning_opd.reporting.tables import format_results, summarize
from lightning_opd.toy.models import MICRO_SPEC, STUDENT_SPEC, TEACHER_SPEC
from lightning_opd.toy.teacher import (
    ToyTeacherRecipe,
    ensure_toy_teacher,
    write_toy_prompt_sets,
    write_toy_student_init,
)
from pipelines import precompute, sft, train, train_online

LABELS = {
    "lightning": "Lightning OPD (sampled token)",
    "topk": "Lightning OPD (top-k reverse KL)",
    "online": "online OPD (live teacher)",
}


@dataclass
class DemoConfig:
    workdir: str = field(default="runs/demo", metadata={"help": "where every stage writes"})
    cache_dir: str = field(
        default="", metadata={"help": "toy teacher cache (default: $LOPD_CACHE or .cache/lightning-opd)"}
    )
    seeds: int = field(
        default=1, metadata={"help": "run stages 0-2 once per seed (0..N-1) and report mean ± 95% CI"}
    )
    sft_prompts: int = 1000
    opd_prompts: int = 4096
    eval_prompts: int = 500
    sft_steps: int = field(default=600, metadata={"help": "stage zero's most steps"})
    sft_target: float = field(
        default=0.70,
        metadata={
            "help": "stage zero stops once the student reproduces this share of held-out teacher answers "
            "(0 = train all --sft-steps); pins the SFT start below the teacher on every seed and machine"
        },
    )
    sft_holdout: int = field(default=512, metadata={"help": "held-out teacher answers for --sft-target"})
    opd_steps: int = 100
    opd_lr: float = 3e-5
    opd_batch_size: int = 64
    warmup_steps: int = field(default=10, metadata={"help": "stage-two learning-rate warmup"})
    trust_region: float = field(default=0.2, metadata={"help": "stage two's trust region around π_ref"})
    topk: int = field(
        default=8, metadata={"help": "teacher top-k kept in the store (for the top-k objective)"}
    )
    objectives: str = field(
        default="lightning,topk,online",
        metadata={"help": "stage-two runs: lightning (sampled token, offline), topk (offline), online"},
    )
    online_n: int = field(default=4, metadata={"help": "online OPD: samples per prompt each step"})
    rollouts_per_prompt: int = 1
    horizon: int = 48
    temperature: float = field(default=0.7, metadata={"help": "stage one's sampling temperature"})
    teacher_steps: int = 300
    micro: bool = field(default=False, metadata={"help": "tiny sizes for tests (numbers meaningless)"})
    seed: int = field(default=0, metadata={"help": "the first seed"})
    backend: str = "auto"
    overwrite: bool = field(
        default=False, metadata={"help": "delete --workdir first (the toy teacher cache is kept)"}
    )

    def __post_init__(self):
        check(self.eval_prompts > 0, f"eval_prompts must be positive, got {self.eval_prompts}")
        check(self.seeds >= 1, f"seeds must be >= 1, got {self.seeds}")
        check(0 <= self.sft_target <= 1, f"sft_target must be in [0, 1], got {self.sft_target}")
        check(self.sft_target == 0 or self.sft_holdout > 0, "--sft-target needs --sft-holdout N (N >= 1)")
        unknown = sorted(set(self.objective_names()) - set(LABELS))
        check(not unknown, f"unknown objectives {unknown}; choose among {sorted(LABELS)}")

    def objective_names(self) -> list[str]:
        return [o for o in self.objectives.split(",") if o]


def _timed(timings: dict, key: str, fn):
    started = time.time()
    result = fn()
    timings[key] = timings.get(key, 0.0) + time.time() - started
    return result


def toy_teacher(config: DemoConfig, log, style: str = "columns") -> Path:
    """The toy teacher (trained once, then cached under a key of its recipe); ``style`` = how it writes
    each column (another style gives the teacher-consistency control of ``lopd compare``)."""
    spec = MICRO_SPEC if config.micro else TEACHER_SPEC
    recipe = ToyTeacherRecipe(spec=spec, steps=config.teacher_steps, seed=0, style=style)
    return ensure_toy_teacher(recipe, Path(config.cache_dir) if config.cache_dir else None, log=log)


def toy_prompts(config: DemoConfig, work: Path, seed: int) -> dict[str, Path]:
    """Disjoint SFT (+ its held-out tail) / OPD / eval prompt sets for one seed. The eval problems are
    the same for every seed (drawn with ``config.seed``), so seeds differ by their training only."""
    sizes = dict(
        sft=config.sft_prompts + config.sft_holdout, opd=config.opd_prompts, eval=config.eval_prompts
    )
    return write_toy_prompt_sets(work / "prompts", **sizes, seed=seed, eval_seed=config.seed)


def stage_zero(config: DemoConfig, teacher: Path, work: Path, prompts: dict, seed: int, log) -> Path:
    student_init, sft_out = work / "student-init", work / "sft"
    if not (student_init / "config.json").exists():
        write_toy_student_init(student_init, MICRO_SPEC if config.micro else STUDENT_SPEC, seed=seed)
    if not (sft_out / "lopd_provenance.json").exists():
        job = sft.SFTJobConfig(
            teacher=str(teacher),
            student=str(student_init),
            prompts=str(prompts["sft"]),
            out=str(sft_out),
            steps=config.sft_steps,
            warmup_steps=min(20, config.sft_steps // 10),
            holdout=config.sft_holdout,
            stop_at_match=config.sft_target,
            keep_truncated=config.micro,  # an untrained micro teacher never stops
            temperature=0.0,
            max_new_tokens=config.horizon,
            seed=seed,
            backend=config.backend,
            verifier="addition",
            overwrite=True,
        )
        sft.run(job, log=log)
    return sft_out


def stage_one(config: DemoConfig, teacher: Path, student: Path, work: Path, prompts, seed: int, log) -> Path:
    store = work / "store"
    if not (store / "manifest.json").exists():
        job = precompute.PrecomputeConfig(
            student=str(student),
            teacher=str(teacher),
            prompts=str(prompts["opd"]),
            out=str(store),
            n=config.rollouts_per_prompt,
            max_new_tokens=config.horizon,
            temperature=config.temperature,
            seed=seed,
            backend=config.backend,
            topk=config.topk,
            allow_duplicate=True,  # each demo workdir is self-contained
            overwrite=True,
        )
        precompute.run(job, log=log)
    return store


def stage_two(
    config: DemoConfig, name: str, student: Path, teacher: Path, store: Path, work, prompts, seed, log
):
    """One stage-two run (offline from the store, or online with the live teacher); its final model."""
    out = work / f"opd-{name}"
    final = out / "final"
    if (final / "lopd_provenance.json").exists():
        return final
    common = dict(
        student=str(student),
        out=str(out),
        steps=config.opd_steps,
        lr=config.opd_lr,
        warmup_steps=config.warmup_steps,
        sample_reduction="mean",
        seed=seed,
        log_every=max(1, config.opd_steps // 4),
        overwrite=True,
    )
    if name == "online":
        job = train_online.OnlineConfig(
            teacher=str(teacher),
            prompts=str(prompts["opd"]),
            prompts_per_step=max(1, config.opd_batch_size // config.online_n),
            n=config.online_n,
            max_new_tokens=config.horizon,
            micro_batch_size=config.opd_batch_size,
            **common,
        )
        return train_online.run(job, log=log)
    job = train.TrainConfig(
        stores=str(store),
        objective=name,
        batch_size=config.opd_batch_size,
        micro_batch_size=config.opd_batch_size,
        trust_region=config.trust_region,
        **common,
    )
    return train.run(job, log=log)


def _accuracy(path: Path, records, horizon: int) -> float:
    model, tokenizer = load_causal_lm(path, dtype="float32")
    result = evaluate_model(model, tokenizer, records, model_name=str(path), max_new_tokens=horizon)
    return result.greedy_accuracy


def run_seed(config: DemoConfig, teacher: Path, work: Path, seed: int, log) -> dict:
    """Stages 0-2 and evaluation for one seed: accuracies and seconds per model."""
    timings: dict[str, float] = {}
    prompts = toy_prompts(config, work, seed)
    records = load_prompts(prompts["eval"])
    student = _timed(timings, "stage 0: SFT", lambda: stage_zero(config, teacher, work, prompts, seed, log))
    offline = [o for o in config.objective_names() if o != "online"]
    store = None
    if offline:
        store = _timed(
            timings,
            "stage 1: rollouts + scoring",
            lambda: stage_one(config, teacher, student, work, prompts, seed, log),
        )
    accuracy = {"SFT student": _accuracy(student, records, config.horizon)}
    seconds = {}
    for name in config.objective_names():
        key = f"stage 2: {name}"
        final = _timed(
            timings,
            key,
            lambda n=name: stage_two(config, n, student, teacher, store, work, prompts, seed, log),
        )
        accuracy[LABELS[name]] = _accuracy(final, records, config.horizon)
        # Offline pays stage one once for every run from the store; online pays its teacher every step.
        seconds[LABELS[name]] = timings[key] + (
            timings["stage 1: rollouts + scoring"] if name != "online" else 0
        )
    return {"seed": seed, "accuracy": accuracy, "seconds": seconds, "timings_s": timings}


def run(config: DemoConfig, log=print) -> dict:
    if config.overwrite:
        shutil.rmtree(config.workdir, ignore_errors=True)
    # A rerun with the same config resumes stage by stage; a different config is refused (see --overwrite).
    work = prepare_output_dir(config.workdir, config)
    started = time.time()
    teacher = toy_teacher(config, log)
    teacher_s = time.time() - started
    seeds = [config.seed + i for i in range(config.seeds)]
    per_seed = []
    for seed in seeds:
        seed_dir = work if config.seeds == 1 else work / f"seed-{seed}"
        log(f"demo: seed {seed}")
        per_seed.append(run_seed(config, teacher, seed_dir, seed, log))
    first = work if config.seeds == 1 else work / f"seed-{seeds[0]}"
    eval_records = load_prompts(first / "prompts" / "eval.jsonl")
    summary = {
        "teacher_accuracy": _accuracy(teacher, eval_records, config.horizon),
        "teacher_s": teacher_s,
        "seeds": per_seed,
        "summary": summarize(per_seed),
    }
    log("\n".join(["", "=" * 72, format_results(summary, config.eval_prompts)]))
    write_json_atomic(work / "results.json", summary)
    return summary


def load_results(workdir: str | Path) -> dict:
    return json.loads((Path(workdir) / "results.json").read_text())
