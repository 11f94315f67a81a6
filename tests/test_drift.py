"""Drift control (issue 9): drift metrics against naive loops, the trust region's gradient, the
importance weight's sampler, warmup, the flags that reach the objective, and the trainer's log."""

import json
import math
import warnings

import pytest
import torch
from conftest import run_lopd

from lightning_opd.errors import ConfigError
from lightning_opd.stage2.drift import DriftWatch, add_sums, drift_metrics, drift_sums
from lightning_opd.stage2.objectives import LightningOPD, TokenBatch
from pipelines import train


def _naive_drift(student, behavior, mask, eps):
    ws, kls, logs, outside = [], [], [], 0
    for s_row, b_row, m_row in zip(student.tolist(), behavior.tolist(), mask.tolist()):
        for s, b, m in zip(s_row, b_row, m_row):
            if not m:
                continue
            w = math.exp(s - b)
            ws.append(w)
            kls.append(w * math.log(w) - w + 1)
            logs.append(s - b)
            outside += not (1 - eps <= w <= 1 + eps)
    n = len(ws)
    return {
        "drift_kl": sum(kls) / n,
        "drift_log_ratio": sum(logs) / n,
        "drift_ess": sum(ws) ** 2 / sum(w * w for w in ws) / n,
        "drift_outside": outside / n,
    }


def test_drift_metrics_match_a_naive_computation_across_micro_batches():
    g = torch.Generator().manual_seed(0)
    behavior = -torch.rand(4, 7, generator=g) * 3
    student = behavior + torch.randn(4, 7, generator=g) * 0.3
    mask = (torch.rand(4, 7, generator=g) > 0.3).float()
    mask[2] = 0  # a row with no token
    student[mask == 0] = float("nan")  # masked positions may hold anything
    expected = _naive_drift(torch.nan_to_num(student), behavior, mask, 0.2)
    # Two micro-batches summed give the same metrics as one batch.
    sums = add_sums(
        drift_sums(student[:2], behavior[:2], mask[:2], 0.2),
        drift_sums(student[2:], behavior[2:], mask[2:], 0.2),
    )
    got = drift_metrics(sums)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_drift_metrics_at_no_drift_and_with_no_tokens():
    lp = -torch.rand(2, 5)
    got = drift_metrics(drift_sums(lp, lp, torch.ones(2, 5), 0.2))
    assert got == pytest.approx(
        {"drift_kl": 0.0, "drift_log_ratio": 0.0, "drift_ess": 1.0, "drift_outside": 0.0}
    )
    assert drift_metrics(drift_sums(lp, lp, torch.zeros(2, 5), 0.2))["drift_ess"] == 1.0


def _grad(objective, student, teacher, behavior, sampling=None, mask=None):
    student = student.clone().requires_grad_(True)
    mask = torch.ones_like(student) if mask is None else mask
    batch = TokenBatch(
        student_logprobs=student,
        teacher_logprobs=teacher,
        behavior_logprobs=behavior,
        mask=mask,
        sampling_logprobs=sampling,
    )
    loss, metrics = objective(batch)
    loss.backward()
    return student.grad, metrics


def test_trust_region_stops_the_gradient_exactly_where_the_ratio_leaves_on_the_pushed_side():
    eps = 0.2
    behavior = torch.full((1, 12), -1.0)
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0, 0.5, 0.79, 1.0, 1.21, 2.0])
    student = behavior + ratios.log()[None]
    # Advantage = teacher - student: positive on the first 7 tokens, negative on the last 5.
    advantage = torch.tensor([1.0] * 7 + [-1.0] * 5)[None]
    teacher = student + advantage
    grad, metrics = _grad(LightningOPD(trust_region=eps), student, teacher, behavior)
    n = ratios.numel()
    inside = (ratios >= 1 - eps) & (ratios <= 1 + eps)
    pushed_out = ((advantage[0] > 0) & (ratios > 1 + eps)) | ((advantage[0] < 0) & (ratios < 1 - eps))
    # d/d log π of  -A·r  is  -A·r  (per-sample token mean: / n); zero where the clip binds.
    expected = torch.where(pushed_out, torch.zeros(n), -advantage[0] * ratios / n)
    assert torch.allclose(grad[0], expected, atol=1e-6)
    # Where the ratio left on the other side, the gradient still pulls it back.
    assert (grad[0][~inside & ~pushed_out] != 0).all()
    assert metrics["clip_frac"] == pytest.approx(pushed_out.float().mean().item())


def test_without_trust_region_the_gradient_is_the_papers():
    behavior = torch.full((1, 4), -1.0)
    student = behavior + torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    teacher = student + torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    grad, _ = _grad(LightningOPD(), student, teacher, behavior)
    assert torch.allclose(grad, -(teacher - student) / 4)


def test_importance_weight_uses_the_sampling_distribution():
    behavior = torch.tensor([[-1.0, -2.0]])
    sampling = torch.tensor([[-0.5, -2.5]])  # temperature < 1 sharpens: likely tokens gain, others lose
    student = torch.tensor([[-1.1, -1.9]])
    teacher = student + 1.0
    grad, _ = _grad(LightningOPD(importance_weighting=True), student, teacher, behavior, sampling)
    weight = torch.exp(student - sampling).clamp(max=2.0)
    assert torch.allclose(grad, -weight / 2)
    # With the trust region, the weight is the constant π_ref/q and the clipped ratio carries π_θ/π_ref.
    grad, _ = _grad(
        LightningOPD(importance_weighting=True, trust_region=0.2), student, teacher, behavior, sampling
    )
    expected = -torch.exp(behavior - sampling).clamp(max=2.0) * torch.exp(student - behavior) / 2
    assert torch.allclose(grad, expected)


