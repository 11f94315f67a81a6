"""The one training core of offline and online stage two: every objective option reaches the
objective object from the real command line of both trainers, and the same rows give the same
gradient through either trainer's update settings."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_opd.cli import build_parser
from lightning_opd.config import config_from_args
from lightning_opd.stage2.batch import collate, student_token_batch
from lightning_opd.stage2.flags import COMPOSITE_FLAGS, OBJECTIVE_FLAGS, TrainingFlags, objective_options
from lightning_opd.stage2.objectives import Composite
from lightning_opd.stage2.step import accumulate_gradients, update_inputs
from pipelines.train import TrainConfig
from pipelines.train_online import OnlineConfig

REQUIRED = {
    "train": ["--student", "s", "--stores", "st", "--out", "o"],
    "train-online": ["--student", "s", "--teacher", "t", "--prompts", "p", "--out", "o"],
}
CONFIGS = {"train": TrainConfig, "train-online": OnlineConfig}

# A non-default value for every flag that feeds an objective option.
VALUES = {
    "clip_eps": 0.2,
    "trust_region": 0.1,
    "importance_weighting": True,
    "max_importance_weight": 3.0,
    "sample_reduction": "mean",
    "divergence": "forward_kl",
    "alpha": 0.3,
    "stop_gradient": True,
    "log_u_clamp": 4.0,
    "topk_kind": "gjsd",
    "topk_beta": 0.3,
    "topk_tail": "tail_bucket",
    "ref_kl_coef": 0.01,
    "gold_nll_coef": 0.1,
    "ref_kl_estimator": "kl_ref_theta",
}


def _argv(command: str, objective: str, flags: dict) -> list[str]:
    argv = [command, *REQUIRED[command], "--objective", objective]
    if command == "train-online" and objective == "topk":
        argv += ["--topk", "4"]
    if flags.get("gold_nll_coef"):
        argv += ["--gold-prompts", "gold.jsonl"]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _config(argv: list[str]):
    args = build_parser(argv[0]).parse_args(argv)
    return config_from_args(CONFIGS[argv[0]], args)


def test_every_objective_option_has_a_flag():
    options = objective_options()
    assert set(OBJECTIVE_FLAGS) == set(options)
    for name, fields in options.items():
        assert set(OBJECTIVE_FLAGS[name]) == fields, f"objective {name}: an option without a flag"
    flag_names = {f for table in OBJECTIVE_FLAGS.values() for f in table.values()} | set(COMPOSITE_FLAGS)
    assert flag_names <= set(TrainingFlags.__dataclass_fields__)
    assert flag_names == set(VALUES)


@pytest.mark.parametrize("command", ["train", "train-online"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVE_FLAGS))
def test_every_objective_option_reaches_the_objective_from_the_command_line(command, objective):
    table = OBJECTIVE_FLAGS[objective]
    # --clip-eps and --trust-region are two clips of one ratio (refused together): one at a time.
    exclusive = [flag for flag in ("clip_eps", "trust_region") if flag in table.values()] or [None]
    for keep in exclusive:
        off = {flag: 0.0 for flag in ("clip_eps", "trust_region") if flag in table.values() and flag != keep}
        values = {flag: VALUES[flag] for flag in table.values()} | off
        built = _config(_argv(command, objective, values)).build_objective()
        for option, flag in table.items():
            expected = None if flag in off else VALUES[flag]
            assert getattr(built, option) == expected, f"{command} --{flag} did not reach {option}"


@pytest.mark.parametrize("command", ["train", "train-online"])
def test_stable_opd_options_reach_the_objective_or_the_update_step(command):
    composite = {f: VALUES[f] for f in COMPOSITE_FLAGS}
    config = _config(_argv(command, "lightning", composite))
    built = config.build_objective()
    assert isinstance(built, Composite) and built.gold_nll_coef == VALUES["gold_nll_coef"]
    inputs = update_inputs(config, built, horizon=8, pad_id=0, topk=None, gold=None)
    if command == "train":  # offline: the objective's estimator on the stored (π_ref) tokens
        assert built.ref_kl_coef == VALUES["ref_kl_coef"]
        assert built.ref_kl_estimator == VALUES["ref_kl_estimator"]
        assert inputs.ref_kl_coef == 0 and not inputs.ratio_to_sampler
    else:  # online: the on-policy estimator, added by the update step
        assert built.ref_kl_coef == 0
        assert inputs.ref_kl_coef == VALUES["ref_kl_coef"] and inputs.ratio_to_sampler


def test_offline_opd_plus_keeps_clip_and_importance_weighting():
    """The bug that started it: offline OPD+ dropped --clip-eps and --importance-weighting."""
    config = _config(
        [
            "train",
            *REQUIRED["train"],
            "--objective",
            "opd_plus",
            "--clip-eps",
            "0.2",
            "--trust-region",
            "0",  # lopd train defaults to a trust region, refused together with --clip-eps
            "--importance-weighting",
        ]
    )
    built = config.build_objective()
    assert built.clip_eps == 0.2 and built.importance_weighting


def test_offline_and_online_share_the_training_flags():
    """No flag is declared twice: beyond TrainingFlags, the two configs share only their inputs' names."""
    shared = set(TrainingFlags.__dataclass_fields__)
    offline_own = set(TrainConfig.__dataclass_fields__) - shared
    online_own = set(OnlineConfig.__dataclass_fields__) - shared
    assert offline_own & online_own == {"student", "out"}


