"""Token-budget micro-batches and padding-free packing (issue 20): the same per-token log-probs and
the same gradient as padded micro-batches, for every objective (top-k store included), on the toy and
on Gemma-3's architecture (sliding and global layers) with eager and sdpa attention."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import run_lopd
from test_scale import _gemma3

from lightning_opd import packing
from lightning_opd.packing import micro_batches, row_length
from lightning_opd.stage2.batch import collate, student_token_batch
from lightning_opd.stage2.objectives import make_objective
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients
from lightning_opd.toy.models import STUDENT_SPEC, build_model

K = 3


def _rows(n: int = 7, seed: int = 0) -> list[dict]:
    """Rows of very different lengths (1 to 14 response tokens), with a teacher top-k."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p, r = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 15, (1,), generator=g))
        rows.append(
            {
                "prompt_id": f"p{i % 3}", "sample_index": i,
                "prompt_ids": torch.randint(4, 20, (p,), generator=g).tolist(),
                "response_ids": torch.randint(4, 20, (r,), generator=g).tolist(),
                "teacher_logprobs": (-torch.rand(r, generator=g) * 3).tolist(),
                "behavior_logprobs": (-torch.rand(r, generator=g) * 3).tolist(),
                "teacher_topk_ids": torch.randint(4, 20, (r, K), generator=g).tolist(),
                "teacher_topk_logprobs": (-torch.rand(r, K, generator=g) * 4).tolist(),
            }
        )  # fmt: skip
    return rows


def _models(char_tokenizer):
    out = {"toy-sdpa": build_model(STUDENT_SPEC, char_tokenizer, seed=0)}
    for impl in ("eager", "sdpa"):  # window 4: rows longer than it exercise the sliding mask
        model = _gemma3(char_tokenizer)
        model.set_attn_implementation(impl)
        out[f"gemma3-{impl}"] = model
    return out


@pytest.mark.parametrize("arch", ["toy-sdpa", "gemma3-eager", "gemma3-sdpa"])
def test_packed_log_probs_equal_padded(char_tokenizer, arch):
    model = _models(char_tokenizer)[arch].eval()
    batch = collate(_rows(), 16, 0, topk=K)
    shapes = []
    model.model.register_forward_pre_hook(
        lambda _, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    with torch.no_grad():
        padded = student_token_batch(model, batch, needs_topk=True, chunk_size=8)
        packed = student_token_batch(model, batch, needs_topk=True, chunk_size=8, packed=True)
    assert shapes == [tuple(batch.input_ids.shape), (1, int(batch.attention_mask.sum()))]  # really packed
    assert padded.mask.sum() > 30
    torch.testing.assert_close(packed.student_logprobs, padded.student_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.student_topk_logprobs, padded.student_topk_logprobs, rtol=0, atol=1e-5)


OBJECTIVES = {
    "lightning": make_objective("lightning", clip_eps=0.2),
    "opd_plus": make_objective("opd_plus", divergence="jsd"),
    "topk": make_objective("topk"),
    "stableopd": make_objective("lightning", ref_kl_coef=0.1),
}


def _gradient(model, rows, objective, **kwargs):
    model = copy.deepcopy(model).train()
    kwargs = {"micro_batch_size": 3, **kwargs}
    inputs = UpdateInputs(objective=objective, horizon=10, pad_id=0, topk=K, **kwargs)
    stats = accumulate_gradients(model, rows, inputs, step=1)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("arch", ["toy-sdpa", "gemma3-eager", "gemma3-sdpa"])
def test_budgeted_and_packed_steps_give_the_padded_gradient(char_tokenizer, arch, objective):
    """Horizon 10 cuts some rows; budgets regroup the rows by length: loss and gradient unchanged."""
    model, rows = _models(char_tokenizer)[arch], _rows()
    want, stats = _gradient(model, rows, OBJECTIVES[objective])
    for kwargs in ({"packed": True}, {"max_tokens": 24}, {"max_tokens": 24, "packed": True}):
        got, got_stats = _gradient(model, rows, OBJECTIVES[objective], **kwargs)
        assert got.keys() == want.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=f"{kwargs} {name}")
        assert got_stats["loss"] == pytest.approx(stats["loss"], abs=1e-5)
        assert got_stats["tokens"] == stats["tokens"]
    assert got_stats["computed_tokens"] == stats["tokens"] < stats["computed_tokens"]  # packed: no padding