def test_objective_options_are_checked():
    with pytest.raises(ConfigError, match="trust_region"):
        LightningOPD(trust_region=1.5)
    with pytest.raises(ConfigError, match="set one of them"):
        LightningOPD(trust_region=0.2, clip_eps=0.2)


def _config(**overrides):
    settings = dict(student="s", stores="x", out="o")
    settings.update(overrides)
    return train.TrainConfig(**settings)


def test_trust_region_flags_reach_the_objective():
    assert _config().build_objective().trust_region == 0.2  # on by default
    assert _config(trust_region=0.0).build_objective().trust_region is None  # the paper's update
    clipped = _config(clip_eps=0.3, trust_region=0.0).build_objective()
    assert clipped.clip_eps == 0.3 and clipped.trust_region is None
    with pytest.raises(ConfigError, match="two clips"):  # never silently one or the other
        _config(clip_eps=0.3)
    plus = _config(objective="opd_plus", divergence="forward_kl", trust_region=0.1).build_objective()
    assert plus.trust_region == 0.1
    with pytest.raises(ConfigError, match="trust_region"):
        _config(trust_region=1.0)
    with pytest.raises(ConfigError, match="warmup"):
        _config(warmup_steps=-1)


def test_drift_watch_warns_once_per_cause_and_says_what_to_do():
    lines = []
    watch = DriftWatch(max_passes=1.0, max_kl=0.05, trust_region=0.0, window=1)
    watch.check({"step": 3, "passes": 0.9, "drift_kl": 0.01, "drift_ess": 0.9}, lines.append)
    assert lines == []
    watch.check({"step": 4, "passes": 1.2, "drift_kl": 0.2, "drift_ess": 0.3}, lines.append)
    watch.check({"step": 5, "passes": 1.5, "drift_kl": 0.3, "drift_ess": 0.2}, lines.append)
    assert len(lines) == 3
    assert "pass 1.20" in lines[0] and "lopd precompute" in lines[0]
    assert "0.2000" in lines[1] and "--trust-region 0" in lines[1]
    assert "effective sample size" in lines[2]


def test_trainer_logs_drift_and_passes_and_warns(micro_store, sft_student_dir, tmp_path):
    out = tmp_path / "opd"
    result = run_lopd(
        "train",
        "--student",
        sft_student_dir,
        "--stores",
        micro_store,
        "--out",
        out,
        "--steps",
        4,
        "--batch-size",
        4,
        "--micro-batch-size",
        2,
        "--lr",
        "1e-2",
        "--warmup-steps",
        2,
        "--drift-max-passes",
        1,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 10 stored rollouts, 4 per step: passes 0.4, 0.8, 1.2, 1.6.
    assert [r["passes"] for r in rows] == pytest.approx([0.4, 0.8, 1.2, 1.6])
    assert rows[0]["drift_kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 trains the store's own policy
    assert rows[0]["drift_ess"] == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= r["drift_outside"] <= 1 and r["drift_kl"] >= 0 for r in rows)
    assert rows[-1]["drift_kl"] > 0
    assert [r["lr"] for r in rows] == pytest.approx([5e-3, 1e-2, 1e-2, 1e-2])  # 2 warmup steps
    assert "pass 1.20 over the store" in result.stdout
    assert "drift-kl" in result.stdout and "passes" in result.stdout


def test_run_plots_include_drift_when_logged(tmp_path):
    from lightning_opd.reporting import plots

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": s, "elapsed_s": s, "loss": 1.0, "drift_kl": 0.01 * s, "drift_ess": 1 - 0.1 * s,
         "drift_outside": 0.02 * s, "passes": 0.5 * s}
        for s in (1, 2, 3)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        # Panels whose metric no run logged (eval accuracy here) must not call an empty legend().
        warnings.simplefilter("error")
        paths = plots.run_figures([run], tmp_path / "png")
    assert paths["drift"].read_bytes()[:4] == b"\x89PNG"


def test_drift_watch_reads_a_trend_not_one_noisy_step():
    """Issue 22: the default run's single-step blips (0.0109 on the toy) do not warn; a sustained
    drift above the threshold does, with the window's mean; the defaults reuse a store twice."""
    lines = []
    watch = DriftWatch(trust_region=0.2)
    assert (watch.max_passes, watch.max_kl, watch.window) == (2.0, 0.015, 10)
    for step, kl in enumerate([0.006] * 9 + [0.03] + [0.006] * 10, start=1):  # one blip in twenty
        watch.check(
            {"step": step, "passes": step * 64 / 4096, "drift_kl": kl, "drift_ess": 0.99}, lines.append
        )
    assert lines == []
    for step in range(21, 31):
        watch.check({"step": step, "passes": 1.56, "drift_kl": 0.02, "drift_ess": 0.98}, lines.append)
    assert len(lines) == 1 and "over the last 10 steps" in lines[0] and "step 27" in lines[0]
    watch.check({"step": 31, "passes": 2.01, "drift_kl": 0.02, "drift_ess": 0.98}, lines.append)
    assert "pass 2.01" in lines[-1]
