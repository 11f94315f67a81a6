"""StableOPD terms (METHODS §5): the reference KL, the gold NLL, and the composite that adds them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_opd.config import check
from lightning_opd.errors import ConfigError

from .base import (
    MAX_LOG_RATIO,
    Objective,
    TokenBatch,
    _check_reduction,
    _to_floats,
    _valid,
    clean,
    reduce_tokens,
)

REF_KL_ESTIMATORS = ("kl_theta_ref", "kl_ref_theta")


def reference_kl(
    student_logprobs: Tensor,
    behavior_logprobs: Tensor,
    mask: Tensor,
    estimator: str = "kl_theta_ref",
    sample_reduction: str = "sum",
) -> Tensor:
    """Per-token KL between π_θ and π_ref at the stored states, from the token π_ref sampled there.

    With r = π_θ(y_t)/π_ref(y_t) at the stored token y_t ∼ π_ref(·|s_t):

    - ``kl_theta_ref`` (StableOPD's direction, KL(π_θ‖π_ref)): ``r·log r − r + 1``. Importance
      weighting turns E_θ[log r] into E_ref[r·log r]; the ``−(r − 1)`` term has expectation 0 under
      π_ref and makes every term ≥ 0. Both value and gradient are unbiased per state.
    - ``kl_ref_theta`` (KL(π_ref‖π_θ), the "k3" estimator): ``r − 1 − log r``; also ≥ 0 with
      unbiased value and gradient (E_ref[(r − 1)·∇log π_θ] = −E_ref[∇log π_θ]).

    States are those of π_ref's rollouts (per-state KL averaged over the stored prefixes), and
    log r is clamped at ±``MAX_LOG_RATIO`` only to stay finite. Reduced like every objective.
    """
    check(estimator in REF_KL_ESTIMATORS, f"estimator must be one of {REF_KL_ESTIMATORS}, got {estimator!r}")
    _check_reduction(sample_reduction)
    valid = _valid(mask)
    log_r = (clean(student_logprobs, valid) - clean(behavior_logprobs, valid).detach()).clamp(
        -MAX_LOG_RATIO, MAX_LOG_RATIO
    )
    r = torch.exp(log_r)
    per_token = r * log_r - r + 1.0 if estimator == "kl_theta_ref" else r - 1.0 - log_r
    return reduce_tokens(per_token, mask, sample_reduction)


def on_policy_reference_kl(
    student_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, sample_reduction: str = "sum"
) -> Tensor:
    """Per-state KL(π_θ‖π_ref) from tokens sampled by π_θ itself (online StableOPD), reduced like the objectives.

    With log r = log π_θ(y_t) − log π_ref(y_t), y_t ∼ π_θ(·|s_t):

    - value: ``1/r − 1 + log r`` (Schulman's k3 with the roles that fit on-policy samples): ≥ 0 per
      token and unbiased, E_θ[π_ref/π_θ] = 1 and E_θ[log r] = KL(π_θ‖π_ref);
    - gradient: ``sg(log r)·∇log π_θ(y_t)``, unbiased for ∇KL(π_θ‖π_ref) at the state (score function:
      ∇Σ π_θ log r = E_θ[log r·∇log π_θ] + E_θ[∇log π_θ], and the last term is 0).

    This equals the offline estimator ``objectives.reference_kl`` importance-weighted by sg(π_ref/π_θ)
    (its expectation is over π_ref's tokens). Differentiating k3 directly would instead give the
    gradient of KL(π_ref‖π_θ); using the offline formula on on-policy tokens estimates neither.
    """
    valid = mask > 0
    student = clean(student_logprobs, valid)
    log_r = (student.detach() - clean(ref_logprobs, valid).detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    value = torch.expm1(-log_r) + log_r
    per_token = value + log_r * (student - student.detach())  # value k3, gradient log r · ∇log π_θ
    return reduce_tokens(per_token, mask, sample_reduction)


def gold_nll(gold_logprobs: Tensor, gold_mask: Tensor, sample_reduction: str = "sum") -> Tensor:
    """Negative log-likelihood of gold solutions, token mean per solution, reduced like the base loss."""
    valid = _valid(gold_mask)
    return reduce_tokens(-clean(gold_logprobs, valid), gold_mask, sample_reduction)


@dataclass
class Composite:
    """``base + ref_kl_coef · reference_kl + gold_nll_coef · gold_nll`` (StableOPD: 0.01 and 0.1).

    The extra terms use the base objective's ``sample_reduction``, so the coefficients mean the same
    whatever the base. ``needs_gold`` tells the trainer to put gold solutions in the batch.
    """

    base: Objective
    ref_kl_coef: float = 0.0
    gold_nll_coef: float = 0.0
    ref_kl_estimator: str = "kl_theta_ref"

    def __post_init__(self) -> None:
        check(self.ref_kl_coef >= 0, f"ref_kl_coef must be >= 0, got {self.ref_kl_coef}")
        check(self.gold_nll_coef >= 0, f"gold_nll_coef must be >= 0, got {self.gold_nll_coef}")
        check(
            self.ref_kl_estimator in REF_KL_ESTIMATORS,
            f"ref_kl_estimator must be one of {REF_KL_ESTIMATORS}, got {self.ref_kl_estimator!r}",
        )

    @property
    def needs_topk(self) -> bool:
        return self.base.needs_topk

    @property
    def needs_gold(self) -> bool:
        return self.gold_nll_coef > 0

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        loss, metrics = self.base(batch)
        reduction = getattr(self.base, "sample_reduction", "sum")
        extra: dict[str, Tensor] = {"base_loss": loss.detach()}
        if self.ref_kl_coef > 0:
            kl = reference_kl(
                batch.student_logprobs, batch.behavior_logprobs, batch.mask, self.ref_kl_estimator, reduction
            )
            loss = loss + self.ref_kl_coef * kl
            extra["ref_kl"] = kl
        if self.gold_nll_coef > 0:
            if batch.gold_logprobs is None:
                raise ConfigError(
                    f"gold_nll_coef={self.gold_nll_coef} but the batch has no gold solutions; "
                    "give the prompt set a 'solution' column or set gold_nll_coef=0"
                )
            nll = gold_nll(batch.gold_logprobs, batch.gold_mask, reduction)
            loss = loss + self.gold_nll_coef * nll
            extra["gold_nll"] = nll
        return loss, {**metrics, **_to_floats(extra)}
