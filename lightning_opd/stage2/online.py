"""Online OPD (METHODS.md §1): the pieces of an online step around the shared update
(``lightning_opd.stage2.step``): which prompts a step uses, the current student's rollouts as
store-shaped rows, their grading and diagnostics, and greedy evaluation.

One online step: the *current* student samples (``TransformersSampler`` on the in-memory model; vLLM
loads weights from disk, so it cannot sample from weights that change every step), a live teacher
in the same process scores the sampled tokens (``score_sequences``), and the rollouts become rows of
the same shape as a store's, so the update step of offline training runs unchanged. The only online-specific inputs:

- the sampler's log-probs go in as ``behavior_logprobs`` *and* ``old_logprobs``: the surrogate is
  −A_t·exp(log π_θ − log π_samp). With one update per batch the ratio is 1 (up to kernel rounding,
  logged as ``sampler_logprob_gap``), but it stays explicit, as in METHODS §1;
- StableOPD's π_ref is the *initial* student, no longer the sampler: a frozen copy scores the sampled
  tokens and ``on_policy_reference_kl`` (not ``objectives.reference_kl``, whose estimator assumes the
  tokens were drawn from π_ref) gives the KL term.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_opd import diagnostics
from lightning_opd.config import check
from lightning_opd.errors import InputError
from lightning_opd.prompts import PromptRecord, encode_prompt
from lightning_opd.stage1.rollout import Rollout, SamplingConfig, TransformersSampler
from lightning_opd.verifiers import VERIFIERS, resolve_verifier

# ----------------------------------------------------------------------------------------------
# Which prompts a step uses


def prompt_batch(num_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts of (0-based) ``step``: epochs of seeded permutations, cut into steps.

    The ``num_prompts % per_step`` prompts left at the end of an epoch's permutation are skipped that
    epoch (a different few each epoch), so a step never holds a prompt twice (prompt ids seed the
    samples and must be unique). A pure function of its arguments: a resumed run needs only the step.
    """
    check(1 <= per_step <= num_prompts, f"prompts per step must be in [1, {num_prompts}], got {per_step}")
    epoch, k = divmod(step, num_prompts // per_step)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    return [int(i) for i in order[k * per_step : (k + 1) * per_step]]


# ----------------------------------------------------------------------------------------------
# Rollouts -> rows shaped like a store's


def sample_rollouts(
    model, tokenizer, prompt_ids: list[list[int]], keys: list[str], sampling: SamplingConfig
) -> list[Rollout]:
    """The current in-memory student's rollouts (it is put back in train mode afterwards)."""
    was_training = model.training
    try:
        return TransformersSampler(model, tokenizer, sampling).sample(prompt_ids, keys, sampling.seed)
    finally:
        model.train(was_training)


def rollout_rows(
    rollouts: list[Rollout],
    teacher_scores: list,
    *,
    topk: int = 0,
    ref_scores: list | None = None,
    rewards: list[float | None] | None = None,
) -> list[dict[str, Any]]:
    """Store-shaped rows (the store's column names) from rollouts and their teacher scores."""
    rows = []
    for i, (r, s) in enumerate(zip(rollouts, teacher_scores)):
        row = {
            "prompt_id": r.prompt_id,
            "sample_index": r.sample_index,
            "prompt_ids": r.prompt_ids,
            "response_ids": r.response_ids,
            "behavior_logprobs": r.behavior_logprobs,
            "sampling_logprobs": r.sampling_logprobs,
            "teacher_logprobs": s.logprobs.tolist(),
            "finish_reason": r.finish_reason,
            "reward": None if rewards is None else rewards[i],
            "response_text": r.response_text,
        }
        if topk:
            row["teacher_topk_ids"] = s.topk_ids.tolist()
            row["teacher_topk_logprobs"] = s.topk_logprobs.tolist()
        if ref_scores is not None:
            row["ref_logprobs"] = ref_scores[i].logprobs.tolist()
        rows.append(row)
    return rows


def rollout_diagnostics(rollouts: list[Rollout], rewards: list[float | None] | None = None) -> dict:
    """StableOPD's health signals of one batch of rollouts (METHODS §5), plus length and reward."""
    out = {
        "trunc_rate": diagnostics.trunc_rate(r.finish_reason for r in rollouts),
        "rep_rate": diagnostics.rep_rate(r.response_text for r in rollouts),
        "mean_response_tokens": float(np.mean([len(r.response_ids) for r in rollouts])) if rollouts else 0.0,
    }
    graded = [x for x in (rewards or []) if x is not None]
    if graded:
        out["train_reward"] = float(np.mean(graded))
    return out


def grade(rollouts: list[Rollout], answers: dict[str, str | None], verifier: str) -> list[float | None]:
    verify = VERIFIERS[verifier]
    return [
        None if answers.get(r.prompt_id) is None else verify(r.response_text, answers[r.prompt_id])
        for r in rollouts
    ]


# ----------------------------------------------------------------------------------------------
# Evaluation with the rollout diagnostics


def evaluate_greedy(
    model,
    tokenizer,
    records: list[PromptRecord],
    *,
    verifier: str,
    max_new_tokens: int,
    chat_template: str = "auto",
    batch_size: int = 256,
) -> dict:
    """Greedy accuracy on ``records`` with TruncRate/RepRate of the same responses (StableOPD's signals)."""
    missing = [r.prompt_id for r in records if r.answer is None]
    if missing:
        raise InputError(f"evaluation needs a reference answer for every prompt; {missing[0]!r} has none")
    sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
    prompt_ids = [encode_prompt(tokenizer, r.prompt, chat_template) for r in records]
    rollouts = sample_rollouts(model, tokenizer, prompt_ids, [r.prompt_id for r in records], sampling)
    scores = grade(rollouts, {r.prompt_id: r.answer for r in records}, resolve_verifier(verifier, records))
    diag = rollout_diagnostics(rollouts)
    return {
        "accuracy": float(np.mean(scores)),
        "trunc_rate": diag["trunc_rate"],
        "rep_rate": diag["rep_rate"],
        "mean_response_tokens": diag["mean_response_tokens"],
    }


__all__ = [
    "evaluate_greedy",
    "prompt_batch",
    "rollout_diagnostics",
    "rollout_rows",
    "sample_rollouts",
]
