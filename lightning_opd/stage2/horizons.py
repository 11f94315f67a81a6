"""Training horizons (METHODS §3): how many response tokens of each stored rollout a step trains on.

A teacher log-prob at position t depends only on the prefix, so a store generated with horizon T
serves every H <= T by masking (TOPD: a fixed cut; POPD: a horizon that grows during training).
``store_horizon`` is the T the store records; ``step`` is the 0-based optimiser step.

- ``full``: H = T.
- ``fixed``: H = ``tokens`` (must be <= T).
- ``fraction``: H = ceil(ρ·T), ρ = ``fraction`` in (0, 1] (TOPD uses 0.25 and 0.10).
- ``staircase``: H_k = min(T, H0 + dH·floor(k / dk)) (POPD as reported).
- ``linear``: H_k = H0 + floor((T − H0)·min(1, k / ramp_steps)), reaching T at ``ramp_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_opd.config import check

HORIZON_KINDS = ("full", "fixed", "fraction", "staircase", "linear")

# Which optional fields each kind uses; any other field set is a mistake worth reporting.
_FIELDS = {
    "full": (),
    "fixed": ("tokens",),
    "fraction": ("fraction",),
    "staircase": ("h0", "dh", "dk"),
    "linear": ("h0", "ramp_steps"),
}
_ALL_FIELDS = ("tokens", "fraction", "h0", "dh", "dk", "ramp_steps")


@dataclass
class HorizonConfig:
    kind: str = "full"
    tokens: int | None = None  # fixed horizon, in response tokens
    fraction: float | None = None  # ρ for kind="fraction"
    h0: int | None = None  # starting horizon (staircase, linear)
    dh: int | None = None  # staircase: tokens added per stair
    dk: int | None = None  # staircase: steps per stair
    ramp_steps: int | None = None  # linear: steps until the horizon reaches the store's

    def __post_init__(self) -> None:
        check(self.kind in HORIZON_KINDS, f"horizon kind must be one of {HORIZON_KINDS}, got {self.kind!r}")
        used = _FIELDS[self.kind]
        for name in _ALL_FIELDS:
            value = getattr(self, name)
            if name in used:
                check(value is not None, f"horizon kind {self.kind!r} needs {name}, got None")
            else:
                check(value is None, f"horizon kind {self.kind!r} does not use {name}, got {name}={value}")
        for name in ("tokens", "h0", "dk", "ramp_steps"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, int) and value >= 1),
                f"{name} must be an int >= 1, got {value}",
            )
        check(
            self.dh is None or (isinstance(self.dh, int) and self.dh >= 0),
            f"dh must be an int >= 0, got {self.dh}",
        )
        check(
            self.fraction is None or 0 < self.fraction <= 1,
            f"fraction must be in (0, 1], got {self.fraction}",
        )


def check_horizon(cfg: HorizonConfig, store_horizon: int) -> None:
    """ConfigError when the schedule asks for more tokens than the store was generated with."""
    check(
        isinstance(store_horizon, int) and store_horizon >= 1,
        f"store horizon must be an int >= 1, got {store_horizon}",
    )
    if cfg.kind == "fixed":
        check(
            cfg.tokens <= store_horizon,
            f"fixed horizon tokens={cfg.tokens} exceeds the store's horizon {store_horizon}; "
            f"use tokens <= {store_horizon} or a store generated with a longer horizon",
        )
    if cfg.kind in ("staircase", "linear"):
        check(
            cfg.h0 <= store_horizon,
            f"starting horizon h0={cfg.h0} exceeds the store's horizon {store_horizon}; "
            f"use h0 <= {store_horizon} or a store generated with a longer horizon",
        )


def horizon_from_flags(config) -> HorizonConfig:
    """The HorizonConfig of a flat stage config's ``horizon`` and ``horizon_*`` fields (0 means unset).

    Offline and online training expose the same flags; this is the one place they become a schedule.
    """
    return HorizonConfig(
        kind=config.horizon,
        tokens=config.horizon_tokens or None,
        fraction=config.horizon_fraction or None,
        h0=config.horizon_h0 or None,
        dh=config.horizon_dh or None,
        dk=config.horizon_dk or None,
        ramp_steps=config.horizon_ramp_steps or None,
    )


def horizon_at(cfg: HorizonConfig, step: int, store_horizon: int) -> int:
    """The horizon (response tokens trained on) at 0-based optimiser ``step``; always in [1, T]."""
    check_horizon(cfg, store_horizon)
    check(isinstance(step, int) and step >= 0, f"step must be an int >= 0, got {step}")
    t = store_horizon
    if cfg.kind == "full":
        return t
    if cfg.kind == "fixed":
        return cfg.tokens
    if cfg.kind == "fraction":
        # Round first so that 0.1 * 15360 = 1536.0000000000002 does not become 1537.
        return max(1, min(t, math.ceil(round(cfg.fraction * t, 6))))
    if cfg.kind == "staircase":
        return min(t, cfg.h0 + cfg.dh * (step // cfg.dk))
    progress = min(step, cfg.ramp_steps)
    return min(t, cfg.h0 + (t - cfg.h0) * progress // cfg.ramp_steps)  # integer arithmetic: exact


def response_mask(lengths: Sequence[int] | Tensor, horizon: int, max_len: int) -> Tensor:
    """float32 ``[B, max_len]``: 1 at response positions t < min(length, horizon), else 0."""
    check(horizon >= 0, f"horizon must be >= 0, got {horizon}")
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    keep = lengths.clamp_max(horizon)
    positions = torch.arange(max_len, device=lengths.device)
    return (positions[None, :] < keep[:, None]).to(torch.float32)