@pytest.mark.parametrize("objective", ["lightning", "opd_plus"])
def test_same_rows_give_the_same_gradient_offline_and_online(micro_student_dir, objective):
    """Rows sampled by the current student (behaviour log-probs = its own): the offline and online
    trainers' update settings give the same gradient, clip and importance weight included."""
    model = AutoModelForCausalLM.from_pretrained(micro_student_dir)
    rows = [
        {"prompt_id": "p", "sample_index": 0, "prompt_ids": [5, 6], "response_ids": [7, 8, 9]},
        {"prompt_id": "q", "sample_index": 0, "prompt_ids": [5, 7, 9], "response_ids": [6, 6]},
        {"prompt_id": "r", "sample_index": 1, "prompt_ids": [8], "response_ids": [9, 5, 7, 6]},
    ]
    with torch.no_grad():
        zeros = [{**r, "teacher_logprobs": [0.0] * 4, "behavior_logprobs": [0.0] * 4} for r in rows]
        batch = collate(zeros, 8, 0)
        current = student_token_batch(model, batch, needs_topk=False, chunk_size=8).student_logprobs
    for i, r in enumerate(rows):
        lp = current[i][batch.mask[i] > 0].tolist()
        r["behavior_logprobs"] = lp
        r["teacher_logprobs"] = [x + 0.5 * (-1) ** t for t, x in enumerate(lp)]
    flags = [
        "--objective",
        objective,
        "--clip-eps",
        "0.2",
        "--trust-region",
        "0",  # the same update on both sides: lopd train's default trust region off
        "--importance-weighting",
        "--micro-batch-size",
        "2",
    ]

    def gradient(command):
        config = _config([command, *REQUIRED[command], *flags])
        copy_ = copy.deepcopy(model)
        inputs = update_inputs(config, config.build_objective(), horizon=8, pad_id=0, topk=None, gold=None)
        stats = accumulate_gradients(copy_, rows, inputs, step=1)
        return torch.cat([p.grad.flatten() for p in copy_.parameters() if p.grad is not None]), stats

    offline, offline_stats = gradient("train")
    online, online_stats = gradient("train-online")
    assert offline.abs().max() > 0
    assert torch.allclose(offline, online, atol=1e-6)
    assert offline_stats["loss"] == pytest.approx(online_stats["loss"], abs=1e-6)
    assert online_stats["sampler_logprob_gap"] < 1e-5


def test_flags_of_another_objective_are_warned_about_once_by_name():
    import warnings

    from lightning_opd.stage2.flags import warn_unused_objective_flags

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TrainConfig(student="s", stores="st", out="o")  # the defaults: nothing to say
        TrainConfig(student="s", stores="st", out="o", preset="esr")  # a preset switching objective: neither
        assert not caught, [str(w.message) for w in caught]
        config = TrainConfig(
            student="s",
            stores="st",
            out="o",
            objective="topk",
            clip_eps=0.2,
            trust_region=0,
            divergence="jsd",
        )
    messages = [str(w.message) for w in caught]
    assert (
        "--clip-eps applies to --objective lightning / opd_plus; it is ignored with --objective topk"
        in messages
    )
    assert "--divergence applies to --objective opd_plus; it is ignored with --objective topk" in messages
    assert len(messages) == 3  # clip-eps, trust-region, divergence: each once
    assert warn_unused_objective_flags(TrainConfig(student="s", stores="st", out="o", topk_kind="gjsd")) == [
        "--topk-kind applies to --objective topk; it is ignored with --objective lightning"
    ]
    assert config.objective == "topk"
