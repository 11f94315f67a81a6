"""What every objective shares: the token batch, the reduction, input cleaning, the policy-gradient surrogate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lightning_opd.config import check

LOGPROB_FLOOR = -1e4  # below any real log-prob; keeps exp() at exactly 0 and differences finite
MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: large enough never to bind on sane data, small enough to stay finite
SAMPLE_REDUCTIONS = ("sum", "mean")
_LN2 = math.log(2.0)


@dataclass
class TokenBatch:
    """Per-token inputs of one (micro-)batch, all ``[B, S]`` unless noted; positions are response tokens.

    ``student_logprobs`` (and the ``student_topk_logprobs`` / ``gold_logprobs``) carry gradient;
    everything else is a constant from the store. ``mask`` is a float 0/1 tensor with padding and the
    horizon already applied. ``old_logprobs`` are the student's at the start of the step (PPO clip),
    ``behavior_logprobs`` those of π_ref, the model that sampled the stored tokens (raw: temperature
    1, full vocabulary). ``sampling_logprobs`` are the log-probs of the distribution each token was
    actually drawn from (π_ref with temperature and top-p applied); None when the store lacks them.
    An importance ratio to the sampler uses ``sampling_logprobs``; a trust region around π_ref uses
    ``behavior_logprobs``.
    """

    student_logprobs: Tensor
    teacher_logprobs: Tensor
    behavior_logprobs: Tensor
    mask: Tensor
    old_logprobs: Tensor | None = None
    sampling_logprobs: Tensor | None = None
    teacher_topk_ids: Tensor | None = None  # [B, S, K]
    teacher_topk_logprobs: Tensor | None = None  # [B, S, K], full-vocabulary log-probs at those ids
    student_topk_logprobs: Tensor | None = None  # [B, S, K], the student at the teacher's ids
    gold_logprobs: Tensor | None = None  # [B_gold, G], the student on gold solutions
    gold_mask: Tensor | None = None  # [B_gold, G]

    def __post_init__(self) -> None:
        shape = tuple(self.student_logprobs.shape)
        if len(shape) != 2:
            raise ValueError(f"student_logprobs must be [batch, seq], got shape {shape}")
        for name in ("teacher_logprobs", "behavior_logprobs", "mask", "old_logprobs", "sampling_logprobs"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
        for name in ("teacher_topk_ids", "teacher_topk_logprobs", "student_topk_logprobs"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape[:2]) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape} + (k,)")
        if (self.gold_logprobs is None) != (self.gold_mask is None):
            raise ValueError("gold_logprobs and gold_mask come together")
        if self.gold_logprobs is not None and self.gold_logprobs.shape != self.gold_mask.shape:
            raise ValueError(
                f"gold_logprobs {tuple(self.gold_logprobs.shape)} != gold_mask {tuple(self.gold_mask.shape)}"
            )


class Objective(Protocol):
    """What the trainer calls. ``needs_topk``: the batch must carry the top-k fields."""

    needs_topk: bool

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, float]]: ...


def _check_reduction(value: str) -> None:
    check(value in SAMPLE_REDUCTIONS, f"sample_reduction must be one of {SAMPLE_REDUCTIONS}, got {value!r}")


def _valid(mask: Tensor) -> Tensor:
    return mask > 0


def clean(x: Tensor, valid: Tensor) -> Tensor:
    """0 where not ``valid`` (broadcast over trailing dims), ``max(x, LOGPROB_FLOOR)`` where valid."""
    while valid.dim() < x.dim():
        valid = valid.unsqueeze(-1)
    return torch.where(valid, x.clamp_min(LOGPROB_FLOOR), torch.zeros_like(x))


def reduce_tokens(per_token: Tensor, mask: Tensor, sample_reduction: str = "sum") -> Tensor:
    """Token mean over ``mask`` per sample (0 for a sample without tokens), then sum or mean over samples.

    ``"mean"`` divides by the number of samples that have at least one token, so padding rows in a
    micro-batch do not dilute it.
    """
    m = mask.to(per_token.dtype)
    per_token = torch.where(_valid(mask), per_token, torch.zeros_like(per_token))
    count = m.sum(-1)
    has_tokens = count > 0
    per_sample = (per_token * m).sum(-1) / torch.where(has_tokens, count, torch.ones_like(count))
    if sample_reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / has_tokens.sum().clamp_min(1)


# Metrics that are means over the micro-batch's valid tokens: the update step averages them weighted by
# tokens, so that they describe the whole batch whatever its split into micro-batches.
TOKEN_MEAN_METRICS = frozenset(
    {"adv_mean", "log_ratio_mean", "kl_student_teacher", "clip_frac", "f_divergence", "topk_divergence",
     "teacher_topk_mass", "student_topk_mass"}
)  # fmt: skip


def _token_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over all valid tokens of the batch (metrics only)."""
    x = torch.where(valid, x, torch.zeros_like(x))
    return x.sum() / valid.sum().clamp_min(1)


def _to_floats(named: dict[str, Tensor]) -> dict[str, float]:
    """One device->host transfer for all metrics instead of one sync per ``.item()``."""
    values = torch.stack([v.detach().float().reshape(()) for v in named.values()]).tolist()
    return dict(zip(named, values))


