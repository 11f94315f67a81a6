"""The one update step of stage two, run by offline (``lopd train``) and online (``lopd train-online``)
training alike.

``accumulate_gradients`` takes store-shaped rows (a store's column names: prompt/response ids,
teacher and behaviour log-probs, optional top-k) and runs, per micro-batch: collate at the horizon,
autocast, the student's log-probs of the stored tokens (chunked: never ``[batch, seq, vocab]`` in
fp32), the gold-solution mixture, the objective (plus the on-policy reference KL online), a finite
check and backward. ``apply_update`` then clips, checks the norm and steps the optimizer. Offline and
online differ only in ``UpdateInputs``: online sets ``ratio_to_sampler`` (the explicit importance
ratio to the sampler, METHODS §1) and adds the ref-KL here with the on-policy estimator.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any

import torch

from lightning_opd.errors import TrainingError
from lightning_opd.packing import micro_batches
from lightning_opd.scale import make_adamw, trainable_parameters
from lightning_opd.stage2.batch import check_finite, collate, student_token_batch
from lightning_opd.stage2.drift import add_sums, drift_metrics, drift_sums
from lightning_opd.stage2.gold import GoldSolutions, with_gold
from lightning_opd.stage2.objectives import TOKEN_MEAN_METRICS, on_policy_reference_kl


@dataclasses.dataclass
class UpdateInputs:
    """What ``accumulate_gradients`` needs besides the model and the rows."""

    objective: Any
    horizon: int
    pad_id: int
    topk: int | None = None
    micro_batch_size: int = 64
    chunk_size: int = 1024
    sample_reduction: str = "sum"
    ratio_to_sampler: bool = True  # online: old log-probs = the sampler's (importance ratio, METHODS §1)
    ref_kl_coef: float = 0.0  # online StableOPD: rows carry "ref_logprobs" from the frozen π_ref
    trust_region: float = 0.2  # the interval of the drift metric "drift_outside"
    gold: GoldSolutions | None = None
    max_tokens: int = 0  # token budget per micro-batch instead of micro_batch_size rows (packing.py)
    packed: bool = False  # one concatenated sequence per micro-batch (packing.py)


def update_inputs(
    flags, objective, *, horizon: int, pad_id: int, topk: int | None, gold: GoldSolutions | None
) -> UpdateInputs:
    """The update settings of a trainer with ``flags`` (a ``TrainingFlags``): the one place where
    offline and online differ. Online (``flags.on_policy``) keeps the explicit ratio to the sampler
    and adds StableOPD's ref-KL here with the on-policy estimator; offline leaves both to the
    objective."""
    return UpdateInputs(
        objective=objective,
        horizon=horizon,
        pad_id=pad_id,
        topk=topk,
        micro_batch_size=flags.micro_batch_size,
        chunk_size=flags.chunk_size,
        sample_reduction=flags.sample_reduction,
        ratio_to_sampler=flags.on_policy,
        ref_kl_coef=flags.ref_kl_coef if flags.on_policy else 0.0,
        trust_region=flags.trust_region or 0.2,
        gold=gold,
        max_tokens=flags.max_tokens_per_micro_batch,
        packed=flags.pack,
    )


def accumulate_gradients(
    model,
    rows: list[dict],
    inputs: UpdateInputs,
    *,
    step: int,
    accelerator=None,
    gold_seen: frozenset[str] = frozenset(),
) -> dict:
    """Forward + backward over ``rows`` in micro-batches (gradients accumulate; no optimizer step).

    Returns the summed loss, token counts and the objective's metrics averaged over micro-batches by
    rows. The caller clips, steps and zeroes (``apply_update``). ``step`` is 1-based, for error
    messages only. ``gold_seen``: prompts whose gold solution another process adds this step.

    Under ``accelerate launch`` each process gets its slice of the global batch (equal sizes). Each
    computes its additive share of the global batch's loss; DDP *averages* gradients over processes,
    so the share is scaled by the number of processes before backward. The result is the gradient
    and the metrics (summed over processes) of one process on the whole batch.
    """
    device = next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    global_rows = len(rows) * world
    micro = micro_batches(
        rows,
        horizon=inputs.horizon,
        micro_batch_size=inputs.micro_batch_size,
        max_tokens=inputs.max_tokens,
        packed=inputs.packed,
    )
    totals: dict[str, float] = {}
    token_sums: dict[str, float] = {}
    metric_tokens = 0.0  # valid tokens the objective's token-mean metrics were taken over
    loss_sum, tokens, computed, response_tokens, gap_sum, drift = 0.0, 0, 0, 0, 0.0, {}
    seen_gold = set(gold_seen)  # StableOPD: one gold solution per prompt per step
    for j, chunk in enumerate(micro):
        batch = collate(chunk, inputs.horizon, inputs.pad_id, inputs.topk).to(device)
        # Gradients are all-reduced once per step, on the last micro-batch.
        last = j == len(micro) - 1
        sync = accelerator.no_sync(model) if accelerator is not None and not last else nullcontext()
        autocast = accelerator.autocast() if accelerator is not None else nullcontext()
        with sync, autocast:
            loss, parts, token_batch = _micro_batch_loss(model, chunk, batch, inputs, seen_gold)
            if inputs.sample_reduction == "mean":
                loss = loss * len(chunk) / global_rows  # mean over the whole batch, not per micro-batch
            check_finite(loss, step, batch)
            (accelerator.backward if accelerator is not None else torch.Tensor.backward)(loss * world)
        valid = batch.mask > 0
        sums = drift_sums(
            token_batch.student_logprobs, batch.behavior_logprobs, batch.mask, inputs.trust_region
        )
        drift = add_sums(drift, sums)
        gap_sum += float((token_batch.student_logprobs.detach() - batch.behavior_logprobs)[valid].abs().sum())
        loss_sum += loss.item()
        tokens += int(batch.attention_mask.sum())
        # what the forward computes: the padded rectangle, or (packed) the rows end to end
        computed += int(batch.attention_mask.sum()) if inputs.packed else batch.input_ids.numel()
        response_tokens += batch.num_tokens
        metric_tokens += parts.get("tokens", 0)
        # Objective metrics: token means weighted by tokens; the others (base_loss, ref_kl, gold_nll)
        # are reduced over samples like the loss, so they add up as the loss does (a sum as it is, a
        # mean weighted by rows) and base_loss + coefficients x terms is the step's loss.
        row_weight = len(chunk) / global_rows if inputs.sample_reduction == "mean" else 1.0
        for k, v in parts.items():
            if k in TOKEN_MEAN_METRICS:
                token_sums[k] = token_sums.get(k, 0.0) + v * parts.get("tokens", 0)
            elif k != "tokens":
                totals[k] = totals.get(k, 0.0) + v * row_weight
    counts = _all_ranks_sum(
        accelerator,
        {
            "loss": loss_sum,
            "tokens": tokens,
            "computed_tokens": computed,
            "response_tokens": response_tokens,
            "gap": gap_sum,
        },
    )
    token_sums = _all_ranks_sum(accelerator, {**token_sums, "_tokens": metric_tokens})
    valid_tokens = max(1.0, token_sums.pop("_tokens"))
    out = {
        **_all_ranks_sum(accelerator, totals),
        **{k: v / valid_tokens for k, v in token_sums.items()},
        **drift_metrics(_all_ranks_sum(accelerator, drift)),
        "loss": counts["loss"],
        "tokens": int(counts["tokens"]),
        "computed_tokens": int(counts["computed_tokens"]),
        "response_tokens": int(counts["response_tokens"]),
    }
    if inputs.ratio_to_sampler:
        out["sampler_logprob_gap"] = counts["gap"] / max(1, out["response_tokens"])
    return out


def _all_ranks_sum(accelerator, sums: dict[str, float]) -> dict[str, float]:
    """``sums`` added over every process, so metrics describe the global batch. Every process has the
    same keys (same objective and flags); float64 keeps token counts and sums exact."""
    if accelerator is None or accelerator.num_processes == 1 or not sums:
        return sums
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(values, "sum")
    return dict(zip(keys, total.tolist()))


def _micro_batch_loss(model, chunk: list[dict], batch, inputs: UpdateInputs, seen_gold: set[str]):
    """The objective's loss and metrics on one collated micro-batch (with its TokenBatch)."""
    token_batch = student_token_batch(
        model,
        batch,
        needs_topk=inputs.objective.needs_topk,
        chunk_size=inputs.chunk_size,
        packed=inputs.packed,
    )
    if inputs.ratio_to_sampler:
        token_batch = dataclasses.replace(token_batch, old_logprobs=token_batch.behavior_logprobs)
    if inputs.gold is not None:
        gold_rows = inputs.gold.rows_for(chunk, seen_gold)
        token_batch = with_gold(
            token_batch, model, gold_rows, inputs.pad_id, inputs.chunk_size, filler=chunk[0]
        )
    loss, parts = inputs.objective(token_batch)
    if inputs.ref_kl_coef > 0:
        ref_rows = [{**r, "teacher_logprobs": r["ref_logprobs"]} for r in chunk]  # collate places it
        ref = collate(ref_rows, inputs.horizon, inputs.pad_id).teacher_logprobs
        kl = on_policy_reference_kl(
            token_batch.student_logprobs, ref.to(batch.mask.device), batch.mask, inputs.sample_reduction
        )
        loss = loss + inputs.ref_kl_coef * kl
        parts = {**parts, "ref_kl": kl.item()}
    return loss, parts, token_batch


