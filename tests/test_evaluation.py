"""Verifiers: the generic math verifier on real answer styles, and no toy verifier by default."""

import pytest

from lightning_opd.errors import ConfigError
from lightning_opd.prompts import PromptRecord
from lightning_opd.verifiers import (
    VERIFIERS,
    extract_final_answer,
    grade_math,
    infer_verifier,
    last_boxed,
    resolve_verifier,
)


@pytest.mark.parametrize(
    "response, reference",
    [
        ("So the answer is \\boxed{42}.", "42"),
        ("She has 18 apples left.\n#### 18", "18"),
        ("The total is $1,234.", "1234"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{3}{4}}", "3/4"),
        ("x = \\boxed{\\text{(B)}}", "(B)"),
        ("It costs 5.50 dollars", "5.5"),
        ("First 3, then 7, final: -2", "-2"),
        ("\\boxed{x^{2}+1}", "x^{2} + 1"),
        ("The answer is 10.", "\\boxed{10}"),
    ],
)
def test_math_verifier_accepts_right_answers(response, reference):
    assert grade_math(response, reference) == 1.0


@pytest.mark.parametrize(
    "response, reference",
    [
        ("So the answer is \\boxed{41}.", "42"),
        ("no number here", "42"),
        ("\\boxed{42} is wrong, it is \\boxed{43}", "42"),  # the last box counts
        ("42 apples then 7", "42"),  # the last number counts
        ("\\boxed{}", ""),
        ("\\boxed{x+1}", "x+2"),
    ],
)
def test_math_verifier_rejects_wrong_or_missing_answers(response, reference):
    assert grade_math(response, reference) == 0.0


def test_boxed_extraction_balances_braces():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None
    assert extract_final_answer("1, 2 and 3,000") == "3000"


def test_the_toy_verifier_is_used_only_for_the_toy():
    toy = [PromptRecord(prompt_id="a", prompt="12+34=", answer="46")]
    real = [PromptRecord(prompt_id="b", prompt="Tom has 3 apples and buys 4. How many?", answer="7")]
    assert infer_verifier(r.prompt for r in toy) == "addition"
    assert infer_verifier(r.prompt for r in toy + real) == "math"
    assert resolve_verifier("auto", real) == "math"
    assert resolve_verifier("last_number", toy) == "last_number"  # an explicit choice is kept
    # The toy verifier grades a real chat answer as wrong; the generic one as right.
    answer = "Tom buys 4 more, so he has 3 + 4 = 7 apples. The answer is \\boxed{7}."
    assert VERIFIERS["addition"](answer, "7") == 0.0 and VERIFIERS["math"](answer, "7") == 1.0
    with pytest.raises(ConfigError, match="verifier must be one of"):
        resolve_verifier("nope", real)


def test_no_job_defaults_to_the_toy_verifier():
    from pipelines.evaluate import EvalJobConfig
    from pipelines.precompute import PrecomputeConfig
    from pipelines.sft import SFTJobConfig
    from pipelines.train import TrainConfig
    from pipelines.train_online import OnlineConfig

    for cls in (EvalJobConfig, PrecomputeConfig, SFTJobConfig, TrainConfig, OnlineConfig):
        assert cls.__dataclass_fields__["verifier"].default == "auto", cls.__name__


# ----------------------------------------------------------------------------------------------
# `lopd eval --backend vllm`: the backend is chosen before any model is loaded


def test_eval_with_the_vllm_backend_hands_the_directory_to_the_sampler(
    micro_student_dir, tmp_path, monkeypatch
):
    import lightning_opd.evaluation as evaluation
    from lightning_opd.prompts import write_jsonl
    from lightning_opd.stage1.rollout import Rollout
    from pipelines import evaluate

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt_id": "a", "prompt": "What is 1+2? Answer in a box.", "answer": "3"}], prompts)
    seen = {}

    class Sampler:
        def sample(self, prompt_ids, keys, seed):
            return [Rollout(keys[0], 0, prompt_ids[0], [1, 2], [-0.1, -0.2], "stop", "It is \\boxed{3}.")]

    def make_sampler(model, config, tokenizer=None, **_):
        seen.update(model=model, backend=config.backend, tokenizer=tokenizer)
        return Sampler()

    def no_load(*args, **kwargs):
        raise AssertionError("the vLLM path must not load the model in this process")

    monkeypatch.setattr(evaluate, "resolve_backend", lambda backend, model_is_directory: "vllm")
    monkeypatch.setattr(evaluate, "load_causal_lm", no_load)
    monkeypatch.setattr(evaluation, "make_sampler", make_sampler)
    config = evaluate.EvalJobConfig(model=str(micro_student_dir), prompts=str(prompts), backend="vllm")
    result = evaluate.run(config, log=lambda *_: None)
    assert seen["model"] == str(micro_student_dir) and seen["backend"] == "vllm"
    assert seen["tokenizer"] is not None
    assert result.greedy_accuracy == 1.0  # graded by the inferred generic verifier, not the toy's