def test_micro_batches_by_token_budget():
    rows = _rows(12)
    lengths = [row_length(r, 10) for r in rows]
    fixed = micro_batches(rows, horizon=10, micro_batch_size=5)
    assert [len(m) for m in fixed] == [5, 5, 2] and sum(fixed, []) == rows
    for packed in (False, True):
        groups = micro_batches(rows, horizon=10, micro_batch_size=5, max_tokens=30, packed=packed)
        assert sorted(map(id, sum(groups, []))) == sorted(map(id, rows))  # every row once
        for g in groups:
            ls = [row_length(r, 10) for r in g]
            assert ls == sorted(ls, reverse=True)
            cost = sum(ls) if packed else len(ls) * max(ls)
            assert cost <= 30 or len(g) == 1
    assert max(lengths) <= 30


def test_a_row_longer_than_the_budget_gets_its_own_micro_batch_and_one_warning(monkeypatch):
    monkeypatch.setattr(packing, "_warned_long_rows", False)
    rows = _rows(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = micro_batches(rows, horizon=16, micro_batch_size=4, max_tokens=5, packed=True)
        micro_batches(rows, horizon=16, micro_batch_size=4, max_tokens=5, packed=True)
    longer = [r for r in rows if row_length(r, 16) > 5]
    assert longer and all([r] in groups for r in longer)
    assert len([w for w in caught if "longer than --max-tokens-per-micro-batch" in str(w.message)]) == 1


def test_train_with_budget_and_packing_end_to_end(sft_student_dir, micro_store, tmp_path):
    """Through the CLI: the same losses as padded micro-batches, fewer computed tokens."""
    base = ["train", "--student", sft_student_dir, "--stores", micro_store, "--steps", 2, "--batch-size", 5]
    base += ["--micro-batch-size", 2, "--lr", "1e-3"]
    run_lopd(*base, "--out", tmp_path / "padded")
    result = run_lopd(
        *base, "--out", tmp_path / "packed", "--pack", "--max-tokens-per-micro-batch", 40,
        "--attn-implementation", "eager",
    )  # fmt: skip
    assert "attention eager, packed micro-batches" in result.stdout
    padded, packed = ([json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                      for d in ("padded", "packed"))  # fmt: skip
    for a, b in zip(padded, packed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4) and b["tokens"] == a["tokens"]
        assert b["computed_tokens"] == b["tokens"] < a["computed_tokens"]


def test_packing_keeps_a_mistral_style_sliding_window(char_tokenizer):
    """No layer types, one window for every layer (Mistral): rows longer than it still match padding."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=len(char_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=3, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    batch = collate(_rows(), 16, 0)
    with torch.no_grad():
        padded = student_token_batch(model, batch, needs_topk=False, chunk_size=8)
        packed = student_token_batch(model, batch, needs_topk=False, chunk_size=8, packed=True)
    torch.testing.assert_close(packed.student_logprobs, padded.student_logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("objective", ["lightning", "opd_plus", "topk"])
def test_token_mean_metrics_do_not_depend_on_the_micro_batch_split(char_tokenizer, objective):
    """Issue 22: adv_mean and the other token means describe the batch, not its micro-batches."""
    from lightning_opd.stage2.objectives import TOKEN_MEAN_METRICS

    model, rows = _models(char_tokenizer)["toy-sdpa"], _rows()
    stats = [
        _gradient(model, rows, OBJECTIVES[objective], **kwargs)[1]
        for kwargs in (
            {},
            {"micro_batch_size": 1},
            {"micro_batch_size": 7},
            {"max_tokens": 20, "packed": True},
        )
    ]
    keys = TOKEN_MEAN_METRICS & set(stats[0])
    assert keys
    for other in stats[1:]:
        for key in keys:
            assert other[key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sample_reduced_metrics_add_up_like_the_loss_whatever_the_split(char_tokenizer, reduction):
    """Issue 22: base_loss and ref_kl describe the batch (they were averaged over micro-batches by rows,
    which halved a sum at two micro-batches), and base_loss + coefficient x ref_kl is the loss."""
    model, rows = _models(char_tokenizer)["toy-sdpa"], _rows()
    objective = make_objective("lightning", clip_eps=0.2, ref_kl_coef=0.1, sample_reduction=reduction)
    stats = [
        _gradient(model, rows, objective, sample_reduction=reduction, **kwargs)[1]
        for kwargs in ({}, {"micro_batch_size": 1}, {"micro_batch_size": 7}, {"max_tokens": 20})
    ]
    for s in stats:
        assert s["loss"] == pytest.approx(s["base_loss"] + 0.1 * s["ref_kl"], rel=1e-5)
        for key in ("base_loss", "ref_kl"):
            assert s[key] == pytest.approx(stats[0][key], rel=1e-5, abs=1e-7), key


def _sft_gradient(model, examples, **kwargs):
    from lightning_opd.stage0.sft import SFTTrainConfig, accumulate_sft_gradients

    model = copy.deepcopy(model).train()
    config = SFTTrainConfig(steps=2, warmup_steps=0, **kwargs)
    loss = accumulate_sft_gradients(model, examples, config, pad_id=0)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, loss


@pytest.mark.parametrize("arch", ["toy-sdpa", "gemma3-eager", "gemma3-sdpa"])
def test_sft_micro_batches_budgets_and_packing_give_the_whole_batch_gradient(char_tokenizer, arch):
    """Stage zero: accumulation, token budgets and packing leave the loss and the gradient unchanged."""
    from lightning_opd.stage0.sft import SFTExample

    model = _models(char_tokenizer)[arch]
    examples = [SFTExample(r["prompt_ids"], r["response_ids"]) for r in _rows()]
    want, loss = _sft_gradient(model, examples)
    for kwargs in (
        {"micro_batch_size": 2},
        {"pack": True},
        {"max_tokens_per_micro_batch": 24},
        {"max_tokens_per_micro_batch": 24, "pack": True},
    ):
        got, got_loss = _sft_gradient(model, examples, **kwargs)
        assert got_loss == pytest.approx(loss, rel=1e-5), kwargs
        assert got.keys() == want.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=f"{kwargs} {name}")


@pytest.mark.parametrize("arch", ["toy-sdpa", "gemma3-eager", "gemma3-sdpa"])
def test_packed_teacher_scoring_equals_padded(char_tokenizer, arch):
    """Stage one's transformers scorer: packed batches give the padded batches' log-probs and top-k."""
    from lightning_opd.scoring import plan_batches, score_sequences

    model = _models(char_tokenizer)[arch].eval()
    rows = _rows(9)
    prompts, responses = [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]
    responses[3] = []  # an empty response is scored as empty either way
    shapes = []
    model.model.register_forward_pre_hook(
        lambda _, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    padded = score_sequences(model, prompts, responses, topk=K, max_tokens_per_batch=40)
    n_padded = len(shapes)
    packed = score_sequences(model, prompts, responses, topk=K, max_tokens_per_batch=40, packed=True)
    assert all(
        s[0] == 1 for s in shapes[n_padded + 1 :]
    )  # one packed sequence per batch (after the head check)
    for a, b in zip(padded, packed):
        np.testing.assert_allclose(b.logprobs, a.logprobs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.topk_logprobs, a.topk_logprobs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(b.topk_ids, a.topk_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    assert len(plan_batches(lengths, 40, packed=True)) < len(plan_batches(lengths, 40))  # packing fits more