def apply_update(accelerator, model, optimizer, scheduler, grad_clip: float, step: int) -> dict:
    """Clip, step the optimizer and scheduler, zero (``step`` is 0-based).

    A non-finite gradient norm ends the run, except under fp16, where it is the loss scaler's normal
    overflow: the step is skipped (the scaler lowers its scale; the scheduler does not advance) and
    reported as ``skipped_step``, and training goes on.
    """
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite = bool(torch.isfinite(torch.as_tensor(grad_norm)))
    fp16 = accelerator is not None and accelerator.mixed_precision == "fp16"
    if not finite and not fp16:
        raise TrainingError(
            f"non-finite gradient norm at step {step + 1}; no checkpoint was written. Lower --lr"
        )
    lr = scheduler.get_last_lr()[0]  # this step's rate (scheduler.step() moves on to the next)
    if finite or getattr(accelerator, "scaler", None) is not None:
        optimizer.step()  # with a scaler and an overflow: skipped inside, and the scale lowered
    skipped = not finite or bool(getattr(accelerator, "optimizer_step_was_skipped", False))
    if not skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # A skipped step's norm is inf/NaN, which is not JSON: logged as null with the skip flag.
    return {"grad_norm": float(grad_norm) if finite else None, "lr": lr, "skipped_step": int(skipped)}


def make_optimizer(model, flags):
    """AdamW (``flags.optim``) over the trainable parameters, with the flags' betas and weight decay; a
    constant learning rate (as in the paper) after ``flags.warmup_steps`` of linear warmup (offline,
    nothing resamples the damage of Adam's first full-size steps away; METHODS §9)."""
    optimizer = make_adamw(
        trainable_parameters(model),
        lr=flags.lr,
        betas=(flags.beta1, flags.beta2),
        weight_decay=flags.weight_decay,
        optim=flags.optim,
    )
    warmup = flags.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    return optimizer, scheduler
