"""Verifiers: the generic math verifier on real answer styles, and no toy verifier by default."""

import threading
import time
import warnings

import pytest

from lightning_opd.errors import ConfigError
from lightning_opd.evaluation import verifiers
from lightning_opd.evaluation.verifiers import (
    VERIFIERS,
    grade_last_number,
    grade_math,
    infer_verifier,
    resolve_verifier,
)
from lightning_opd.prompts import PromptRecord


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
        # math-verify: fractions = decimals, thousands separators, units, intervals, sets
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("so x = 0.5", "\\frac{1}{2}"),
        ("\\boxed{3.14}", "3.14"),
        ("The answer is 1,000", "1000"),
        ("\\boxed{1,000}", "1000"),
        ("The side is 5 cm", "5"),
        ("\\boxed{5 \\text{ cm}}", "5"),
        ("\\boxed{[1, 3)}", "[1,3)"),
        ("\\boxed{\\{1, 2, 3\\}}", "\\{3,2,1\\}"),
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
        ("\\boxed{(1, 3]}", "[1,3)"),  # another interval
        ("\\boxed{0.49}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{", "1"),  # unparseable: 0, no exception
        ("asdf \\boxed{)(} \\sqrt{{", "1"),
    ],
)
def test_math_verifier_rejects_wrong_or_missing_answers(response, reference):
    assert grade_math(response, reference) == 0.0


def test_last_number_keeps_its_plain_rule():
    assert grade_last_number("1, 2 and 3,000", "3000") == 1.0
    assert grade_last_number("\\boxed{\\frac{1}{2}}", "0.5") == 0.0  # no LaTeX: use `math` for that


def _slow_grade(response, reference):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # pure Python, like SymPy stuck on a power tower
        pass
    return 1.0


def test_a_pathological_answer_is_given_up_on_at_the_timeout(monkeypatch):
    monkeypatch.setattr(verifiers, "_grade_math_unbounded", _slow_grade)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="gave up on an answer after 0.5 s"):
        assert grade_math("\\boxed{9^{9^{9^{9}}}}", "1", timeout_s=0.5) == 0.0
    assert time.monotonic() - start < 5
    # the alarm is gone and the grader works again
    monkeypatch.undo()
    assert grade_math("\\boxed{2}", "2", timeout_s=0.5) == 1.0


def test_the_timeout_also_holds_outside_the_main_thread(monkeypatch):
    # signals reach only the main thread (math-verify's own timeout refuses to run elsewhere)
    monkeypatch.setattr(verifiers, "_grade_math_unbounded", _slow_grade)
    results = []
    worker = threading.Thread(target=lambda: results.append(grade_math("x", "1", timeout_s=0.5)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        worker.start()
        worker.join(10)
    assert results == [0.0]
    monkeypatch.undo()
    worker = threading.Thread(target=lambda: results.append(grade_math("\\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join(10)
    assert results == [0.0, 1.0]


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
    import lightning_opd.evaluation.accuracy as evaluation
    from lightning_opd.prompts import write_jsonl
    from lightning_opd.stage1.rollout import Rollout
    from pipelines import evaluate

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl([{"prompt_id": "a", "prompt": "What is 1+2? Answer in a box.", "answer": "3"}], prompts)
    seen = {}

    class Sampler:
        def sample(self, prompt_ids, keys, seed):
            return [Rollout(keys[0], 0, prompt_ids[0], [1, 2], [-0.1, -0.2], "stop", "It is \\boxed{3}.")]

        def close(self):  # eval shuts the engine down as soon as it has sampled
            seen["closed"] = True

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
    assert seen["tokenizer"] is not None and seen["closed"]
    assert result.greedy_accuracy == 1.0  # graded by the inferred generic verifier, not the toy's
