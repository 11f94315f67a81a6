"""Online OPD: the on-policy ref-KL estimator, the prompt schedule, gold solutions, the explicit
importance ratio, and `lopd train-online` end to end (metrics, store, provenance, gate, resume)."""

import json

import pytest
import torch
from conftest import run_lopd
from transformers import AutoModelForCausalLM

from lightning_opd.errors import InputError
from lightning_opd.models.fingerprint import model_fingerprint
from lightning_opd.models.provenance import read_provenance
from lightning_opd.prompts import PromptRecord
from lightning_opd.stage2 import online
from lightning_opd.stage2.batch import collate, student_token_batch
from lightning_opd.stage2.gold import GoldSolutions, with_gold
from lightning_opd.stage2.objectives import TokenBatch, make_objective, on_policy_reference_kl, reference_kl
from lightning_opd.stage2.online import prompt_batch
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients
from lightning_opd.store import open_store
from lightning_opd.toy.tokenizer import build_char_tokenizer
from pipelines import train_online
from storage_schemas import logprob_store_v1 as fmt

QUIET = dict(log=lambda *_: None)


# ----------------------------------------------------------------------------------------------
# The on-policy reference-KL estimator, checked by exact enumeration on a tiny vocabulary


def _expected_over_samples(estimator, theta, ref_logp):
    """E_{y~pi_theta}[value] and E_{y~pi_theta}[grad of the per-sample loss], enumerating y."""
    logp = torch.log_softmax(theta, -1)
    value, grad = 0.0, torch.zeros_like(theta)
    for y in range(theta.numel()):
        mask = torch.ones(1, 1)
        loss = estimator(logp[y].view(1, 1), ref_logp[y].view(1, 1), mask)
        (g,) = torch.autograd.grad(loss, theta, retain_graph=True)
        p = logp[y].exp().item()
        value += p * loss.item()
        grad += p * g
    return value, grad


def test_on_policy_reference_kl_is_unbiased_for_kl_theta_ref_and_its_gradient():
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(6), -1)
    exact = (torch.softmax(theta, -1) * (torch.log_softmax(theta, -1) - ref_logp)).sum()
    (exact_grad,) = torch.autograd.grad(exact, theta)

    value, grad = _expected_over_samples(on_policy_reference_kl, theta, ref_logp)
    assert value == pytest.approx(exact.item(), rel=1e-5)
    assert torch.allclose(grad, exact_grad, atol=1e-6)

    # The offline estimator assumes the tokens came from pi_ref: on pi_theta's own tokens it is wrong.
    offline = lambda s, r, m: reference_kl(s, r, m, "kl_theta_ref")  # noqa: E731
    bad_value, bad_grad = _expected_over_samples(offline, theta, ref_logp)
    assert abs(bad_value - exact.item()) > 1e-2 and not torch.allclose(bad_grad, exact_grad, atol=1e-3)


