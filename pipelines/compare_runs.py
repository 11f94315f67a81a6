"""How `lopd compare` runs one method: build the shared store, configure the method's job, train it,
evaluate it greedily, and keep its row so that a rerun with the same settings skips it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_opd.config import check, to_dict, write_json_atomic
from lightning_opd.errors import LopdError
from lightning_opd.models.loading import load_causal_lm
from lightning_opd.reporting.tables import median_step_seconds, stage_one_seconds_from_files
from lightning_opd.stage2.online import evaluate_greedy
from lightning_opd.store import open_store
from pipelines import precompute, train, train_online
from storage_schemas.logprob_store_v1 import MANIFEST_FILE, ROLLOUTS_SUBDIR

if TYPE_CHECKING:  # compare imports this module
    from pipelines.compare import CompareConfig


def build_store(config: CompareConfig, out: Path, log) -> tuple[Path, float]:
    store = out / "store"
    started = time.time()
    if not (store / MANIFEST_FILE).exists():
        precompute.run(
            precompute.PrecomputeConfig(
                student=config.student,
                teacher=config.teacher,
                prompts=config.prompts,
                out=str(store),
                max_new_tokens=config.max_new_tokens,
                topk=config.topk,
                seed=config.seed,
                backend="transformers",
                temperature=1.0 if config.micro else (0.7 if config.temperature < 0 else config.temperature),
                overwrite=True,
            ),
            log=log,
        )
    seconds = stage_one_seconds_from_files(store) or (time.time() - started)
    return store, seconds


def run_method(
    name: str, kind: str, overrides: dict, config: CompareConfig, store: Path, horizon: int, out: Path
):
    """(the job's config, a function that trains it and returns the final model directory)."""
    common = dict(
        student=config.student,
        out=str(out / name),
        steps=config.steps,
        lr=config.lr,
        warmup_steps=config.warmup_steps,
        sample_reduction=config.sample_reduction,
        seed=config.seed,
        log_every=config.steps,
        overwrite=True,
    )
    if kind in ("offline", "inconsistent"):
        job = train.TrainConfig(
            stores=str(store),
            batch_size=config.batch_size,
            micro_batch_size=config.batch_size,
            **{**common, **overrides},  # a method may override a common setting (the paper's: warmup 0)
        )
        return job, lambda log: train.run(job, log=log)
    job = train_online.OnlineConfig(
        teacher=config.teacher,
        prompts=config.prompts,
        prompts_per_step=max(1, config.batch_size // config.online_n),
        n=config.online_n,
        max_new_tokens=horizon,
        micro_batch_size=config.batch_size,
        **({"temperature": config.temperature} if config.temperature >= 0 else {}),
        **{**common, **overrides},
    )
    return job, lambda log: train_online.run(job, log=log)


def evaluate(model_dir: str, records, horizon: int) -> dict:
    model, tokenizer = load_causal_lm(model_dir, dtype="float32")
    return evaluate_greedy(model, tokenizer, records, verifier="addition", max_new_tokens=horizon)


def score_with_other_teacher(config: CompareConfig, store: Path, out: Path, log) -> Path:
    """The store's own rollouts scored by ``--other-teacher``: the teacher-consistency control, where only
    the teacher differs (same prompts, same samples, same top-k)."""
    other = out / "store-other-teacher"
    if not (other / MANIFEST_FILE).exists():
        rollouts = store / ROLLOUTS_SUBDIR
        check(
            (rollouts / MANIFEST_FILE).exists(),
            f"method `inconsistent` rescores {rollouts}, which is missing: build the store with `lopd "
            "precompute` (it keeps the rollouts), or drop the method",
        )
        manifest = open_store(store).manifest
        precompute.run(
            precompute.ScoreConfig(
                rollouts=str(rollouts),
                teacher=config.other_teacher,
                out=str(other),
                topk=manifest.topk_k or 0,
                allow_inconsistent_teacher=True,
                allow_duplicate=True,
                overwrite=True,
            ),
            log=log,
        )
    return other


def run_one(name, kind, overrides, config, store, horizon, has_topk, stage_one, records, out, log) -> dict:
    row = {"method": name, "kind": kind, "status": "ok", "train_s": 0.0, "model": ""}
    row["stage_one_s"] = stage_one if kind == "offline" else 0.0
    if kind == "baseline":
        row["model"] = config.student
        row.update(evaluate(config.student, records, horizon))
        row["total_s"] = 0.0
        return row
    if name == "esr" and not has_topk:
        return {**row, "status": "skipped: the store has no teacher top-k (score it with --topk)"}
    job, launch = run_method(name, kind, overrides, config, store, horizon, out)
    saved = out / name / "compare_result.json"
    previous = json.loads(saved.read_text()) if saved.exists() and not config.overwrite else None
    if previous is not None and previous.get("job") == to_dict(job):
        log(f"compare: {name}: reusing the finished run in {out / name}")
        return previous["row"]
    started = time.time()
    try:
        final = launch(lambda *_: None)
    except LopdError as e:  # one method's bad configuration must not cost the others
        log(f"compare: {name}: failed: {e}")
        return {**row, "status": f"failed: {e}"}
    row["train_s"] = time.time() - started
    row["median_step_s"] = median_step_seconds(out / name / "metrics.jsonl")
    row["model"] = str(final)
    row.update(evaluate(str(final), records, horizon))
    row["total_s"] = row["train_s"] + (row["stage_one_s"] or 0.0)
    write_json_atomic(saved, {"job": to_dict(job), "row": row})
    log(f"compare: {name}: accuracy {100 * row['accuracy']:.1f}% in {row['total_s']:.0f} s")
    return row
