"""Stage zero's early stop on held-out answers: the match kernel against a naive argmax, the stop itself,
and `lopd sft --holdout/--stop-at-match` through the command line."""

import json

import pytest
import torch
from conftest import run_lopd as lopd
from transformers import AutoModelForCausalLM

from lightning_opd.errors import ConfigError
from lightning_opd.models.provenance import read_provenance
from lightning_opd.prompts import write_jsonl
from lightning_opd.stage0.sft import SFTExample, SFTTrainConfig, teacher_forced_match, train_sft
from lightning_opd.toy.task import sample_problems, to_records


def _naive_match(model, examples) -> float:
    """One example at a time, full logits: does the argmax equal every response token?"""
    hits = 0
    for e in examples:
        seq = torch.tensor([e.prompt_ids + e.response_ids])
        logits = model(input_ids=seq).logits[0]
        start = len(e.prompt_ids)
        predicted = logits[start - 1 : start - 1 + len(e.response_ids)].argmax(-1)
        hits += int(predicted.tolist() == e.response_ids)
    return hits / len(examples)


def test_teacher_forced_match_equals_a_naive_argmax(micro_student_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir).eval()
    with torch.no_grad():
        examples = []
        for prompt in ([5, 6, 7], [5], [9, 9, 9, 9, 4]):
            # The model's own greedy continuation matches by construction; a changed token does not.
            seq = torch.tensor([prompt])
            own = model.generate(seq, max_new_tokens=4, do_sample=False)[0, len(prompt) :].tolist()
            examples.append(SFTExample(prompt, own))
            examples.append(SFTExample(prompt, own[:2] + [(own[2] + 1) % 20] + own[3:]))
    expected = _naive_match(model, examples)
    assert expected == 0.5
    # Batches of every size, with padding to the right of shorter examples.
    for batch_size in (1, 2, 4, 256):
        assert teacher_forced_match(model, examples, pad_id=0, batch_size=batch_size) == expected


def _memorisable(n: int) -> list[SFTExample]:
    return [SFTExample([5 + i % 3, 4], [8, 9, 2]) for i in range(n)]


def test_training_stops_at_the_first_check_that_reaches_the_target(micro_student_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    config = SFTTrainConfig(
        steps=300, batch_size=8, lr=1e-2, warmup_steps=1, stop_at_match=1.0, check_every=1
    )
    holdout, seen, lines = _memorisable(4), [], []

    def record(step):  # runs each step just before the stop check, on the same weights
        seen.append(teacher_forced_match(model, holdout, pad_id=0))

    history = train_sft(
        model,
        _memorisable(16),
        config,
        pad_id=0,
        holdout=holdout,
        log=lines.append,
        on_eval=record,
        eval_every=1,
    )
    last = history[-1]
    assert last["stopped_early"] and last["val_match"] == 1.0 and 1 < last["step"] < 300
    assert len(seen) == last["step"] and seen[-1] == 1.0 and max(seen[:-1]) < 1.0
    assert teacher_forced_match(model, holdout, pad_id=0) == 1.0
    assert any("reached the target 100%, stopping" in line for line in lines)


def test_a_target_not_reached_trains_every_step_and_says_so(micro_student_dir):
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    config = SFTTrainConfig(steps=2, batch_size=4, lr=1e-4, warmup_steps=1, stop_at_match=1.0)
    lines = []
    history = train_sft(model, _memorisable(8), config, pad_id=0, holdout=_memorisable(2), log=lines.append)
    assert history[-1]["step"] == 2 and not history[-1]["stopped_early"]
    assert any("was not reached" in line and "--stop-at-match" in line for line in lines)
    with pytest.raises(ConfigError, match="held-out examples"):
        train_sft(model, _memorisable(8), config, pad_id=0)
    with pytest.raises(ConfigError, match="stop_at_match must be in"):
        SFTTrainConfig(stop_at_match=1.5)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "sft.jsonl"
    write_jsonl(to_records(sample_problems("sft", 10, digits=(1, 2)), with_solution=True), path)
    return path


def _sft(teacher, student, prompts, out, *extra, check=True):
    args = ["--teacher", teacher, "--student", student, "--prompts", prompts, "--out", out]
    common = ["--steps", 3, "--batch-size", 4, "--max-new-tokens", 6, "--warmup-steps", 1]
    return lopd("sft", *args, *common, "--keep-truncated", "--backend", "transformers", *extra, check=check)


def test_lopd_sft_holds_out_answers_and_records_where_it_stopped(
    tmp_path, micro_teacher_dir, micro_student_dir, prompts
):
    out = tmp_path / "sft"
    result = _sft(micro_teacher_dir, micro_student_dir, prompts, out, "--holdout", 3, "--stop-at-match", 0.9)
    assert "held-out exact match" in result.stdout
    inputs = read_provenance(out).inputs
    assert inputs["num_examples"] == 7 and inputs["num_holdout"] == 3
    assert inputs["stopped"]["step"] == 3 and not inputs["stopped"]["stopped_early"]  # an untrained teacher
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_match" in metrics[-1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stop-at-match", 0.5], "needs --holdout"),
        (["--holdout", 10, "--stop-at-match", 0.5], "leaves nothing to train on"),
        (["--holdout", 2, "--stop-at-match", 2], "must be in [0, 1]"),
    ],
)
def test_lopd_sft_refuses_a_bad_early_stop(
    extra, message, tmp_path, micro_teacher_dir, micro_student_dir, prompts
):
    result = _sft(micro_teacher_dir, micro_student_dir, prompts, tmp_path / "out", *extra, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
