"""Stage two: offline on-policy distillation from logprob stores. No teacher process anywhere.

Every step draws ``batch_size`` stored rollouts, applies the horizon in force (a response-position
mask, and a cut of the sequence so that masked tokens cost no compute), recomputes the student's
log-probs of the stored tokens (chunked over positions: never ``[batch, seq, vocab]`` in fp32), and
hands them with the stored teacher/behaviour log-probs to the objective. A plain loop under
accelerate: mixed precision, gradient accumulation and ``accelerate launch`` (DDP/FSDP/DeepSpeed)
come from there.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_opd.errors import TrainingError
from lightning_opd.logprobs import (
    final_hidden_states,
    logprobs_at_ids_from_hidden,
    output_head,
    token_logprobs_from_hidden,
)
from lightning_opd.objectives import TokenBatch


@dataclass
class Batch:
    """A collated micro-batch. Position j of the ``[B, S-1]`` tensors is the prediction of token j+1."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S-1] = input_ids[:, 1:]
    mask: torch.Tensor  # [B, S-1] float: 1 on response tokens inside the horizon
    teacher_logprobs: torch.Tensor  # [B, S-1]
    behavior_logprobs: torch.Tensor  # [B, S-1]
    teacher_topk_ids: torch.Tensor | None = None  # [B, S-1, K]
    teacher_topk_logprobs: torch.Tensor | None = None
    keys: list[tuple[str, int]] | None = None  # (prompt_id, sample_index) per row, for error messages

    def to(self, device) -> Batch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def collate(rows: list[dict[str, Any]], horizon: int, pad_id: int, topk: int | None = None) -> Batch:
    """Right-padded prompt+response sequences, cut at ``horizon`` response tokens.

    Response token t of a row with prompt length P sits at sequence index P+t and is predicted at
    index P+t-1, so its stored log-probs go to column P+t-1 of the ``[B, S-1]`` tensors.
    """
    cut = [min(len(r["response_ids"]), horizon) for r in rows]
    width = max(len(r["prompt_ids"]) + c for r, c in zip(rows, cut))
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1))
    teacher = torch.zeros((b, width - 1))
    behavior = torch.zeros((b, width - 1))
    topk_ids = torch.zeros((b, width - 1, topk), dtype=torch.long) if topk else None
    topk_lp = torch.zeros((b, width - 1, topk)) if topk else None
    for i, (r, c) in enumerate(zip(rows, cut)):
        p = len(r["prompt_ids"])
        seq = np.concatenate([np.asarray(r["prompt_ids"]), np.asarray(r["response_ids"][:c])]).astype(
            np.int64
        )
        input_ids[i, : p + c] = torch.from_numpy(seq)
        attention[i, : p + c] = 1
        if c == 0:
            continue
        cols = slice(p - 1, p - 1 + c)
        mask[i, cols] = 1.0
        teacher[i, cols] = torch.as_tensor(np.asarray(r["teacher_logprobs"][:c], dtype=np.float32))
        behavior[i, cols] = torch.as_tensor(np.asarray(r["behavior_logprobs"][:c], dtype=np.float32))
        if topk:
            topk_ids[i, cols] = torch.as_tensor(np.asarray(r["teacher_topk_ids"][:c], dtype=np.int64))
            topk_lp[i, cols] = torch.as_tensor(np.asarray(r["teacher_topk_logprobs"][:c], dtype=np.float32))
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        targets=input_ids[:, 1:].clone(),
        mask=mask,
        teacher_logprobs=teacher,
        behavior_logprobs=behavior,
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_lp,
        keys=[(r["prompt_id"], int(r["sample_index"])) for r in rows],
    )


def student_token_batch(model, batch: Batch, *, needs_topk: bool, chunk_size: int) -> TokenBatch:
    """Recompute the student's log-probs of the stored tokens (with grad) and assemble a TokenBatch.

    The LM head runs only at trained positions (response tokens inside the horizon): prompts and
    padding cost the decoder forward but no ``[positions, vocab]`` work.
    """
    hidden = final_hidden_states(model, batch.input_ids, batch.attention_mask)[:, :-1]
    weight, bias = output_head(model)
    where = batch.mask > 0
    selected = hidden[where]  # [N, H]
    student = hidden.new_zeros(batch.mask.shape, dtype=torch.float32)
    student = student.masked_scatter(
        where,
        token_logprobs_from_hidden(
            selected, weight, batch.targets[where], bias=bias, chunk_size=chunk_size, checkpoint=True
        ),
    )
    student_topk = None
    if needs_topk:
        k = batch.teacher_topk_ids.shape[-1]
        student_topk = hidden.new_zeros((*batch.mask.shape, k), dtype=torch.float32)
        at_ids = logprobs_at_ids_from_hidden(
            selected, weight, batch.teacher_topk_ids[where], bias=bias, chunk_size=chunk_size, checkpoint=True
        )
        student_topk = student_topk.masked_scatter(where.unsqueeze(-1).expand_as(student_topk), at_ids)
    return TokenBatch(
        student_logprobs=student,
        teacher_logprobs=batch.teacher_logprobs,
        behavior_logprobs=batch.behavior_logprobs,
        mask=batch.mask,
        teacher_topk_ids=batch.teacher_topk_ids,
        teacher_topk_logprobs=batch.teacher_topk_logprobs,
        student_topk_logprobs=student_topk,
    )


def check_finite(loss: torch.Tensor, step: int, batch: Batch) -> None:
    if not torch.isfinite(loss):
        rows = ", ".join(f"{p}#{s}" for p, s in (batch.keys or [])[:8])
        raise TrainingError(
            f"non-finite loss ({loss.item()}) at step {step} on store rows [{rows}]; no checkpoint was written for "
            "this step. Check those rows with `lopd store verify`, or lower the learning rate"
        )


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
    """One JSON object per step in ``metrics.jsonl``, appended and flushed (a crash loses nothing logged)."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.exists():
            # On resume, drop lines past the checkpoint so the file reads as one uninterrupted run.
            kept = [
                line for line, row in read_metrics_lines(path) if row.get("step", 0) <= truncate_after_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")  # noqa: SIM115 (held open for the run, closed by close())

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def format_status(row: dict) -> str:
    """One dense line per step; objective metrics are shown when the objective reports them."""
    parts = [f"step {row['step']}", f"H {row['horizon']}", f"loss {row['loss']:+.4f}"]
    for key, label, fmt in (
        ("adv_mean", "adv", "+.3f"),
        ("kl_student_teacher", "kl", ".4f"),
        ("topk_divergence", "topk-div", ".4f"),
        ("ref_kl", "ref-kl", ".4f"),
    ):
        if key in row:
            parts.append(f"{label} {row[key]:{fmt}}")
    parts += [f"gnorm {row['grad_norm']:.2f}", f"{row['tokens_per_s']:.0f} tok/s"]
    if "eval_accuracy" in row:
        parts.append(f"eval {100 * row['eval_accuracy']:.1f}%")
    return " | ".join(parts)


def timer() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
