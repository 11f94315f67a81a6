"""Teacher consistency at toy scale: a student SFT'd on teacher A, distilled from A and from B.

    lopd teacher-consistency [--demo runs/demo] [--out runs/consistency]   # after `make demo`; trains teacher B once

Teacher B is a second toy teacher (same recipe, seed 1). For each teacher: stage one on the demo's SFT
student (B needs --allow-inconsistent-teacher), offline training with the top-k and the sampled-token
objectives, and standard online OPD; every model is evaluated on the demo's held-out problems.
Writes ``runs/consistency/results.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lightning_opd.evaluation import evaluate_model
from lightning_opd.modeling import load_causal_lm
from lightning_opd.prompts import load_prompts
from lightning_opd.toy.teacher import ToyTeacherRecipe, ensure_toy_teacher
from pipelines import precompute, train, train_online

STEPS, BATCH, LR, HORIZON = 40, 64, 3e-5, 48


def accuracy(model_dir: Path, eval_prompts: Path) -> float:
    model, tokenizer = load_causal_lm(model_dir, dtype="float32")
    return evaluate_model(
        model, tokenizer, load_prompts(eval_prompts), model_name=str(model_dir), max_new_tokens=HORIZON
    ).greedy_accuracy


@dataclass
class ConsistencyConfig:
    demo: str = field(default="runs/demo", metadata={"help": "a finished `lopd demo` workdir"})
    out: str = field(default="runs/consistency", metadata={"help": "output directory"})


def run(config: ConsistencyConfig, log=print) -> None:
    demo, out = Path(config.demo), Path(config.out)
    student, prompts, eval_prompts = (
        demo / "sft",
        demo / "prompts" / "opd.jsonl",
        demo / "prompts" / "eval.jsonl",
    )
    teachers = {
        "A (the SFT teacher)": ensure_toy_teacher(ToyTeacherRecipe()),
        "B (another teacher)": ensure_toy_teacher(ToyTeacherRecipe(seed=1)),
    }
    results = {}
    for name, teacher in teachers.items():
        tag = name[0]
        store = out / f"store-{tag}"
        if not (store / "manifest.json").exists():
            precompute.run(
                precompute.PrecomputeConfig(
                    student=str(student),
                    teacher=str(teacher),
                    prompts=str(prompts),
                    out=str(store),
                    max_new_tokens=HORIZON,
                    topk=8,
                    backend="transformers",
                    allow_inconsistent_teacher=True,
                    allow_duplicate=True,
                    overwrite=True,
                )
            )
        for objective in ("topk", "lightning"):
            run_dir = out / f"offline-{objective}-{tag}"
            train.run(
                train.TrainConfig(
                    student=str(student),
                    stores=str(store),
                    out=str(run_dir),
                    objective=objective,
                    steps=STEPS,
                    batch_size=BATCH,
                    micro_batch_size=BATCH,
                    lr=LR,
                    sample_reduction="mean",
                    overwrite=True,
                    resume="never",
                )
            )
            results[f"offline {objective}, teacher {name}"] = accuracy(run_dir / "final", eval_prompts)
        run_dir = out / f"online-{tag}"
        train_online.run(
            train_online.OnlineConfig(
                student=str(student),
                teacher=str(teacher),
                prompts=str(prompts),
                out=str(run_dir),
                steps=STEPS,
                prompts_per_step=16,
                n=4,
                temperature=1.0,
                max_new_tokens=HORIZON,
                lr=LR,
                sample_reduction="mean",
                allow_inconsistent_teacher=True,
                overwrite=True,
            )
        )
        results[f"online lightning, teacher {name}"] = accuracy(run_dir / "final", eval_prompts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    log(json.dumps(results, indent=1))


if __name__ == "__main__":
    import sys

    from lightning_opd.cli import main

    sys.exit(main(["teacher-consistency", *sys.argv[1:]]))
