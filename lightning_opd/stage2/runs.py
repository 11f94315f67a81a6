"""Run helpers shared by offline and online training: checkpoints (exact resume, refused across
runs), the metrics log, the status line, and the final-model writer with provenance."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from lightning_opd.config import json_safe, write_json_atomic
from lightning_opd.errors import TrainingError
from lightning_opd.models.fingerprint import model_fingerprint, tokenizer_fingerprint
from lightning_opd.models.provenance import Provenance, read_provenance, write_provenance
from lightning_opd.prompts import load_prompts
from lightning_opd.scale import resolve_save_dtype, save_student
from lightning_opd.stage2.batch import StudentScorer
from lightning_opd.tracking import RunTracker

# ----------------------------------------------------------------------------------------------
# Checkpoints


def find_checkpoint(config) -> Path | None:
    """The checkpoint ``config.resume`` asks for: ``auto`` = the latest whole one in ``config.out``."""
    if config.resume == "never":
        return None
    if config.resume != "auto":
        path = Path(config.resume)
        if not (path / "trainer_state.json").exists():
            raise TrainingError(f"--resume {path} is not a checkpoint (no trainer_state.json)")
        return path
    checkpoints = sorted(
        (Path(config.out) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])
    )
    complete = [p for p in checkpoints if (p / "trainer_state.json").exists()]  # written last: marks it whole
    return complete[-1] if complete else None


# trainer_state.json's "run_id_format": 2 since run ids leave out fields at their defaults; a state
# without it carries the older id (every field of the config that run saved).
RUN_ID_FORMAT = 2


def restore_checkpoint(accelerator, checkpoint: Path, run_id: str, config=None) -> dict:
    """Load model, optimizer, scheduler and RNG from ``checkpoint``; refuse one written by another run.

    ``config`` (the run's flags) lets a checkpoint written before RUN_ID_FORMAT 2 be recognised: its id
    is recomputed the old way over the fields its run's config held (``config.v1.json``, kept by
    ``prepare_output_dir`` when it upgraded the run's ``config.json``)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state.get("run_id_format", 1) < RUN_ID_FORMAT and config is not None:
        run_dir = checkpoint.parent.parent
        saved = run_dir / "config.v1.json"
        saved = saved if saved.exists() else run_dir / "config.json"
        if saved.exists():
            run_id = config.legacy_run_id(set(json.loads(saved.read_text())))
    if state["run_id"] != run_id:
        raise TrainingError(
            f"checkpoint {checkpoint} belongs to another run (run id {state['run_id']}, this run {run_id}); "
            "resume with the config that wrote it, or pass --resume never / a new --out"
        )
    accelerator.load_state(str(checkpoint))
    return state


def save_checkpoint(accelerator, out: Path, step: int, stream, run_id: str, keep: int) -> None:
    """Accelerate's state plus ``trainer_state.json`` (written last: it marks the checkpoint whole)."""
    accelerator.wait_for_everyone()
    path = out / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json_atomic(
            path / "trainer_state.json",
            {"step": step, "run_id": run_id, "run_id_format": RUN_ID_FORMAT, "stream": stream.state_dict()},
        )
        older = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]
        for old in older:
            shutil.rmtree(old, ignore_errors=True)


def resume(accelerator, config, run_id: str, log, what: str) -> tuple[int, dict | None]:
    """``(start step, checkpoint state)``: restored from the checkpoint ``config.resume`` names, if any."""
    checkpoint = find_checkpoint(config)
    if checkpoint is None:
        return 0, None
    state = restore_checkpoint(accelerator, checkpoint, run_id, config)
    log(f"{what}: resumed from {checkpoint} at step {state['step']}")
    return int(state["step"]), state


def eval_records(config) -> list | None:
    """The prompts of periodic evaluation (``--eval-prompts``, first ``--eval-limit``), or None."""
    if not config.eval_prompts:
        return None
    return load_prompts(config.eval_prompts, limit=config.eval_limit or None)


def due(every: int, step: int, steps: int) -> bool:
    """Whether a periodic action (eval, log) runs after 1-based ``step``: every N steps and at the end."""
    return bool(every) and (step % every == 0 or step == steps)


