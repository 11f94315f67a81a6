"""Stage two: offline on-policy distillation from logprob stores. No teacher process anywhere.

Every step draws ``batch_size`` stored rollouts, applies the horizon in force (a response-position
mask, and a cut of the sequence so that masked tokens cost no compute), recomputes the student's
log-probs of the stored tokens (chunked over positions: never ``[batch, seq, vocab]`` in fp32), and
hands them with the stored teacher/behaviour log-probs to the objective. A plain loop under
accelerate: mixed precision and ``accelerate launch`` (DDP; see ``StudentScorer``) come from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_opd.errors import TrainingError
from lightning_opd.logprobs import (
    final_hidden_states,
    logit_postprocess,
    logprobs_at_ids_from_hidden,
    output_head,
    token_logprobs_from_hidden,
)
from lightning_opd.packing import pack
from lightning_opd.stage2.objectives import TokenBatch


@dataclass
class Batch:
    """A collated micro-batch. Position j of the ``[B, S-1]`` tensors is the prediction of token j+1."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    targets: torch.Tensor  # [B, S-1] = input_ids[:, 1:]
    mask: torch.Tensor  # [B, S-1] float: 1 on response tokens inside the horizon
    teacher_logprobs: torch.Tensor  # [B, S-1]
    behavior_logprobs: torch.Tensor  # [B, S-1]
    # [B, S-1]: the distribution each token was drawn from (temperature + top-p); None when a row lacks it
    sampling_logprobs: torch.Tensor | None = None
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
    # Only when every row has them (a format 1.0 store, or a mix with one, lacks them): no partial ratios.
    has_sampling = all(r.get("sampling_logprobs") is not None for r in rows)
    sampling = torch.zeros((b, width - 1)) if has_sampling else None
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
        if has_sampling:
            sampling[i, cols] = torch.as_tensor(np.asarray(r["sampling_logprobs"][:c], dtype=np.float32))
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
        sampling_logprobs=sampling,
        teacher_topk_ids=topk_ids,
        teacher_topk_logprobs=topk_lp,
        keys=[(r["prompt_id"], int(r["sample_index"])) for r in rows],
    )


class StudentScorer(torch.nn.Module):
    """The student's log-probs of chosen tokens as one module call: decoder, then the chunked LM head.

    Stage two hands *this* module (not the bare model) to ``accelerator.prepare``. The chunked head
    calls the decoder and reads the head's weight directly, past the model's ``forward``; under DDP
    that would skip the wrapper's forward, so the gradient all-reduce never fires and every process
    silently trains its own copy. Run as the wrapped module's forward, the whole computation is
    inside DDP's forward and the all-reduce happens as usual.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self):
        """The student's decoder-layer classes: accelerate's FSDP2 auto-wrap makes one unit of each."""
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """The student's own weight tying. FSDP2's memory-efficient loading (accelerate) moves the
        prepared module to the meta device and re-ties through this method; without it a tied LM head
        would come back as a separate parameter and train apart from the embedding."""
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        where: torch.Tensor,
        targets: torch.Tensor,
        topk_ids: torch.Tensor | None = None,
        chunk_size: int = 1024,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(log-probs of targets[where] [N], log-probs at topk_ids[where] [N, K] or None)``.
        ``position_ids`` (and a 4D ``attention_mask``) for a packed sequence."""
        hidden = final_hidden_states(self.model, input_ids, attention_mask, position_ids)[:, :-1]
        weight, bias = output_head(self.model)
        # The model's own logit post-processing (Gemma 2/3's final softcap, Cohere/Granite scales), as
        # stage zero and teacher scoring apply it: the same log-probs of the student in every stage.
        post = logit_postprocess(self.model)
        selected = hidden[where]  # [N, H]
        at_targets = token_logprobs_from_hidden(
            selected,
            weight,
            targets[where],
            bias=bias,
            chunk_size=chunk_size,
            checkpoint=True,
            postprocess=post,
        )
        at_topk = None
        if topk_ids is not None:
            at_topk = logprobs_at_ids_from_hidden(
                selected,
                weight,
                topk_ids[where],
                bias=bias,
                chunk_size=chunk_size,
                checkpoint=True,
                postprocess=post,
            )
        return at_targets, at_topk


def _scorer(model) -> torch.nn.Module:
    """``model`` itself when it is a (wrapped) ``StudentScorer``, else a scorer around the bare model."""
    return model if isinstance(getattr(model, "module", model), StudentScorer) else StudentScorer(model)


def student_token_batch(
    model, batch: Batch, *, needs_topk: bool, chunk_size: int, packed: bool = False
) -> TokenBatch:
    """Recompute the student's log-probs of the stored tokens (with grad) and assemble a TokenBatch.

    ``model`` is a bare causal LM or a ``StudentScorer`` (as prepared by accelerate in stage two).
    The LM head runs only at trained positions (response tokens inside the horizon): prompts and
    padding cost the decoder forward but no ``[positions, vocab]`` work. ``packed``: the forward runs
    on the rows concatenated into one sequence, without padding (``packing.pack``); the result is the
    same TokenBatch.
    """
    where = batch.mask > 0
    scorer = _scorer(model)
    if packed:
        inner = getattr(scorer, "module", scorer).model
        p = pack(batch, inner.config, needs_topk=needs_topk)
        at_targets, at_topk = scorer(
            p.input_ids, p.attention_mask, p.where, p.targets, p.topk_ids, chunk_size=chunk_size,
            position_ids=p.position_ids,
        )  # fmt: skip
    else:
        at_targets, at_topk = scorer(
            batch.input_ids,
            batch.attention_mask,
            where,
            batch.targets,
            batch.teacher_topk_ids if needs_topk else None,
            chunk_size=chunk_size,
        )
    student = at_targets.new_zeros(batch.mask.shape, dtype=torch.float32).masked_scatter(where, at_targets)
    student_topk = None
    if needs_topk:
        k = batch.teacher_topk_ids.shape[-1]
        student_topk = at_targets.new_zeros((*batch.mask.shape, k), dtype=torch.float32)
        student_topk = student_topk.masked_scatter(where.unsqueeze(-1).expand_as(student_topk), at_topk)
    return TokenBatch(
        student_logprobs=student,
        teacher_logprobs=batch.teacher_logprobs,
        behavior_logprobs=batch.behavior_logprobs,
        sampling_logprobs=batch.sampling_logprobs,
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
