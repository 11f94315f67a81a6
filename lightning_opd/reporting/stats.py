"""Means with 95% confidence intervals over seeds: a toy accuracy moves by many points between seeds
and machines, so every reported figure carries its spread (Student's t, two-sided)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t by degrees of freedom (1..30); beyond that, the normal 1.96.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)  # fmt: skip


@dataclass(frozen=True)
class MeanCI:
    mean: float
    half_width: float  # the 95% interval is mean ± half_width; nan for a single value
    n: int
    values: tuple[float, ...]

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        if self.n < 2:
            return f"{scale * self.mean:.{digits}f}"
        return f"{scale * self.mean:.{digits}f} ± {scale * self.half_width:.{digits}f}"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.half_width, "n": self.n, "values": list(self.values)}


def t95(dof: int) -> float:
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def mean_ci(values) -> MeanCI:
    """Mean and the half-width of its two-sided 95% t-interval (nan with fewer than two values)."""
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return MeanCI(mean, math.nan, 1, values)
    half = t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return MeanCI(mean, half, len(values), values)