def test_on_policy_reference_kl_is_zero_at_the_reference_and_ignores_masked_garbage():
    lp = torch.tensor([[-1.0, -2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kl = on_policy_reference_kl(lp, torch.tensor([[-1.0, -2.0, float("-inf")]]), mask)
    kl.backward()
    assert kl.item() == pytest.approx(0.0, abs=1e-7) and torch.isfinite(lp.grad).all()


# ----------------------------------------------------------------------------------------------
# Prompt schedule and gold solutions


def test_prompt_batch_covers_an_epoch_without_repeats_and_is_deterministic():
    steps = [prompt_batch(10, 3, k, seed=7) for k in range(3)]  # 3 steps per epoch, 1 prompt left over
    flat = [i for s in steps for i in s]
    assert len(set(flat)) == 9 and all(len(s) == 3 for s in steps)
    assert prompt_batch(10, 3, 1, seed=7) == steps[1] and prompt_batch(10, 3, 3, seed=7) != steps[0]
    assert prompt_batch(10, 3, 0, seed=8) != steps[0]


def _gold():
    tokenizer = build_char_tokenizer()
    records = [PromptRecord("a", "1+2=", "3", "1+2+0=03;3"), PromptRecord("b", "2+2=", "4")]
    return tokenizer, GoldSolutions.from_records(records, tokenizer, "test")


def test_gold_rows_are_solution_plus_eos_on_the_rollout_prompt_once_per_prompt():
    tokenizer, gold = _gold()
    rows = [{"prompt_id": "a", "prompt_ids": [9, 9]}, {"prompt_id": "a", "prompt_ids": [9, 9]}]
    seen: set[str] = set()
    out = gold.rows_for(rows, seen)
    assert len(out) == 1 and out[0]["prompt_ids"] == [9, 9]
    assert out[0]["response_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(out[0]["response_ids"][:-1]) == "1+2+0=03;3"
    assert gold.rows_for(rows, seen) == []  # already given this step
    with pytest.raises(InputError, match="'b' has no gold solution"):
        gold.rows_for([{"prompt_id": "b", "prompt_ids": [9]}], set())


def test_with_gold_gives_the_students_log_probs_of_the_whole_solution(micro_student_dir):
    tokenizer, gold = _gold()
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    rows = [{"prompt_id": "a", "prompt_ids": tokenizer("1+2=")["input_ids"]}]
    empty = TokenBatch(*(torch.zeros(1, 1) for _ in range(4)))
    seen = set()
    batch = with_gold(empty, model, gold.rows_for(rows, seen), tokenizer.pad_token_id, 4, filler=ROLLOUT)
    ids = rows[0]["prompt_ids"] + gold.solutions["a"]
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    naive = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(rows[0]["prompt_ids"]) - 1 :]
    got = batch.gold_logprobs[batch.gold_mask > 0]
    assert got.shape == naive.shape and torch.allclose(got, naive, atol=1e-5)

    # The prompt got its gold row this step: the gold forward still runs (every process runs the same
    # forwards under FSDP2), on one token of a rollout, and adds nothing.
    again = with_gold(empty, model, gold.rows_for(rows, seen), tokenizer.pad_token_id, 4, filler=ROLLOUT)
    assert again.gold_logprobs.shape[0] == 1 and again.gold_logprobs.requires_grad
    assert not again.gold_mask.any()


ROLLOUT = {"prompt_id": "a", "sample_index": 0, "prompt_ids": [5, 6], "response_ids": [7, 8, 9]}


# ----------------------------------------------------------------------------------------------
# The importance ratio to the sampler is live, not a constant


def test_ratio_to_sampler_log_probs_scales_the_gradient(micro_student_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    row = {"prompt_id": "p", "sample_index": 0, "prompt_ids": [5, 6], "response_ids": [7, 8, 9]}
    with torch.no_grad():
        current = student_token_batch(
            model,
            collate([{**row, "teacher_logprobs": [0.0] * 3, "behavior_logprobs": [0.0] * 3}], 8, 0),
            needs_topk=False,
            chunk_size=8,
        )
    lp = current.student_logprobs[current.mask > 0].tolist()
    teacher = [x + 1.0 for x in lp]

    def grads(behavior, ratio):
        model.zero_grad()
        inputs = UpdateInputs(make_objective("lightning"), horizon=8, pad_id=0, ratio_to_sampler=ratio)
        accumulate_gradients(
            model, [{**row, "teacher_logprobs": teacher, "behavior_logprobs": behavior}], inputs, step=1
        )
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    on_policy = grads(lp, ratio=True)  # sampler = current model: ratio 1
    assert torch.allclose(on_policy, grads(lp, ratio=False), atol=1e-6)
    stale = grads([x + 0.6931471805599453 for x in lp], ratio=True)  # sampler twice as likely: ratio 1/2
    assert torch.allclose(stale, 0.5 * on_policy, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# `lopd train-online` end to end


def online_args(student, teacher, prompts, out, *extra):
    return [
        "train-online",
        "--student", student, "--teacher", teacher, "--prompts", prompts, "--out", out,
        "--steps", 3, "--prompts-per-step", 3, "--n", 2, "--max-new-tokens", 6,
        "--lr", "1e-3", "--micro-batch-size", 4, *extra,
    ]  # fmt: skip


def test_train_online_end_to_end_through_the_cli(sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path):
    out, store = tmp_path / "online", tmp_path / "online-store"
    result = run_lopd(
        *online_args(sft_student_dir, micro_teacher_dir, opd_prompts, out),
        "--eval-prompts", opd_prompts, "--eval-every", 3, "--eval-limit", 4,
        "--ref-kl-coef", 0.01, "--gold-nll-coef", 0.1, "--write-store", store,
    )  # fmt: skip
    assert "in process" in result.stdout and "step 3" in result.stdout and "sample" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["rollouts"] == 6 for r in rows)
    for r in rows:
        assert all(
            r[k] >= 0 for k in ("sample_s", "score_s", "ref_score_s", "update_s", "trunc_rate", "rep_rate")
        )
        assert torch.isfinite(torch.tensor([r["loss"], r["gold_nll"], r["ref_kl"], r["grad_norm"]])).all()
        assert r["sampler_logprob_gap"] < 1e-4  # the training forward reproduces the sampler: ratio 1
    assert rows[0]["ref_kl"] == pytest.approx(0.0, abs=1e-6)  # step 1 samples from pi_ref itself
    assert {"eval_accuracy", "eval_trunc_rate", "eval_rep_rate"} <= set(rows[-1])

    prov = read_provenance(out / "final")
    assert prov.stage == "online_opd" and prov.sft_teacher == read_provenance(sft_student_dir).sft_teacher
    assert prov.inputs["teacher"]["fingerprint"] == model_fingerprint(micro_teacher_dir)
    assert model_fingerprint(out / "final") != model_fingerprint(sft_student_dir)

    written = open_store(store)
    assert written.kind == "scored" and written.num_rows == 18 and written.manifest.num_parts == 3
    assert written.manifest.student["fingerprint"] == model_fingerprint(sft_student_dir)
    assert "online" in written.manifest.extra and prov.inputs["store"]["store_id"] == written.store_id
    # The online rollouts carry the sampling distribution's log-probs too (format 1.1).
    assert fmt.SAMPLING_COLUMN in written.columns
    assert written.manifest.sampling["sampling_logprobs"] == fmt.SAMPLING_LOGPROBS_MODE
    assert all(len(r[fmt.SAMPLING_COLUMN]) == len(r["response_ids"]) for r in written.iter_rows())


def test_train_online_refuses_a_teacher_that_is_not_the_sft_teacher(
    sft_student_dir, micro_student_dir, opd_prompts, tmp_path
):
    out = tmp_path / "refused"
    result = run_lopd(*online_args(sft_student_dir, micro_student_dir, opd_prompts, out), check=False)
    assert result.returncode == 2 and "not the student's SFT teacher" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_train_online_resumes_exactly_after_a_crash(
    sft_student_dir, micro_teacher_dir, opd_prompts, tmp_path, monkeypatch
):
    def config(out):
        return train_online.OnlineConfig(
            student=str(sft_student_dir), teacher=str(micro_teacher_dir), prompts=str(opd_prompts),
            out=str(out), steps=4, prompts_per_step=2, n=2, max_new_tokens=5, lr=1e-3, save_every=2,
        )  # fmt: skip

    losses = lambda out: [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    train_online.run(config(tmp_path / "straight"), **QUIET)
    real, calls = online.accumulate_gradients, {"n": 0}

    def crash_at_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "accumulate_gradients", crash_at_step_3)
    with pytest.raises(RuntimeError, match="injected crash"):
        train_online.run(config(tmp_path / "crashed"), **QUIET)
    monkeypatch.setattr(online, "accumulate_gradients", real)
    logs = []
    train_online.run(config(tmp_path / "crashed"), log=logs.append)
    assert any("resumed from" in line and "step 2" in line for line in logs)
    assert losses(tmp_path / "crashed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    assert model_fingerprint(tmp_path / "crashed" / "final") == model_fingerprint(
        tmp_path / "straight" / "final"
    )
