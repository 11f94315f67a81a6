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

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from lightning_opd.config import check
from lightning_opd.errors import InputError
from lightning_opd.evaluation import diagnostics
from lightning_opd.evaluation.verifiers import VERIFIERS, resolve_verifier
from lightning_opd.prompts import PromptRecord, encode_prompt
from lightning_opd.scoring import score_sequences
from lightning_opd.stage1.rollout import Rollout, SamplingConfig, TransformersSampler
from lightning_opd.stage2.runs import format_status, timer
from lightning_opd.stage2.step import UpdateInputs, accumulate_gradients, apply_update

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
        row = r.store_row(
            teacher_logprobs=s.logprobs.tolist(),
            reward=None if rewards is None else rewards[i],
            response_text=r.response_text,
        )
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
# One online step: sample, score, update


@dataclass
class OnlineSession:
    """What every online step uses: the models, the encoded prompts, the update settings."""

    config: Any  # pipelines/train_online.OnlineConfig
    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module
    teacher: torch.nn.Module
    reference: torch.nn.Module | None  # frozen initial student (StableOPD's pi_ref), when ref_kl_coef > 0
    tokenizer: object
    records: list
    encoded: list[list[int]]
    inputs: UpdateInputs
    writer: Any  # a StoreWriter, or None

    @cached_property
    def answers(self) -> dict:
        return {r.prompt_id: r.answer for r in self.records}

    @cached_property
    def verifier(self) -> str:
        return resolve_verifier(self.config.verifier, self.records)


def online_step(session: OnlineSession, step: int) -> dict:
    """Sample with the current student, score with the live teacher (and pi_ref), accumulate gradients."""
    config, model, writer = session.config, session.model, session.writer
    t0 = timer()
    sampling = config.sampling(step)
    chosen = prompt_batch(len(session.records), config.prompts_per_step, step, config.seed)
    keys = [session.records[i].prompt_id for i in chosen]
    prompt_ids = [session.encoded[i] for i in chosen]
    rollouts = sample_rollouts(
        session.accelerator.unwrap_model(model), session.tokenizer, prompt_ids, keys, sampling
    )
    t1 = timer()
    prompts, responses = [r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts]
    score = dict(
        topk=config.topk, max_tokens_per_batch=config.max_tokens_per_batch, chunk_size=config.chunk_size
    )
    teacher_scores = score_sequences(session.teacher, prompts, responses, **score)
    t2 = timer()
    ref_scores = None
    if session.reference is not None:
        ref_scores = score_sequences(session.reference, prompts, responses, **{**score, "topk": 0})
    t3 = timer()
    rewards = grade(rollouts, session.answers, session.verifier)
    rows = rollout_rows(rollouts, teacher_scores, topk=config.topk, ref_scores=ref_scores, rewards=rewards)
    if writer is not None and step not in writer.committed_parts([step], checksum=False):
        writer.write_part(step, [{k: v for k, v in r.items() if k != "ref_logprobs"} for r in rows])
    t4 = timer()
    stats = accumulate_gradients(model, rows, session.inputs, step=step + 1, accelerator=session.accelerator)
    t5 = timer()
    return {
        **{k: v for k, v in stats.items() if k not in ("loss", "tokens", "response_tokens")},
        **rollout_diagnostics(rollouts, rewards),
        "step": step + 1,
        "horizon": sampling.max_new_tokens,
        "loss": stats["loss"],
        "tokens": stats["tokens"],
        "response_tokens": stats["response_tokens"],
        "rollouts": len(rollouts),
        "sample_s": t1 - t0,
        "score_s": t2 - t1,
        "ref_score_s": t3 - t2,
        "store_s": t4 - t3,
        "update_s": t5 - t4,  # the optimizer step is added in optimizer_step
    }


def optimizer_step(accelerator, model, optimizer, scheduler, config, step: int, row: dict) -> None:
    t0 = timer()
    row.update(apply_update(accelerator, model, optimizer, scheduler, config.grad_clip, step))
    row["update_s"] += timer() - t0
    row["step_time_s"] = (
        row["sample_s"] + row["score_s"] + row["ref_score_s"] + row["store_s"] + row["update_s"]
    )
    row["tokens_per_s"] = row["tokens"] / row["step_time_s"]


def status_line(row: dict) -> str:
    parts = [
        format_status({k: v for k, v in row.items() if not k.startswith("eval_")}),
        f"sample {row['sample_s']:.2f}s score {row['score_s'] + row['ref_score_s']:.2f}s update {row['update_s']:.2f}s",
        f"trunc {100 * row['trunc_rate']:.0f}% rep {100 * row['rep_rate']:.0f}%",
    ]
    if "train_reward" in row:
        parts.append(f"reward {100 * row['train_reward']:.0f}%")
    if "eval_accuracy" in row:
        parts.append(f"eval {100 * row['eval_accuracy']:.1f}% (trunc {100 * row['eval_trunc_rate']:.0f}%)")
    return " | ".join(parts)


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
    "OnlineSession",
    "online_step",
    "optimizer_step",
    "status_line",
    "evaluate_greedy",
    "prompt_batch",
    "rollout_diagnostics",
    "rollout_rows",
    "sample_rollouts",
]
