"""StableOPD's gold-solution mixture (METHODS §5), shared by offline and online training: gold worked
solutions join each micro-batch, one per prompt per step, and their NLL is added to the loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from lightning_opd.errors import InputError
from lightning_opd.prompts import PromptRecord, load_prompts
from lightning_opd.stage2.batch import collate, student_token_batch
from lightning_opd.stage2.objectives import TokenBatch


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
    token_batch: TokenBatch, model, gold_rows: list[dict], pad_id: int, chunk_size: int, *, filler: dict
) -> TokenBatch:
    """``token_batch`` plus the student's log-probs of ``gold_rows`` (whole solutions: no horizon cut).

    The gold forward runs in every micro-batch, also when all its prompts got their gold row earlier
    in the step: then it scores one token of ``filler`` (a row of the micro-batch) with a zero gold
    mask. Under FSDP2 every forward is a collective (the layers' all-gathers); a process that skipped
    it while another ran it would hang both. The filler adds exactly zero to the loss and gradient.
    """
    device = token_batch.mask.device
    if gold_rows:
        longest = max(len(r["response_ids"]) for r in gold_rows)
        gold = collate(gold_rows, longest, pad_id).to(device)
    else:
        row = {**filler, "response_ids": filler["response_ids"][:1]}
        row.update(teacher_logprobs=[0.0], behavior_logprobs=[0.0])
        gold = collate([row], 1, pad_id).to(device)
    scored = student_token_batch(model, gold, needs_topk=False, chunk_size=chunk_size)
    mask = gold.mask if gold_rows else torch.zeros_like(gold.mask)
    return dataclasses.replace(token_batch, gold_logprobs=scored.student_logprobs, gold_mask=mask)
