"""How far the student has drifted from π_ref, the policy that wrote the store (METHODS §9).

Offline training reuses tokens sampled once by π_ref. The per-token signal stays informative only
while π_θ ≈ π_ref on the stored states, and nothing resamples the damage away when it is not, so
stage two measures the drift every step from quantities it already has: the student's log-prob of
each stored token (recomputed for the loss) and π_ref's raw log-prob of it (stored). With
w = π_θ(y_t)/π_ref(y_t) at stored tokens y_t ~ π_ref:

- ``drift_kl``: KL(π_θ‖π_ref) per state, estimated by ``w·log w − w + 1`` (unbiased because
  E_ref[w] = 1, and ≥ 0 per token, so it never averages to a negative value);
- ``drift_log_ratio``: the plain mean of log w, with its sign (negative: the student has moved mass
  away from what π_ref sampled);
- ``drift_ess``: the effective sample size (Σw)²/Σw² of the weights, as a share of the tokens
  (1 = no drift; 0.5 = the store is worth half as many on-policy tokens);
- ``drift_outside``: the share of tokens whose w lies outside the trust region [1−ε, 1+ε].

Passes over the store are counted by the trainer. ``DriftWatch`` turns the numbers into warnings
that say what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_opd.stage2.objectives import MAX_LOG_RATIO

DRIFT_KEYS = ("drift_kl", "drift_log_ratio", "drift_ess", "drift_outside")


@torch.no_grad()
def drift_sums(student: Tensor, behavior: Tensor, mask: Tensor, eps: float) -> dict[str, float]:
    """Token sums of one micro-batch (so micro-batches and ranks add up exactly): tokens, Σw, Σw²,
    Σ(w log w − w + 1), Σ log w, #outside [1−eps, 1+eps]. Reduce with ``drift_metrics``."""
    valid = mask > 0
    log_w = (student.detach().float() - behavior.float()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    log_w = torch.where(valid, log_w, torch.zeros_like(log_w))
    w = torch.exp(log_w)
    v = valid.float()
    outside = ((w < 1.0 - eps) | (w > 1.0 + eps)).float() * v
    sums = torch.stack(
        [
            v.sum(),
            (w * v).sum(),
            (w * w * v).sum(),
            ((w * log_w - w + 1.0) * v).sum(),
            (log_w * v).sum(),
            outside.sum(),
        ]
    ).tolist()
    return dict(zip(("n", "w", "w2", "kl", "log_w", "outside"), sums))


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + v for k, v in b.items()}


def drift_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The per-step drift metrics from accumulated ``drift_sums``."""
    n = sums.get("n", 0.0)
    if n <= 0:
        return {"drift_kl": 0.0, "drift_log_ratio": 0.0, "drift_ess": 1.0, "drift_outside": 0.0}
    ess = sums["w"] ** 2 / sums["w2"] / n if sums["w2"] > 0 else 0.0
    return {
        "drift_kl": sums["kl"] / n,
        "drift_log_ratio": sums["log_w"] / n,
        "drift_ess": ess,
        "drift_outside": sums["outside"] / n,
    }


@dataclass
class DriftWatch:
    """Warns once per cause: a store reused beyond ``max_passes``, or drift past its thresholds.

    The KL and ESS checks read the mean over the last ``window`` steps: one step's estimate from a batch
    of rollouts is noisy (single steps of the toy's default runs reached 0.0109 while their 10-step
    means stayed <= 0.0079), and a warning should mean a trend, not a blip. Calibrated on the toy
    (docs/RESULTS.md, 3 seeds each, 100 steps, 1.56 passes over the store): the runs that gained, the
    default trust region (+19 to +23 points) and the top-k objective (+20 to +27), peaked at 10-step
    means of 0.0075-0.0079 and 0.0116-0.0130 nats per token; the paper's update without a trust region,
    which lost 14-58 points, crossed 0.015 by step 11-17 and peaked at 0.024-0.026. Reusing the store
    1.56 times did not hurt the gaining runs, so passes warn from 2. The ESS stayed >= 0.94 in all of
    them, so its threshold only catches gross drift.
    """

    max_passes: float = 2.0
    max_kl: float = 0.015
    min_ess: float = 0.5
    trust_region: float = 0.0
    window: int = 10
    warned: set[str] = field(default_factory=set)
    recent: list[tuple[float, float]] = field(default_factory=list)  # (drift_kl, drift_ess) per step

    def check(self, row: dict, log) -> None:
        fixes = (
            "regenerate the store from the current student (lopd precompute --student <run>/final), "
            "lower --lr, or keep --trust-region on"
        )
        if "drift_kl" in row:
            self.recent = [*self.recent, (row["drift_kl"], row.get("drift_ess", 1.0))][-self.window :]
        kl = sum(k for k, _ in self.recent) / max(1, len(self.recent))
        ess = sum(e for _, e in self.recent) / max(1, len(self.recent))
        over = f"the last {len(self.recent)} steps" if len(self.recent) > 1 else "this step"
        if row.get("passes", 0.0) > self.max_passes and "passes" not in self.warned:
            self.warned.add("passes")
            log(
                f"warning: step {row['step']} starts pass {row['passes']:.2f} over the store; reused stored "
                f"tokens grow off-policy as the student drifts (drift KL {row.get('drift_kl', 0):.4f}). "
                f"Watch drift_kl/drift_ess in metrics.jsonl; if they grow, {fixes}"
            )
        if kl > self.max_kl and "kl" not in self.warned:
            self.warned.add("kl")
            log(
                f"warning: step {row['step']}: KL(student‖store policy) ≈ {kl:.4f} per token over {over} "
                f"> {self.max_kl}; the stored tokens no longer describe the student well. {fixes.capitalize()}"
                + ("" if self.trust_region else " (it is off: --trust-region 0)")
            )
        if ess < self.min_ess and "ess" not in self.warned:
            self.warned.add("ess")
            log(
                f"warning: step {row['step']}: effective sample size of π_θ/π_ref is {ess:.2f} of the "
                f"tokens over {over} (< {self.min_ess}). {fixes.capitalize()}"
            )
