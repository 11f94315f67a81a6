"""Online OPD (METHODS.md §1) on the objective code of offline training, and the StableOPD extras
(gold-solution mixture, reference KL, §5) that offline and online training share.

One online step: the *current* student samples (``TransformersSampler`` on the in-memory model; vLLM
loads weights from disk, so it cannot sample from weights that change every step), a live teacher
in the same process scores the sampled tokens (``score_sequences``), and the rollouts become rows of
the same shape as a store's, so ``trainer.collate`` / ``trainer.student_token_batch`` and the
objectives of ``lightning_opd.objectives`` run unchanged. The only online-specific inputs:

- the sampler's log-probs go in as ``behavior_logprobs`` *and* ``old_logprobs``: the surrogate is
  −A_t·exp(log π_θ − log π_samp). With one update per batch the ratio is 1 (up to kernel rounding,
  logged as ``sampler_logprob_gap``), but it stays explicit, as in METHODS §1;
- StableOPD's π_ref is the *initial* student, no longer the sampler: a frozen copy scores the sampled
  tokens and ``on_policy_reference_kl`` (not ``objectives.reference_kl``, whose estimator assumes the
  tokens were drawn from π_ref) gives the KL term.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_opd import diagnostics
from lightning_opd.config import check
from lightning_opd.errors import InputError
from lightning_opd.evaluation import VERIFIERS
from lightning_opd.objectives import MAX_LOG_RATIO, TokenBatch, clean, reduce_tokens
from lightning_opd.prompts import PromptRecord, encode_prompt, load_prompts
from lightning_opd.rollout import Rollout, SamplingConfig, TransformersSampler
from lightning_opd.trainer import check_finite, collate, student_token_batch

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
# StableOPD: KL to π_ref on on-policy tokens


def on_policy_reference_kl(
    student_logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, sample_reduction: str = "sum"
) -> Tensor:
    """Per-state KL(π_θ‖π_ref) from tokens sampled by π_θ itself (online StableOPD), reduced like the objectives.

    With log r = log π_θ(y_t) − log π_ref(y_t), y_t ∼ π_θ(·|s_t):

    - value: ``1/r − 1 + log r`` (Schulman's k3 with the roles that fit on-policy samples): ≥ 0 per
      token and unbiased, E_θ[π_ref/π_θ] = 1 and E_θ[log r] = KL(π_θ‖π_ref);
    - gradient: ``sg(log r)·∇log π_θ(y_t)``, unbiased for ∇KL(π_θ‖π_ref) at the state (score function:
      ∇Σ π_θ log r = E_θ[log r·∇log π_θ] + E_θ[∇log π_θ], and the last term is 0).

    This equals the offline estimator ``objectives.reference_kl`` importance-weighted by sg(π_ref/π_θ)
    (its expectation is over π_ref's tokens). Differentiating k3 directly would instead give the
    gradient of KL(π_ref‖π_θ); using the offline formula on on-policy tokens estimates neither.
    """
    valid = mask > 0
    student = clean(student_logprobs, valid)
    log_r = (student.detach() - clean(ref_logprobs, valid).detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    value = torch.expm1(-log_r) + log_r
    per_token = value + log_r * (student - student.detach())  # value k3, gradient log r · ∇log π_θ
    return reduce_tokens(per_token, mask, sample_reduction)


# ----------------------------------------------------------------------------------------------
# StableOPD: gold-solution mixture


class GoldSolutions:
    """Gold worked solutions by prompt_id, as token ids (``solution`` + EOS), for the NLL mixture.

    ``rows_for`` gives one gold row per prompt of a micro-batch, on the prompt ids the rollouts were
    sampled from (exactly what the student sees), skipping prompts already given this step: one gold
    solution per prompt in the same minibatch as its rollouts (METHODS §5).
    """

    def __init__(self, solutions: dict[str, list[int]], source: str):
        self.solutions = solutions
        self.source = source

    @classmethod
    def from_records(cls, records: Iterable[PromptRecord], tokenizer, source: str) -> GoldSolutions:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise InputError(
                "the tokenizer has no EOS token; gold solutions end with EOS (the model must stop)"
            )
        solutions = {
            r.prompt_id: tokenizer(r.solution, add_special_tokens=False)["input_ids"] + [eos]
            for r in records
            if r.solution
        }
        if not solutions:
            raise InputError(
                f"gold prompt set {source} has no 'solution' field in any row; give it worked solutions "
                "or set gold_nll_coef 0"
            )
        return cls(solutions, source)

    @classmethod
    def load(cls, path: str, tokenizer) -> GoldSolutions:
        return cls.from_records(load_prompts(path), tokenizer, path)

    def rows_for(self, rows: list[dict], seen: set[str]) -> list[dict]:
        out = []
        for row in rows:
            key = row["prompt_id"]
            if key in seen:
                continue
            if key not in self.solutions:
                raise InputError(
                    f"prompt {key!r} has no gold solution in {self.source}; pass a --gold-prompts set with a "
                    "'solution' for every training prompt (joined by prompt_id)"
                )
            seen.add(key)
            gold = self.solutions[key]
            zeros = [0.0] * len(gold)
            out.append(
                {
                    "prompt_id": key,
                    "sample_index": -1,
                    "prompt_ids": row["prompt_ids"],
                    "response_ids": gold,
                    "teacher_logprobs": zeros,
                    "behavior_logprobs": zeros,
                }
            )
        return out


def with_gold(
    token_batch: TokenBatch, model, gold_rows: list[dict], pad_id: int, chunk_size: int
) -> TokenBatch:
    """``token_batch`` plus the student's log-probs of ``gold_rows`` (whole solutions: no horizon cut)."""
    if not gold_rows:  # every prompt of this micro-batch got its gold row earlier in the step
        empty = token_batch.student_logprobs.new_zeros((0, 1))
        return dataclasses.replace(token_batch, gold_logprobs=empty, gold_mask=empty)
    device = token_batch.mask.device
    longest = max(len(r["response_ids"]) for r in gold_rows)
    gold = collate(gold_rows, longest, pad_id).to(device)
    scored = student_token_batch(model, gold, needs_topk=False, chunk_size=chunk_size)
    return dataclasses.replace(token_batch, gold_logprobs=scored.student_logprobs, gold_mask=gold.mask)


# ----------------------------------------------------------------------------------------------
# The update: one step's gradients, shared by online training and the benchmark


@dataclasses.dataclass
class UpdateInputs:
    """What ``accumulate_gradients`` needs besides the model and the rows."""

    objective: Any
    horizon: int
    pad_id: int
    topk: int | None = None
    micro_batch_size: int = 64
    chunk_size: int = 1024
    sample_reduction: str = "sum"
    ratio_to_sampler: bool = True  # online: old log-probs = the sampler's (importance ratio, METHODS §1)
    ref_kl_coef: float = 0.0  # online StableOPD: rows carry "ref_logprobs" from the frozen π_ref
    gold: GoldSolutions | None = None


def accumulate_gradients(
    model, rows: list[dict], inputs: UpdateInputs, *, step: int, accelerator=None
) -> dict:
    """Forward + backward over ``rows`` in micro-batches (gradients accumulate; no optimizer step).

    Returns the summed loss, token counts and the objective's metrics averaged over micro-batches by
    rows. The caller clips, steps and zeroes. ``step`` is 1-based, for error messages only.
    """
    device = next(model.parameters()).device
    micro = [rows[i : i + inputs.micro_batch_size] for i in range(0, len(rows), inputs.micro_batch_size)]
    totals: dict[str, float] = {}
    loss_sum, tokens, response_tokens, gap_sum = 0.0, 0, 0, 0.0
    seen_gold: set[str] = set()
    for j, chunk in enumerate(micro):
        batch = collate(chunk, inputs.horizon, inputs.pad_id, inputs.topk).to(device)
        sync = accelerator.no_sync(model) if accelerator is not None and j < len(micro) - 1 else _null()
        autocast = accelerator.autocast() if accelerator is not None else _null()
        with sync, autocast:
            token_batch = student_token_batch(
                model, batch, needs_topk=inputs.objective.needs_topk, chunk_size=inputs.chunk_size
            )
            if inputs.ratio_to_sampler:
                token_batch = dataclasses.replace(token_batch, old_logprobs=token_batch.behavior_logprobs)
            if inputs.gold is not None:
                gold_rows = inputs.gold.rows_for(chunk, seen_gold)
                token_batch = with_gold(token_batch, model, gold_rows, inputs.pad_id, inputs.chunk_size)
            loss, parts = inputs.objective(token_batch)
            if inputs.ref_kl_coef > 0:
                ref = collate(
                    _as_teacher(chunk, "ref_logprobs"), inputs.horizon, inputs.pad_id
                ).teacher_logprobs
                kl = on_policy_reference_kl(
                    token_batch.student_logprobs, ref.to(device), batch.mask, inputs.sample_reduction
                )
                loss = loss + inputs.ref_kl_coef * kl
                parts = {**parts, "ref_kl": kl.item()}
            if inputs.sample_reduction == "mean":
                loss = loss * len(chunk) / len(rows)  # mean over the whole batch, not per micro-batch
            check_finite(loss, step, batch)
            (accelerator.backward if accelerator is not None else torch.Tensor.backward)(loss)
        valid = batch.mask > 0
        gap_sum += float((token_batch.student_logprobs.detach() - batch.behavior_logprobs)[valid].abs().sum())
        loss_sum += loss.item()
        tokens += int(batch.attention_mask.sum())
        response_tokens += batch.num_tokens
        for k, v in parts.items():
            if k != "tokens":
                totals[k] = totals.get(k, 0.0) + v * len(chunk) / len(rows)
    out = {**totals, "loss": loss_sum, "tokens": tokens, "response_tokens": response_tokens}
    if inputs.ratio_to_sampler:
        # ≈ 0 when the training forward reproduces the sampler (the ratio is then 1 as intended).
        out["sampler_logprob_gap"] = gap_sum / max(1, response_tokens)
    return out


def _as_teacher(rows: list[dict], key: str) -> list[dict]:
    """Rows whose ``teacher_logprobs`` are ``key``: lets ``collate`` place any per-token column."""
    return [{**r, "teacher_logprobs": r[key]} for r in rows]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


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
    scores = grade(rollouts, {r.prompt_id: r.answer for r in records}, verifier)
    diag = rollout_diagnostics(rollouts)
    return {
        "accuracy": float(np.mean(scores)),
        "trunc_rate": diag["trunc_rate"],
        "rep_rate": diag["rep_rate"],
        "mean_response_tokens": diag["mean_response_tokens"],
    }


__all__ = [
    "GoldSolutions",
    "UpdateInputs",
    "accumulate_gradients",
    "evaluate_greedy",
    "on_policy_reference_kl",
    "prompt_batch",
    "rollout_diagnostics",
    "rollout_rows",
    "sample_rollouts",
    "with_gold",
]
