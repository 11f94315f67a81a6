"""OPD+: f-divergence advantages on the sampled tokens (METHODS §6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_opd.config import check
from lightning_opd.errors import ConfigError

from .base import (
    _LN2,
    MAX_LOG_RATIO,
    TokenBatch,
    _check_pg_options,
    _Inputs,
    _pg_objective,
    _sampled_inputs,
    _token_mean,
)

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "hellinger", "tv", "alpha")


def f_divergence_value(divergence: str, log_u: Tensor, alpha: float = 0.5) -> Tensor:
    """f(u) for u = π_T/π_θ, written in log u for stability: D_f(π_θ‖π_T) = E_{π_θ}[f(u)]."""
    u = torch.exp(log_u)
    if divergence == "reverse_kl":
        return -log_u
    if divergence == "forward_kl":
        return u * log_u
    if divergence == "jsd":
        log_mid = F.softplus(log_u) - _LN2  # log((1 + u) / 2)
        return 0.5 * (u * log_u - (1.0 + u) * log_mid)
    if divergence == "hellinger":
        return (torch.exp(0.5 * log_u) - 1.0) ** 2
    if divergence == "tv":
        return 0.5 * (u - 1.0).abs()
    if divergence == "alpha":
        return (torch.exp(alpha * log_u) - alpha * u - (1.0 - alpha)) / (alpha * (alpha - 1.0))
    raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def opd_plus_advantage(divergence: str, log_u: Tensor, alpha: float = 0.5) -> Tensor:
    """The unbiased OPD+ advantage w_f(u) = −f(u) + u·f′(u) (METHODS §6 table)."""
    if divergence == "reverse_kl":
        return log_u - 1.0
    if divergence == "forward_kl":
        return torch.exp(log_u)
    if divergence == "jsd":
        return 0.5 * (F.softplus(log_u) - _LN2)
    if divergence == "hellinger":
        return torch.exp(0.5 * log_u) - 1.0
    if divergence == "tv":
        return 0.5 * torch.sign(log_u)
    if divergence == "alpha":
        return torch.expm1(alpha * log_u) / alpha
    raise ConfigError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


@dataclass
class FDivergenceOPD:
    """OPD+ (METHODS §6): minimise D_f(π_θ‖π_T) = E_{π_θ}[f(u)], u = π_T(y_t)/π_θ(y_t) per token.

    Sign: ∇D_f = −E_{π_θ}[w_f(u)·∇log π_θ], so w_f is used directly as the advantage of the shared
    surrogate −sg(A)·ratio, whose expected gradient is then exactly ∇D_f (descent lowers D_f).
    ``stop_gradient=True`` uses A = −f(u) instead (the biased "stop-gradient OPD" baseline; for
    reverse KL it differs from OPD+ only by a constant, i.e. it is Lightning's advantage).
    log u = teacher − sg(student) is clamped to ±``log_u_clamp``; advantages are never normalised.
    Expectations are under π_θ, but the stored tokens come from π_ref: set ``importance_weighting``
    to reweight them (truncated), and ``trust_region`` to keep π_θ near π_ref, as in ``LightningOPD``.
    """

    divergence: str = "reverse_kl"
    alpha: float = 0.5
    stop_gradient: bool = False
    log_u_clamp: float = 6.0
    clip_eps: float | None = None
    importance_weighting: bool = False
    max_importance_weight: float = 2.0
    trust_region: float | None = None
    sample_reduction: str = "sum"
    needs_topk: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check(
            self.divergence in DIVERGENCES,
            f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}",
        )
        check(
            self.alpha not in (0.0, 1.0),
            f"alpha must not be 0 or 1 (use forward_kl/reverse_kl), got {self.alpha}",
        )
        check(
            0 < self.log_u_clamp <= MAX_LOG_RATIO,
            f"log_u_clamp must be in (0, {MAX_LOG_RATIO}], got {self.log_u_clamp}",
        )
        _check_pg_options(self.clip_eps, self.max_importance_weight, self.sample_reduction, self.trust_region)

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        x = _sampled_inputs(batch)
        log_u = (x.teacher - x.student).detach().clamp(-self.log_u_clamp, self.log_u_clamp)
        if self.stop_gradient:
            advantage = -f_divergence_value(self.divergence, log_u, self.alpha)
        else:
            advantage = opd_plus_advantage(self.divergence, log_u, self.alpha)

        def divergence_estimate(x: _Inputs) -> Tensor:
            # E_{π_θ}[f(u)] from π_ref's samples: importance weight π_θ/π_ref, not truncated.
            w = torch.exp((x.student - x.behavior).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
            return _token_mean(w * f_divergence_value(self.divergence, log_u, self.alpha), x.valid)

        return _pg_objective(
            self, x, advantage, batch.mask, extra_metrics={"f_divergence": divergence_estimate}
        )
