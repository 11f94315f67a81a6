"""Top-k distribution divergences against the stored teacher top-k (METHODS §4, §7)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from lightning_opd.config import check
from lightning_opd.errors import ConfigError

from .base import _LN2, TokenBatch, _check_reduction, _to_floats, _token_mean, _valid, clean, reduce_tokens

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
