"""Accuracy of a model on a prompt set with a verifier: greedy accuracy and sampled pass@k."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from lightning_opd.evaluation.verifiers import VERIFIERS, resolve_verifier
from lightning_opd.prompts import PromptRecord, encode_prompt
from lightning_opd.stage1.rollout import Rollout, SamplingConfig
from lightning_opd.stage1.samplers import make_sampler


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@dataclass
class EvalResult:
    model: str
    num_prompts: int
    greedy_accuracy: float | None
    pass_at_k: dict[int, float]
    samples_per_prompt: int
    mean_response_tokens: float
    trunc_rate: float
    # What was actually run: the resolved verifier and the first prompt as the model saw it (after
    # any chat template), so a report shows that a real job did not fall back to the toy's defaults.
    verifier: str = ""
    prompt_example: str = ""

    def as_dict(self) -> dict:
        return {**self.__dict__, "pass_at_k": {str(k): v for k, v in self.pass_at_k.items()}}


def _sample(sampler, prompt_ids, keys, seed):
    """The sampler's rollouts, its engine shut down at once: a vLLM engine left to the interpreter's exit
    can abort it (status -6, "terminate called without an active exception") after the results printed."""
    try:
        return sampler.sample(prompt_ids, keys, seed)
    finally:
        sampler.close()


def grade_rollouts(rollouts: list[Rollout], answers: dict[str, str], verifier: str) -> list[float]:
    grade = VERIFIERS[verifier]
    return [grade(r.response_text, answers[r.prompt_id]) for r in rollouts]


def evaluate_model(
    model,
    tokenizer,
    records: list[PromptRecord],
    *,
    model_name: str,
    verifier: str = "auto",
    max_new_tokens: int = 64,
    greedy: bool = True,
    samples: int = 0,
    ks: tuple[int, ...] = (1,),
    temperature: float = 0.7,
    top_p: float = 0.9,
    batch_size: int = 256,
    seed: int = 0,
    backend: str = "transformers",
    chat_template: str = "auto",
) -> EvalResult:
    missing = [r.prompt_id for r in records if r.answer is None]
    if missing:
        from lightning_opd.errors import InputError

        raise InputError(
            f"evaluation needs a reference answer for every prompt; {len(missing)} have none (e.g. {missing[0]})"
        )
    answers = {r.prompt_id: r.answer for r in records}
    verifier = resolve_verifier(verifier, records)
    prompt_ids = [encode_prompt(tokenizer, r.prompt, chat_template) for r in records]
    keys = [r.prompt_id for r in records]
    greedy_acc, lengths, truncated = None, [], []
    if greedy:
        config = SamplingConfig(
            n=1,
            temperature=0.0,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            backend=backend,
        )
        rollouts = _sample(
            make_sampler(model, config, tokenizer=tokenizer, progress="eval greedy"), prompt_ids, keys, seed
        )
        scores = grade_rollouts(rollouts, answers, verifier)
        greedy_acc = sum(scores) / len(scores)
        lengths += [len(r.response_ids) for r in rollouts]
        truncated += [r.finish_reason == "length" for r in rollouts]
    passes: dict[int, float] = {}
    if samples:
        config = SamplingConfig(
            n=samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
            backend=backend,
        )
        sampler = make_sampler(model, config, tokenizer=tokenizer, progress=f"eval {samples} samples")
        rollouts = _sample(sampler, prompt_ids, keys, seed)
        correct: dict[str, int] = defaultdict(int)
        for r, s in zip(rollouts, grade_rollouts(rollouts, answers, verifier)):
            correct[r.prompt_id] += int(s)
        for k in ks:
            if k <= samples:
                passes[k] = sum(pass_at_k(samples, correct[key], k) for key in keys) / len(keys)
        lengths += [len(r.response_ids) for r in rollouts]
        truncated += [r.finish_reason == "length" for r in rollouts]
    return EvalResult(
        model=model_name,
        num_prompts=len(records),
        greedy_accuracy=greedy_acc,
        pass_at_k=passes,
        samples_per_prompt=samples,
        mean_response_tokens=sum(lengths) / max(1, len(lengths)),
        trunc_rate=sum(truncated) / max(1, len(truncated)),
        verifier=verifier,
        prompt_example=tokenizer.decode(prompt_ids[0]) if prompt_ids else "",
    )


def format_table(results: list[EvalResult]) -> str:
    ks = sorted({k for r in results for k in r.pass_at_k})
    header = ["model", "prompts", "greedy acc"] + [f"pass@{k}" for k in ks] + ["mean len", "trunc"]
    rows = [
        [r.model, str(r.num_prompts), "-" if r.greedy_accuracy is None else f"{100 * r.greedy_accuracy:.1f}%"]
        + [f"{100 * r.pass_at_k[k]:.1f}%" if k in r.pass_at_k else "-" for k in ks]
        + [f"{r.mean_response_tokens:.1f}", f"{100 * r.trunc_rate:.1f}%"]
        for r in results
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(x.ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
