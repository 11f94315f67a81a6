"""Lightning OPD (and standard OPD's loss): the reverse-KL advantage on the sampled tokens (METHODS §1, 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .base import TokenBatch, _check_pg_options, _pg_objective, _sampled_inputs


@dataclass
class LightningOPD:
    """Lightning OPD (METHODS §2): A_t = log π_T(y_t) − sg(log π_θ(y_t)), surrogate −A_t·ratio_t.

    ratio_t = exp(log π_θ − sg(old)), with old = the start-of-step log-probs when the batch has
    them, else sg(log π_θ) (ratio 1). With the defaults (no old log-probs, no clip, no importance
    weight) the gradient is exactly A_t·∇log π_θ(y_t) per token, as in the authors' code.
    ``importance_weighting`` multiplies by exp(sg(log π_θ) − log q) truncated at
    ``max_importance_weight``, q the distribution the token was sampled from (not in the paper: it
    reweights the π_ref samples toward π_θ).

    ``trust_region`` = ε (not in the paper; METHODS §9): the ratio becomes π_θ/π_ref, π_ref = the
    policy that wrote the store (its raw stored log-probs), inside PPO's clip. The gradient is
    −A·ratio·∇log π_θ while the ratio is inside [1−ε, 1+ε] and exactly 0 once it has left that
    interval on the side the advantage pushes (A > 0 above 1+ε, A < 0 below 1−ε): the student can
    move at most ε away from π_ref on any stored token, which keeps the fixed store on-policy enough.

    Metrics: ``adv_mean`` (effective advantage, importance weight included), ``log_ratio_mean``
    (teacher − student), ``kl_student_teacher`` (see ``_kl_student_teacher_estimate``),
    ``clip_frac``, ``tokens``; all over valid tokens of the batch.
    """

    clip_eps: float | None = None
    importance_weighting: bool = False
    max_importance_weight: float = 2.0
    trust_region: float | None = None
    sample_reduction: str = "sum"
    needs_topk: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_pg_options(self.clip_eps, self.max_importance_weight, self.sample_reduction, self.trust_region)

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        x = _sampled_inputs(batch)
        advantage = (x.teacher - x.student).detach()
        return _pg_objective(self, x, advantage, batch.mask, extra_metrics={})
