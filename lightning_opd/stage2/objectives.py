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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_opd.config import check
from lightning_opd.errors import ConfigError

LOGPROB_FLOOR = -1e4  # below any real log-prob; keeps exp() at exactly 0 and differences finite
MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: large enough never to bind on sane data, small enough to stay finite
SAMPLE_REDUCTIONS = ("sum", "mean")


# ----------------------------------------------------------------------------------------------
# Batch and shared helpers


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


# ----------------------------------------------------------------------------------------------
# Lightning OPD (and standard OPD's loss)


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


# ----------------------------------------------------------------------------------------------
# OPD+: f-divergence advantages (METHODS §6)

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd", "hellinger", "tv", "alpha")
_LN2 = math.log(2.0)


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


# ----------------------------------------------------------------------------------------------
# Top-k distribution divergences (METHODS §4, §7)

TOPK_KINDS = ("reverse_kl", "forward_kl", "gjsd")
TOPK_TAILS = ("renormalize", "tail_bucket")
TAIL_MIN_MASS = 1e-6


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −ln 2."""
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def topk_distribution(logprobs: Tensor, tail: str) -> Tensor:
    """Log-probs over the buckets the top-k divergence compares, from full-vocabulary log-probs [.., K].

    ``renormalize``: the K entries renormalised to sum to 1 (mass outside the top-k is ignored).
    ``tail_bucket``: K + 1 buckets, the K entries unchanged plus one for everything else with mass
    1 − Σ top-k, floored at ``TAIL_MIN_MASS`` (stored bf16-rounded log-probs can sum past 1).
    """
    lse = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    if tail == "renormalize":
        return logprobs - lse
    log_tail = log1mexp(lse.clamp_max(math.log1p(-TAIL_MIN_MASS)))
    return torch.cat([logprobs, log_tail], dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) over the last dim; log-probs are finite (floored), so 0·(−1e4) terms stay 0."""
    return (torch.exp(log_p) * (log_p - log_q)).sum(-1)


@dataclass
class TopKDivergence:
    """A distribution divergence per position over the teacher's stored top-k support.

    P = teacher, Q = student, both restricted to the teacher's top-k ids by ``tail`` (see
    ``topk_distribution``). ``forward_kl`` = KL(P‖Q); ``reverse_kl`` = KL(Q‖P) (ESR's loss);
    ``gjsd`` = β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q, 0 < β < 1 (β→0 behaves like
    forward KL scaled by β, β→1 like reverse KL scaled by 1−β). The loss is the divergence itself,
    differentiated exactly through the student's top-k log-probs (no sampling, no advantage).
    """

    kind: str = "reverse_kl"
    beta: float = 0.5
    tail: str = "tail_bucket"
    sample_reduction: str = "sum"
    needs_topk: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check(self.kind in TOPK_KINDS, f"kind must be one of {TOPK_KINDS}, got {self.kind!r}")
        check(self.tail in TOPK_TAILS, f"tail must be one of {TOPK_TAILS}, got {self.tail!r}")
        check(0 < self.beta < 1, f"beta must be in (0, 1), got {self.beta}")
        _check_reduction(self.sample_reduction)

    def __call__(self, batch: TokenBatch) -> tuple[Tensor, dict[str, float]]:
        if batch.teacher_topk_logprobs is None or batch.student_topk_logprobs is None:
            raise ConfigError(
                "the top-k objective needs teacher_topk_logprobs and student_topk_logprobs; "
                "score the store with --topk > 0 or choose the 'lightning' objective"
            )
        valid = _valid(batch.mask)
        teacher = clean(batch.teacher_topk_logprobs, valid).detach()
        student = clean(batch.student_topk_logprobs, valid)
        log_p, log_q = topk_distribution(teacher, self.tail), topk_distribution(student, self.tail)
        per_token = self._divergence(log_p, log_q)
        loss = reduce_tokens(per_token, batch.mask, self.sample_reduction)
        with torch.no_grad():
            metrics = {
                "topk_divergence": _token_mean(per_token, valid),
                "teacher_topk_mass": _token_mean(torch.exp(torch.logsumexp(teacher, -1)), valid),
                "student_topk_mass": _token_mean(torch.exp(torch.logsumexp(student, -1)), valid),
                "tokens": valid.sum(),
            }
        return loss, _to_floats(metrics)

    def _divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        if self.kind == "forward_kl":
            return _kl(log_p, log_q)
        if self.kind == "reverse_kl":
            return _kl(log_q, log_p)
        log_m = torch.logaddexp(log_p + math.log(self.beta), log_q + math.log1p(-self.beta))
        return self.beta * _kl(log_p, log_m) + (1.0 - self.beta) * _kl(log_q, log_m)


# ----------------------------------------------------------------------------------------------
# StableOPD terms (METHODS §5)

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


# ----------------------------------------------------------------------------------------------
# Registry

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
    "FDivergenceOPD",
    "LightningOPD",
    "Objective",
    "TokenBatch",
    "TopKDivergence",
    "f_divergence_value",
    "gold_nll",
    "make_objective",
    "on_policy_reference_kl",
    "opd_plus_advantage",
    "reduce_tokens",
    "reference_kl",
]
