"""Objectives pinned against hand-computed gradients and exact expectations on tiny vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_opd.errors import ConfigError
from lightning_opd.stage2.objectives import (
    DIVERGENCES,
    Composite,
    FDivergenceOPD,
    LightningOPD,
    TokenBatch,
    TopKDivergence,
    f_divergence_value,
    make_objective,
    opd_plus_advantage,
    reduce_tokens,
    reference_kl,
)
from lightning_opd.stage2.objectives.base import _kl_student_teacher_estimate

D = torch.float64


def _softmax_by_hand(logits):
    e = [[math.exp(v) for v in row] for row in logits.tolist()]
    return torch.tensor([[v / sum(row) for v in row] for row in e], dtype=D)


def test_reduce_tokens_per_sample_mean_then_sum_or_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0], [5.0, 6.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert reduce_tokens(per_token, mask, "sum").item() == pytest.approx(1.5 + 4.0)
    assert reduce_tokens(per_token, mask, "mean").item() == pytest.approx(
        (1.5 + 4.0) / 2
    )  # empty row excluded
    assert reduce_tokens(per_token, torch.zeros_like(mask), "mean").item() == 0.0


# ------------------------------------------------------------------------------------------------
# Lightning OPD against a hand-computed gradient


def _tiny_lightning_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, generator=g, dtype=D)  # [B, S, V]
    targets = torch.tensor([[0, 3, 1], [2, 2, 0]])
    teacher = torch.log(torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.6, 0.05]], dtype=D))
    behavior = torch.log(torch.tensor([[0.3, 0.3, 0.2], [0.4, 0.1, 0.3]], dtype=D))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=D)
    return logits, targets, teacher, behavior, mask


def _hand_lightning_grad(logits, targets, teacher, mask, weight_fn=lambda b, t, logp: 1.0, ratio_adv=None):
    """dL/dlogits with L = Σ_b (1/n_b) Σ_t −A_t·ratio_t, ratio 1: −A·(onehot − p)/n_b."""
    grad = torch.zeros_like(logits)
    for b in range(logits.shape[0]):
        n = mask[b].sum().item()
        probs = _softmax_by_hand(logits[b])
        for t in range(logits.shape[1]):
            if mask[b, t] == 0:
                continue
            logp = math.log(probs[t, targets[b, t]].item())
            adv = teacher[b, t].item() - logp
            scale = ratio_adv(b, t, adv) if ratio_adv else adv * weight_fn(b, t, logp)
            onehot = torch.zeros(logits.shape[-1], dtype=D)
            onehot[targets[b, t]] = 1.0
            grad[b, t] = -scale * (onehot - probs[t]) / n
    return grad


def _run(objective, logits, targets, teacher, behavior, mask, old=None):
    logits = logits.clone().requires_grad_(True)
    student = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    loss, metrics = objective(TokenBatch(student, teacher, behavior, mask, old_logprobs=old))
    loss.backward()
    return loss, metrics, logits.grad


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_lightning_gradient_is_advantage_times_grad_logprob(clip_eps):
    logits, targets, teacher, behavior, mask = _tiny_lightning_case()
    loss, metrics, grad = _run(LightningOPD(clip_eps=clip_eps), logits, targets, teacher, behavior, mask)
    torch.testing.assert_close(
        grad, _hand_lightning_grad(logits, targets, teacher, mask), rtol=1e-10, atol=1e-12
    )
    student = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    log_ratio = (teacher - student)[mask > 0]
    assert metrics["log_ratio_mean"] == pytest.approx(log_ratio.mean().item())
    assert metrics["adv_mean"] == pytest.approx(log_ratio.mean().item())
    assert metrics["clip_frac"] == 0.0 and metrics["tokens"] == 5
    # The value at ratio 1 is −Σ_b mean_t A_t.
    per_sample = [(teacher - student)[b][mask[b] > 0].mean() for b in range(2)]
    assert loss.item() == pytest.approx(-sum(per_sample).item())


def test_lightning_importance_weight_is_truncated_and_detached():
    logits, targets, teacher, behavior, mask = _tiny_lightning_case()
    objective = LightningOPD(importance_weighting=True, max_importance_weight=1.5)
    _, _, grad = _run(objective, logits, targets, teacher, behavior, mask)
    expected = _hand_lightning_grad(
        logits,
        targets,
        teacher,
        mask,
        weight_fn=lambda b, t, logp: min(math.exp(logp - behavior[b, t].item()), 1.5),
    )
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_lightning_ppo_clip_zeroes_the_gradient_only_on_the_pessimistic_side():
    logits, targets, teacher, behavior, mask = _tiny_lightning_case()
    student = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    ratios = torch.tensor([[1.5, 1.5, 0.5], [0.5, 1.1, 1.0]], dtype=D)
    old = student - torch.log(ratios)
    _, metrics, grad = _run(LightningOPD(clip_eps=0.2), logits, targets, teacher, behavior, mask, old=old)

    def ratio_adv(b, t, adv):
        r = ratios[b, t].item()
        clipped = (adv > 0 and r > 1.2) or (adv < 0 and r < 0.8)
        return 0.0 if clipped else adv * r

    torch.testing.assert_close(
        grad,
        _hand_lightning_grad(logits, targets, teacher, mask, ratio_adv=ratio_adv),
        rtol=1e-10,
        atol=1e-12,
    )
    advantages = (teacher - student)[mask > 0]
    ratio_valid = ratios[mask > 0]
    n_clipped = sum(
        int((a > 0 and r > 1.2) or (a < 0 and r < 0.8))
        for a, r in zip(advantages.tolist(), ratio_valid.tolist())
    )
    assert 0 < n_clipped < 5  # the case exercises both sides
    assert metrics["clip_frac"] == pytest.approx(n_clipped / 5)


def test_gradient_descent_raises_tokens_the_teacher_prefers():
    logits = torch.zeros(1, 1, 3, dtype=D)
    targets = torch.tensor([[1]])
    teacher = torch.tensor([[math.log(0.9)]], dtype=D)  # teacher likes the token more than the student
    _, _, grad = _run(LightningOPD(), logits, targets, teacher, teacher, torch.ones(1, 1, dtype=D))
    assert grad[0, 0, 1] < 0  # descent increases the target logit


def test_kl_student_teacher_estimate_is_unbiased_under_behaviour_samples():
    student = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=D), -1)
    teacher = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.0], dtype=D), -1)
    behavior = torch.log_softmax(torch.tensor([0.0, 0.5, 0.5, -0.3], dtype=D), -1)
    estimate = (behavior.exp() * _kl_student_teacher_estimate(student, teacher, behavior)).sum()
    exact = (student.exp() * (student - teacher)).sum()
    assert estimate.item() == pytest.approx(exact.item(), rel=1e-10)


# ------------------------------------------------------------------------------------------------
# OPD+: expected surrogate gradient against finite differences of the exact divergence


def _exact_divergence(theta, teacher_logp, divergence, alpha):
    log_pi = torch.log_softmax(theta, -1)
    return (log_pi.exp() * f_divergence_value(divergence, teacher_logp - log_pi, alpha)).sum()


def _expected_surrogate_grad(objective, theta, teacher_logp):
    """∇ Σ_y π_θ(y)·loss(y) with π_θ(y) held constant: the exact expectation of the sampled gradient."""
    theta = theta.clone().requires_grad_(True)
    log_pi = torch.log_softmax(theta, -1)
    total = 0.0
    for y in range(theta.shape[0]):
        student = log_pi[y].reshape(1, 1)
        batch = TokenBatch(
            student, teacher_logp[y].reshape(1, 1), student.detach(), torch.ones(1, 1, dtype=D)
        )
        loss, _ = objective(batch)
        total = total + log_pi[y].exp().detach() * loss
    total.backward()
    return theta.grad


def _finite_difference(fn, theta, eps=1e-6):
    grad = torch.zeros_like(theta)
    for i in range(theta.shape[0]):
        step = torch.zeros_like(theta)
        step[i] = eps
        grad[i] = (fn(theta + step) - fn(theta - step)) / (2 * eps)
    return grad


THETA = torch.tensor([0.4, -0.7, 1.1, 0.0, -0.2], dtype=D)
TEACHER = torch.log_softmax(torch.tensor([-0.3, 0.8, 0.5, -1.0, 0.6], dtype=D), -1)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_opd_plus_expected_gradient_is_the_divergence_gradient(divergence):
    alpha = 0.3
    fd = _finite_difference(lambda th: _exact_divergence(th, TEACHER, divergence, alpha), THETA)
    ours = _expected_surrogate_grad(FDivergenceOPD(divergence=divergence, alpha=alpha), THETA, TEACHER)
    # Σ_y π·w_f·∇log π equals −∇D_f; our loss is its negative, so its gradient is +∇D_f.
    torch.testing.assert_close(ours, fd, rtol=1e-6, atol=1e-8)


def test_stop_gradient_is_biased_except_for_reverse_kl():
    for divergence, unbiased in (("reverse_kl", True), ("forward_kl", False), ("jsd", False)):
        fd = _finite_difference(lambda th, d=divergence: _exact_divergence(th, TEACHER, d, 0.5), THETA)
        ours = _expected_surrogate_grad(
            FDivergenceOPD(divergence=divergence, stop_gradient=True), THETA, TEACHER
        )
        assert torch.allclose(ours, fd, rtol=1e-6, atol=1e-8) == unbiased, divergence


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_advantage_table_is_minus_f_plus_u_f_prime(divergence):
    u = torch.tensor([0.05, 0.3, 0.9, 1.7, 6.0], dtype=D, requires_grad=True)
    f = f_divergence_value(divergence, torch.log(u), 0.3)
    (f_prime,) = torch.autograd.grad(f.sum(), u)
    expected = -f + u * f_prime
    torch.testing.assert_close(opd_plus_advantage(divergence, torch.log(u), 0.3), expected.detach())


def test_opd_plus_clamps_log_u():
    student = torch.tensor([[-50.0, -0.1]], dtype=D, requires_grad=True)
    teacher = torch.tensor([[-0.1, -50.0]], dtype=D)
    _, metrics = FDivergenceOPD(divergence="forward_kl", log_u_clamp=6.0)(
        TokenBatch(student, teacher, student.detach(), torch.ones(1, 2, dtype=D))
    )
    assert metrics["adv_mean"] == pytest.approx((math.exp(6.0) + math.exp(-6.0)) / 2)


# ------------------------------------------------------------------------------------------------
# Top-k divergences against a naive loop


def _naive_topk(teacher_lp, student_lp, kind, tail, beta):
    """Per-position divergence with explicit Python sums (one position at a time)."""
    out = []
    for tp, sp in zip(teacher_lp.tolist(), student_lp.tolist()):
        p = [math.exp(v) for v in tp]
        q = [math.exp(v) for v in sp]
        if tail == "renormalize":
            p = [v / sum(p) for v in p]
            q = [v / sum(q) for v in q]
        else:
            p = p + [1.0 - sum(p)]
            q = q + [1.0 - sum(q)]

        def kl(a, b):
            return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

        if kind == "forward_kl":
            out.append(kl(p, q))
        elif kind == "reverse_kl":
            out.append(kl(q, p))
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
            out.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    return out


@pytest.mark.parametrize("tail", ["renormalize", "tail_bucket"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "gjsd"])
def test_topk_divergence_matches_naive(kind, tail):
    g = torch.Generator().manual_seed(3)
    full_teacher = torch.log_softmax(torch.randn(4, 9, generator=g, dtype=D) * 2, -1)
    full_student = torch.log_softmax(torch.randn(4, 9, generator=g, dtype=D), -1)
    ids = full_teacher.topk(3, dim=-1).indices
    teacher_lp, student_lp = full_teacher.gather(-1, ids), full_student.gather(-1, ids)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=D)
    student_leaf = student_lp.clone().requires_grad_(True)
    batch = TokenBatch(
        torch.zeros(1, 4, dtype=D),
        torch.zeros(1, 4, dtype=D),
        torch.zeros(1, 4, dtype=D),
        mask,
        teacher_topk_ids=ids[None],
        teacher_topk_logprobs=teacher_lp[None],
        student_topk_logprobs=student_leaf[None],
    )
    loss, metrics = TopKDivergence(kind=kind, tail=tail, beta=0.3)(batch)
    naive = _naive_topk(teacher_lp, student_lp, kind, tail, 0.3)
    assert loss.item() == pytest.approx((naive[0] + naive[1] + naive[3]) / 3, rel=1e-9)
    assert metrics["teacher_topk_mass"] == pytest.approx(teacher_lp.exp().sum(-1)[[0, 1, 3]].mean().item())

    # The gradient is that of the naive formula too (autograd through a plain torch re-expression).
    loss.backward()
    ref_leaf = student_lp.clone().requires_grad_(True)
    p, q = teacher_lp.exp(), ref_leaf.exp()
    if tail == "renormalize":
        p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    else:
        p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)
        q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)
    m = 0.3 * p + 0.7 * q
    div = {
        "forward_kl": (p * (p / q).log()).sum(-1),
        "reverse_kl": (q * (q / p).log()).sum(-1),
        "gjsd": 0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1),
    }[kind]
    (div[[0, 1, 3]].sum() / 3).backward()
    torch.testing.assert_close(student_leaf.grad, ref_leaf.grad * mask[0][:, None], rtol=1e-8, atol=1e-12)


def test_topk_objective_needs_topk_fields():
    assert TopKDivergence().needs_topk and not LightningOPD().needs_topk
    z = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="top-k"):
        TopKDivergence()(TokenBatch(z, z, z, torch.ones(1, 2)))


# ------------------------------------------------------------------------------------------------
# StableOPD: reference KL and Composite


@pytest.mark.parametrize("estimator", ["kl_theta_ref", "kl_ref_theta"])
def test_reference_kl_is_unbiased_in_value_and_gradient(estimator):
    ref = torch.log_softmax(torch.tensor([0.2, 1.0, -0.4, 0.3, -1.2], dtype=D), -1)

    def exact(theta):
        log_pi = torch.log_softmax(theta, -1)
        if estimator == "kl_theta_ref":
            return (log_pi.exp() * (log_pi - ref)).sum()
        return (ref.exp() * (ref - log_pi)).sum()

    theta = THETA.clone().requires_grad_(True)
    log_pi = torch.log_softmax(theta, -1)
    per_token = [
        reference_kl(log_pi[y].reshape(1, 1), ref[y].reshape(1, 1), torch.ones(1, 1), estimator)
        for y in range(5)
    ]
    assert all(v.item() >= 0 for v in per_token)  # each sampled term is itself >= 0
    expectation = sum(ref[y].exp() * per_token[y] for y in range(5))
    expectation.backward()
    assert expectation.item() == pytest.approx(exact(THETA).item(), rel=1e-10)
    torch.testing.assert_close(theta.grad, _finite_difference(exact, THETA), rtol=1e-6, atol=1e-8)


def test_composite_adds_reference_kl_and_gold_nll():
    g = torch.Generator().manual_seed(5)
    student = -torch.rand(2, 4, generator=g, dtype=D)
    teacher, behavior = -torch.rand(2, 4, generator=g, dtype=D), -torch.rand(2, 4, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=D)
    gold, gold_mask = -torch.rand(3, 5, generator=g, dtype=D), torch.ones(3, 5, dtype=D)
    batch = TokenBatch(student, teacher, behavior, mask, gold_logprobs=gold, gold_mask=gold_mask)
    objective = make_objective("lightning", ref_kl_coef=0.01, gold_nll_coef=0.1)
    assert isinstance(objective, Composite) and objective.needs_gold and not objective.needs_topk
    loss, metrics = objective(batch)
    base, _ = LightningOPD()(batch)
    expected = base + 0.01 * reference_kl(student, behavior, mask) + 0.1 * (-gold.mean(-1)).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert metrics["gold_nll"] == pytest.approx((-gold.mean(-1)).sum().item())
    with pytest.raises(ConfigError, match="gold"):
        objective(TokenBatch(student, teacher, behavior, mask))


def test_make_objective_registry_and_validation():
    assert isinstance(make_objective("lightning"), LightningOPD)
    assert make_objective("opd_plus", divergence="jsd").divergence == "jsd"
    assert make_objective("topk", kind="gjsd", beta=0.2, tail="renormalize").needs_topk
    with pytest.raises(ConfigError, match="'nope'"):
        make_objective("nope")
    with pytest.raises(ConfigError, match="bogus"):
        make_objective("lightning", bogus=1)
    with pytest.raises(ConfigError, match="got 1.5"):
        LightningOPD(clip_eps=1.5)
    with pytest.raises(ConfigError, match="got 'chi2'"):
        FDivergenceOPD(divergence="chi2")
    with pytest.raises(ConfigError, match="got 'avg'"):
        TopKDivergence(sample_reduction="avg")


# ------------------------------------------------------------------------------------------------
# NaN safety on extreme inputs

OBJECTIVES = [
    LightningOPD(),
    LightningOPD(clip_eps=0.2, importance_weighting=True, sample_reduction="mean"),
    *[FDivergenceOPD(divergence=d, importance_weighting=True) for d in DIVERGENCES],
    FDivergenceOPD(divergence="forward_kl", stop_gradient=True, clip_eps=0.2),
    *[
        TopKDivergence(kind=k, tail=t)
        for k in ("forward_kl", "reverse_kl", "gjsd")
        for t in ("renormalize", "tail_bucket")
    ],
    Composite(LightningOPD(), ref_kl_coef=0.1, gold_nll_coef=0.1),
    Composite(TopKDivergence(), ref_kl_coef=0.1, ref_kl_estimator="kl_ref_theta"),
]


def _extreme_batch():
    inf, nan = float("inf"), float("nan")
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.float32)
    student = torch.tensor([[-1e4, -0.5, 0.0, -inf], [-inf, nan, -inf, -inf], [-3.0, -inf, -1e4, -1e-7]])
    teacher = torch.tensor([[-0.1, -1e4, -1e4, -inf], [nan, -inf, -inf, -inf], [-1e4, nan, -0.2, -1e4]])
    behavior = torch.tensor([[-1e4, -0.1, -1e4, -inf], [-inf, -inf, -inf, nan], [0.0, -inf, -2.0, -1e4]])
    topk_t = torch.tensor([-1e-6, -1e4, -1e4])[None, None].expand(3, 4, 3).clone()
    topk_t[0, 3] = -inf
    topk_t[1] = nan
    topk_s = torch.full((3, 4, 3), -1e4)
    topk_s[0, 1] = torch.tensor([0.0, -inf, -inf])
    topk_s[1] = -inf
    gold = torch.tensor([[-1e4, -inf], [-inf, -inf]])
    gold_mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    leaves = [t.clone().requires_grad_(True) for t in (student, topk_s, gold)]
    batch = TokenBatch(
        leaves[0],
        teacher,
        behavior,
        mask,
        old_logprobs=behavior,
        teacher_topk_ids=torch.zeros(3, 4, 3, dtype=torch.long),
        teacher_topk_logprobs=topk_t,
        student_topk_logprobs=leaves[1],
        gold_logprobs=leaves[2],
        gold_mask=gold_mask,
    )
    return batch, leaves


@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: repr(o)[:60])
def test_objectives_are_nan_free_on_extreme_inputs(objective):
    batch, leaves = _extreme_batch()
    loss, metrics = objective(batch)
    loss.backward()
    assert torch.isfinite(loss), loss
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    for leaf in leaves:
        assert leaf.grad is None or torch.isfinite(leaf.grad).all(), leaf.grad
    # The all-masked row gets no gradient at all.
    assert leaves[0].grad is None or torch.all(leaves[0].grad[1] == 0)


@pytest.mark.parametrize("objective", OBJECTIVES[:3] + OBJECTIVES[-2:], ids=lambda o: repr(o)[:60])
def test_an_all_masked_batch_gives_zero_loss(objective):
    batch, leaves = _extreme_batch()
    batch.mask = torch.zeros_like(batch.mask)
    batch.gold_mask = torch.zeros_like(batch.gold_mask)
    loss, metrics = objective(batch)
    loss.backward()
    assert loss.item() == 0.0 and metrics["tokens"] == 0
    assert leaves[0].grad is None or torch.all(leaves[0].grad == 0)
