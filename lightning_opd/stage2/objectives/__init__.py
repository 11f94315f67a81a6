"""Training objectives on per-token log-probs (METHODS.md §1, 2, 4–7).

Every objective takes a ``TokenBatch`` and returns ``(loss, metrics)``. They share one reduction:
the token mean over ``mask`` within each sample, then a sum (the authors' default) or a mean over
samples. A sample with no valid token contributes 0, never NaN.

Robustness contract: masked positions may hold anything (-inf, NaN, garbage), and valid positions
may hold extreme log-probs (-1e4). Inputs are first replaced by 0 where masked and floored at
``LOGPROB_FLOOR`` where valid, *before* any arithmetic: masking the result afterwards is not enough,
because autograd multiplies the zero upstream gradient with an inf or NaN local one and gets NaN.
Every ``exp`` of a log-ratio is clamped at ``MAX_LOG_RATIO`` for the same reason.

Sign convention: the loss is minimised. With advantage A_t, the policy-gradient surrogate
is ``-A_t · ratio_t`` whose gradient at ratio 1 is ``-A_t · ∇log π_θ(y_t)``; a gradient *descent*
step therefore raises log π_θ(y_t) where A_t > 0.

One module per family, on what they share (``base``: the batch, the reduction, the cleaning, the
policy-gradient surrogate): ``lightning`` (Lightning OPD, standard OPD's loss), ``opd_plus``
(f-divergence advantages), ``topk`` (top-k distribution divergences), ``stable`` (StableOPD's
reference KL and gold NLL, and ``Composite``). This package re-exports them and holds the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

from lightning_opd.errors import ConfigError

from .base import (
    LOGPROB_FLOOR,
    MAX_LOG_RATIO,
    SAMPLE_REDUCTIONS,
    TOKEN_MEAN_METRICS,
    Objective,
    TokenBatch,
    clean,
    reduce_tokens,
)
from .lightning import (
    LightningOPD,
)
from .opd_plus import (
    DIVERGENCES,
    FDivergenceOPD,
    f_divergence_value,
    opd_plus_advantage,
)
from .stable import (
    REF_KL_ESTIMATORS,
    Composite,
    gold_nll,
    on_policy_reference_kl,
    reference_kl,
)
from .topk import (
    TAIL_MIN_MASS,
    TOPK_KINDS,
    TOPK_TAILS,
    TopKDivergence,
    log1mexp,
    topk_distribution,
)

OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "lightning": LightningOPD,
    "opd_plus": FDivergenceOPD,
    "topk": TopKDivergence,
}


def make_objective(
    name: str,
    *,
    ref_kl_coef: float = 0.0,
    gold_nll_coef: float = 0.0,
    ref_kl_estimator: str = "kl_theta_ref",
    **kwargs,
) -> Objective:
    """Build an objective by name; non-zero ``ref_kl_coef`` / ``gold_nll_coef`` wrap it in ``Composite``.

    ``make_objective("lightning", ref_kl_coef=0.01, gold_nll_coef=0.1)`` is StableOPD on Lightning.
    """
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"objective {name!r} takes no option(s) {unknown}; it takes {sorted(known)}")
    base = cls(**kwargs)
    if ref_kl_coef or gold_nll_coef:
        return Composite(base, ref_kl_coef, gold_nll_coef, ref_kl_estimator)
    return base


__all__ = [
    "Composite",
    "DIVERGENCES",
    "FDivergenceOPD",
    "LOGPROB_FLOOR",
    "LightningOPD",
    "MAX_LOG_RATIO",
    "OBJECTIVES",
    "Objective",
    "REF_KL_ESTIMATORS",
    "SAMPLE_REDUCTIONS",
    "TAIL_MIN_MASS",
    "TOKEN_MEAN_METRICS",
    "TOPK_KINDS",
    "TOPK_TAILS",
    "TokenBatch",
    "TopKDivergence",
    "clean",
    "f_divergence_value",
    "gold_nll",
    "log1mexp",
    "make_objective",
    "on_policy_reference_kl",
    "opd_plus_advantage",
    "reduce_tokens",
    "reference_kl",
    "topk_distribution",
]