def _importance_weight(x: _Inputs, trust_region: bool, max_weight: float) -> Tensor:
    """Truncated importance weight to the distribution the stored token was drawn from (V-trace/TIS).

    The sampler is q = π_ref with temperature and top-p (``sampling_logprobs``; the raw π_ref when
    the store lacks them). Without a trust region the weight is sg(π_θ)/q. With one, the clipped
    ratio π_θ/π_ref already carries the π_θ part, so the weight is the constant π_ref/q (decoupled
    PPO: behaviour policy for the weight, π_ref as the proximal policy for the clip).
    """
    sampler = x.sampling if x.sampling is not None else x.behavior
    numerator = x.behavior if trust_region else x.student.detach()
    log_w = (numerator - sampler).clamp(-MAX_LOG_RATIO, math.log(max_weight))
    return torch.exp(log_w)


def _policy_gradient_loss(
    student: Tensor, advantage: Tensor, reference: Tensor, clip_eps: float | None
) -> tuple[Tensor, Tensor]:
    """Per-token surrogate ``-A · ratio`` (PPO-clipped when ``clip_eps``) and the clip indicator.

    ``reference`` is the start-of-step log-prob (or sg(student): ratio 1, gradient A·∇log π).
    """
    ratio = torch.exp((student - reference.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    advantage = advantage.detach()
    loss = -advantage * ratio
    if clip_eps is None:
        return loss, torch.zeros_like(loss)
    clipped_loss = -advantage * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    is_clipped = (clipped_loss > loss).to(loss.dtype)  # the pessimistic (clipped) branch is active
    return torch.maximum(loss, clipped_loss), is_clipped


def _kl_student_teacher_estimate(student: Tensor, teacher: Tensor, behavior: Tensor) -> Tensor:
    """Per-token KL(π_θ‖π_T) at each stored state, estimated from a token sampled by π_ref.

    With r = π_T/π_θ and w = π_θ/π_ref at the sampled token, ``w · (r − 1 − log r)`` is unbiased:
    E_ref[w·(r−1)] = Σ π_T − Σ π_θ = 0 and E_ref[−w·log r] = KL(π_θ‖π_T). It is ≥ 0 per token.
    """
    log_r = (teacher - student).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    w = torch.exp((student - behavior).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    return w * (torch.expm1(log_r) - log_r)


@dataclass
class _Inputs:
    valid: Tensor
    student: Tensor
    teacher: Tensor
    behavior: Tensor
    old: Tensor | None
    sampling: Tensor | None = None


def _sampled_inputs(batch: TokenBatch) -> _Inputs:
    valid = _valid(batch.mask)
    old = clean(batch.old_logprobs, valid) if batch.old_logprobs is not None else None
    sampling = clean(batch.sampling_logprobs, valid) if batch.sampling_logprobs is not None else None
    return _Inputs(
        valid,
        clean(batch.student_logprobs, valid),
        clean(batch.teacher_logprobs, valid),
        clean(batch.behavior_logprobs, valid),
        old,
        sampling,
    )


def _check_pg_options(clip_eps, max_importance_weight, sample_reduction, trust_region=None) -> None:
    check(clip_eps is None or 0 < clip_eps < 1, f"clip_eps must be None or in (0, 1), got {clip_eps}")
    check(
        trust_region is None or 0 < trust_region < 1,
        f"trust_region must be None or in (0, 1), got {trust_region}",
    )
    check(
        clip_eps is None or trust_region is None,
        "clip_eps (ratio to the start-of-step student) and trust_region (ratio to π_ref) are two clips "
        "of the same surrogate; set one of them",
    )
    check(max_importance_weight >= 1, f"max_importance_weight must be >= 1, got {max_importance_weight}")
    _check_reduction(sample_reduction)


def _pg_objective(obj, x: _Inputs, advantage: Tensor, mask: Tensor, extra_metrics) -> tuple[Tensor, dict]:
    """Shared tail of the sampled-token objectives: weighting, surrogate, reduction, metrics."""
    trust_region = getattr(obj, "trust_region", None)
    if obj.importance_weighting:
        advantage = advantage * _importance_weight(x, trust_region is not None, obj.max_importance_weight)
    if trust_region is not None:
        reference, eps = x.behavior, trust_region  # anchored at π_ref, the policy that wrote the store
    else:
        reference, eps = (x.old if x.old is not None else x.student), obj.clip_eps
    per_token, is_clipped = _policy_gradient_loss(x.student, advantage, reference, eps)
    loss = reduce_tokens(per_token, mask, obj.sample_reduction)
    with torch.no_grad():
        metrics = {
            "adv_mean": _token_mean(advantage, x.valid),
            "log_ratio_mean": _token_mean(x.teacher - x.student, x.valid),
            "kl_student_teacher": _token_mean(
                _kl_student_teacher_estimate(x.student, x.teacher, x.behavior), x.valid
            ),
            "clip_frac": _token_mean(is_clipped, x.valid),
            "tokens": x.valid.sum(),
            **{k: f(x) for k, f in extra_metrics.items()},
        }
    return loss, _to_floats(metrics)
