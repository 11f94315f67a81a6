"""The whole pipeline on the embedded toy task, end to end, with one results table.

    lopd demo                      # ~10 min on 2 CPU cores from scratch, less with the cached teacher
    lopd demo --workdir runs/demo2 --opd-steps 60

toy teacher (trained once, cached) -> stage 0: SFT of a smaller student on the teacher's answers ->
stage 1: student rollouts + teacher scoring into a logprob store -> stage 2: offline Lightning OPD
-> greedy accuracy of teacher, SFT student and distilled student on held-out problems.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lightning_opd.config import check, prepare_output_dir, write_json_atomic
from lightning_opd.evaluation import evaluate_model, format_table
from lightning_opd.modeling import load_causal_lm
from lightning_opd.prompts import load_prompts
from lightning_opd.store import open_store
from lightning_opd.store.summary import format_summary, summarize_store
from lightning_opd.toy.models import STUDENT_SPEC, TEACHER_SPEC, ToyModelSpec
from lightning_opd.toy.teacher import (
    ToyTeacherRecipe,
    ensure_toy_teacher,
    write_toy_prompt_sets,
    write_toy_student_init,
)
from pipelines import precompute, sft, train


@dataclass
class DemoConfig:
    workdir: str = field(default="runs/demo", metadata={"help": "where every stage writes"})
    cache_dir: str = field(
        default="", metadata={"help": "toy teacher cache (default: $LOPD_CACHE or .cache/lightning-opd)"}
    )
    sft_prompts: int = 1000
    opd_prompts: int = 1024
    eval_prompts: int = 500
    sft_steps: int = 300
    opd_steps: int = 40
    opd_lr: float = 3e-5
    opd_batch_size: int = 64
    topk: int = field(
        default=8, metadata={"help": "teacher top-k kept in the store (for the top-k objective)"}
    )
    objectives: str = field(
        default="lightning,topk",
        metadata={
            "help": "stage-two objectives to train from the one store: lightning (sampled token), topk"
        },
    )
    rollouts_per_prompt: int = 1
    horizon: int = 48
    teacher_steps: int = 300
    micro: bool = field(default=False, metadata={"help": "tiny sizes for tests (numbers meaningless)"})
    seed: int = 0
    backend: str = "auto"
    overwrite: bool = field(
        default=False, metadata={"help": "delete --workdir first (the toy teacher cache is kept)"}
    )

    def __post_init__(self):
        check(self.eval_prompts > 0, f"eval_prompts must be positive, got {self.eval_prompts}")


def _specs(config: DemoConfig) -> tuple[ToyModelSpec, ToyModelSpec]:
    if config.micro:
        micro = ToyModelSpec(layers=1, hidden=32, heads=2, intermediate=64)
        return micro, micro
    return TEACHER_SPEC, STUDENT_SPEC


def run(config: DemoConfig, log=print) -> dict:
    if config.overwrite:
        shutil.rmtree(config.workdir, ignore_errors=True)
    # A rerun with the same config resumes stage by stage; a different config is refused (see --overwrite).
    work = prepare_output_dir(config.workdir, config)
    timings: dict[str, float] = {}
    teacher_spec, student_spec = _specs(config)

    t = time.time()
    prompts = write_toy_prompt_sets(
        work / "prompts",
        sft=config.sft_prompts,
        opd=config.opd_prompts,
        eval=config.eval_prompts,
        seed=config.seed,
    )
    recipe = ToyTeacherRecipe(spec=teacher_spec, steps=config.teacher_steps, seed=config.seed)
    teacher = ensure_toy_teacher(recipe, Path(config.cache_dir) if config.cache_dir else None, log=log)
    timings["toy teacher"] = time.time() - t

    t = time.time()
    student_init = work / "student-init"
    if not (student_init / "config.json").exists():
        write_toy_student_init(student_init, student_spec, seed=config.seed)
    sft_out = work / "sft"
    if not (sft_out / "lopd_provenance.json").exists():
        sft.run(
            sft.SFTJobConfig(
                teacher=str(teacher),
                student=str(student_init),
                prompts=str(prompts["sft"]),
                out=str(sft_out),
                steps=config.sft_steps,
                warmup_steps=min(20, config.sft_steps // 10),
                keep_truncated=config.micro,  # an untrained micro teacher never stops
                temperature=0.0,
                max_new_tokens=config.horizon,
                seed=config.seed,
                backend=config.backend,
                overwrite=True,
            ),
            log=log,
        )
    timings["stage 0: SFT"] = time.time() - t

    t = time.time()
    store_dir = work / "store"
    if not (store_dir / "manifest.json").exists():
        precompute.run(
            precompute.PrecomputeConfig(
                student=str(sft_out),
                teacher=str(teacher),
                prompts=str(prompts["opd"]),
                out=str(store_dir),
                n=config.rollouts_per_prompt,
                max_new_tokens=config.horizon,
                seed=config.seed,
                backend=config.backend,
                topk=config.topk,
                # Each demo workdir is self-contained, even when an identical store exists elsewhere.
                allow_duplicate=True,
                overwrite=True,
            ),
            log=log,
        )
    store = open_store(store_dir)
    log(format_summary(summarize_store(store)))
    timings["stage 1: rollouts + scoring"] = time.time() - t

    # Stage two, once per objective, from the same store: no teacher is loaded for any of them.
    finals = {}
    for objective in [o for o in config.objectives.split(",") if o]:
        t = time.time()
        out = work / f"opd-{objective}"
        finals[objective] = out / "final"
        if not (finals[objective] / "lopd_provenance.json").exists():
            train.run(
                train.TrainConfig(
                    student=str(sft_out),
                    stores=str(store_dir),
                    out=str(out),
                    objective=objective,
                    steps=config.opd_steps,
                    batch_size=config.opd_batch_size,
                    micro_batch_size=config.opd_batch_size,
                    lr=config.opd_lr,
                    sample_reduction="mean",
                    seed=config.seed,
                    log_every=10,
                    # Accuracy along the way (first 200 held-out problems) for the training-curve plots.
                    eval_prompts=str(prompts["eval"]),
                    eval_every=max(1, config.opd_steps // 4),
                    eval_limit=min(200, config.eval_prompts),
                    overwrite=True,
                ),
                log=log,
            )
        timings[f"stage 2: offline OPD ({objective})"] = time.time() - t

    t = time.time()
    records = load_prompts(prompts["eval"])
    results = []
    labels = {"lightning": "Lightning OPD (sampled token)", "topk": "Lightning OPD (top-k reverse KL)"}
    models = [("teacher", teacher), ("SFT student", sft_out)] + [
        (labels.get(o, o), p) for o, p in finals.items()
    ]
    for name, path in models:
        model, tokenizer = load_causal_lm(path, dtype="float32")
        results.append(
            evaluate_model(model, tokenizer, records, model_name=name, max_new_tokens=config.horizon)
        )
    timings["evaluation"] = time.time() - t

    table = format_table(results)
    lines = [table, "", "time per stage:"] + [f"  {k:<36} {v:7.1f} s" for k, v in timings.items()]
    log("\n".join(["", "=" * 60, "lightning-opd demo: greedy accuracy on held-out problems"] + lines))
    summary = {"results": [r.as_dict() for r in results], "timings_s": timings, "store": str(store_dir)}
    write_json_atomic(work / "results.json", summary)
    return summary


def load_results(workdir: str | Path) -> dict:
    return json.loads((Path(workdir) / "results.json").read_text())
