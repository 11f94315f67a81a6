"""Horizon schedules and response masks."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_opd.errors import ConfigError
from lightning_opd.stage2.horizons import HorizonConfig, check_horizon, horizon_at, response_mask

T = 15360


def test_full_and_fixed():
    assert [horizon_at(HorizonConfig(), k, T) for k in (0, 500)] == [T, T]
    assert [horizon_at(HorizonConfig("fixed", tokens=4096), k, T) for k in (0, 500)] == [4096, 4096]
    assert horizon_at(HorizonConfig("fixed", tokens=T), 0, T) == T


@pytest.mark.parametrize(("rho", "expected"), [(0.25, 3840), (0.10, 1536), (1.0, T), (1e-6, 1)])
def test_fraction_is_ceil_of_rho_t(rho, expected):
    assert horizon_at(HorizonConfig("fraction", fraction=rho), 7, T) == expected


def test_fraction_rounds_up_non_integers():
    assert horizon_at(HorizonConfig("fraction", fraction=0.1), 0, 4097) == 410  # 409.7 -> 410


def test_staircase_matches_the_formula():
    cfg = HorizonConfig("staircase", h0=1024, dh=512, dk=10)
    got = [horizon_at(cfg, k, 3000) for k in range(0, 60)]
    assert got == [min(3000, 1024 + 512 * (k // 10)) for k in range(0, 60)]
    assert got[:10] == [1024] * 10 and got[10] == 1536 and got[39] == 2560 and got[40] == 3000


def test_linear_ramp_reaches_the_store_horizon():
    cfg = HorizonConfig("linear", h0=100, ramp_steps=10)
    got = [horizon_at(cfg, k, 1100) for k in range(0, 15)]
    assert got[0] == 100 and got[5] == 600 and got[10:] == [1100] * 5
    assert got == sorted(got)
    assert got == [100 + math.floor(1000 * min(1, k / 10)) for k in range(15)]


def test_horizon_beyond_the_store_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"tokens=5000.*horizon 4096"):
        check_horizon(HorizonConfig("fixed", tokens=5000), 4096)
    with pytest.raises(ConfigError, match=r"h0=5000.*horizon 4096"):
        horizon_at(HorizonConfig("staircase", h0=5000, dh=1, dk=1), 0, 4096)
    check_horizon(HorizonConfig("fraction", fraction=0.5), 4096)  # relative kinds always fit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "ramp"}, "got 'ramp'"),
        ({"kind": "fixed"}, "needs tokens"),
        ({"kind": "fixed", "tokens": 0}, "got 0"),
        ({"kind": "fixed", "tokens": 10, "fraction": 0.5}, "does not use fraction"),
        ({"kind": "fraction", "fraction": 1.5}, "got 1.5"),
        ({"kind": "staircase", "h0": 10, "dh": -1, "dk": 5}, "got -1"),
        ({"kind": "linear", "h0": 10}, "needs ramp_steps"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HorizonConfig(**kwargs)


def test_response_mask_cuts_at_length_and_horizon():
    mask = response_mask([5, 2, 0, 9], horizon=4, max_len=6)
    naive = torch.tensor([[1.0 if t < min(n, 4) else 0.0 for t in range(6)] for n in (5, 2, 0, 9)])
    assert mask.dtype == torch.float32 and mask.shape == (4, 6)
    assert torch.equal(mask, naive)
    assert torch.equal(
        response_mask(torch.tensor([3]), horizon=100, max_len=4), torch.tensor([[1.0, 1, 1, 0]])
    )