# ----------------------------------------------------------------------------------------------
# The final model


def write_final_model(
    accelerator, model, tokenizer, final: Path, *, stage: str, config, inputs: dict
) -> None:
    """Save the trained student with provenance: its fingerprint, its config, what it was trained on,
    and its parent's provenance, so the chain back to the SFT teacher stays intact.

    Call it on every process: gathering the state dict is collective under sharded training; only the
    main process writes. ``model`` is the prepared student, or stage two's prepared ``StudentScorer``.
    """
    state = accelerator.get_state_dict(model)
    student = accelerator.unwrap_model(model)
    if isinstance(student, StudentScorer):  # save the student inside, under its own keys
        student = student.model
        state = {k.removeprefix("model."): v for k, v in state.items()}
    if not accelerator.is_main_process:
        return
    save_student(student, state, final, resolve_save_dtype(config.save_dtype, config.student))
    tokenizer.save_pretrained(final)
    parent = read_provenance(config.student)
    write_provenance(
        final,
        Provenance(
            stage=stage,
            model_fingerprint=model_fingerprint(final),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            # The consistency anchor carries over: this model's SFT teacher is its parent's.
            sft_teacher=parent.sft_teacher if parent else None,
            config=asdict(config),
            parent=parent.__dict__ if parent else None,
            inputs=inputs,
        ),
    )


# ----------------------------------------------------------------------------------------------
# Metrics and the status line


def read_metrics_lines(path: Path) -> list[tuple[str, dict]]:
    """The ``(line, row)`` pairs of a metrics file. A torn last line (a crash mid-write) is dropped with
    a warning; a bad line anywhere else means the file was edited or damaged, and is refused."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            pairs.append((line, row))
        elif number == len(lines):
            warnings.warn(
                f"{path}: dropped a torn last line (an interrupted write): {line[:60]!r}", stacklevel=3
            )
        else:
            raise TrainingError(
                f"{path}:{number} is not a JSON object ({line[:60]!r}); fix or delete that line, or pass a new --out"
            )
    return pairs


class MetricsLog:
    """One JSON object per step in ``metrics.jsonl``, appended and flushed (a crash loses nothing logged);
    a copy of each row's numbers goes to the run's experiment trackers (``tracker``, --report-to)."""

    def __init__(self, path: Path, truncate_after_step: int | None = None, tracker: RunTracker | None = None):
        self.path, self.tracker = path, tracker
        if truncate_after_step is not None and path.exists():
            # On resume, drop lines past the checkpoint so the file reads as one uninterrupted run.
            kept = [
                line for line, row in read_metrics_lines(path) if row.get("step", 0) <= truncate_after_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 (held open for the run, closed by close())

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(json_safe(row), allow_nan=False) + "\n")  # strict JSON: NaN -> null
        self.file.flush()
        if self.tracker is not None:
            self.tracker.log(row)

    def close(self) -> None:
        self.file.close()
        if self.tracker is not None:
            self.tracker.finish()


def format_status(row: dict) -> str:
    """One dense line per step; objective metrics are shown when the objective reports them."""
    parts = [f"step {row['step']}", f"H {row['horizon']}", f"loss {row['loss']:+.4f}"]
    for key, label, fmt in (
        ("adv_mean", "adv", "+.3f"),
        ("kl_student_teacher", "kl", ".4f"),
        ("topk_divergence", "topk-div", ".4f"),
        ("ref_kl", "ref-kl", ".4f"),
        ("drift_kl", "drift-kl", ".4f"),
        ("drift_ess", "ess", ".2f"),
        ("drift_outside", "out-of-TR", ".1%"),
        ("passes", "passes", ".2f"),
    ):
        if key in row:
            parts.append(f"{label} {row[key]:{fmt}}")
    if row.get("skipped_step"):
        parts.append("fp16 overflow: step skipped")
    else:
        parts.append(f"gnorm {row['grad_norm']:.2f}")
    parts.append(f"{row['tokens_per_s']:.0f} tok/s")
    if "eval_accuracy" in row:
        parts.append(f"eval {100 * row['eval_accuracy']:.1f}%")
    return " | ".join(parts)


def timer() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
