"""Every flag of every command explains itself (issue 22): help text on each, no "(default: None)" on
a required flag, never two defaults, enumerations as argparse choices mirroring the library's own."""

from __future__ import annotations

import argparse

import pytest
from conftest import run_lopd

from lightning_opd.cli import JOBS, build_parser
from lightning_opd.flag_help import CHOICES


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _commands():
    for name in JOBS:
        yield name, _subparser(build_parser(name), name)
    store = _subparser(build_parser("store"), "store")
    for name, parser in _subparser_map(store).items():
        yield f"store {name}", parser


def _subparser_map(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command,parser", list(_commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_flag_has_help(command, parser):
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = (action.help or "").split("(default")[0].strip()
        name = "/".join(action.option_strings) or action.dest
        assert text, f"lopd {command} {name} has no help text"
        assert (action.help or "").count("(default") <= 1, f"lopd {command} {name} shows two defaults"
        if action.required:
            assert "(default: None)" not in (action.help or ""), f"lopd {command} {name} is required"


def test_choices_mirror_the_library():
    from lightning_opd.evaluation.verifiers import VERIFIER_CHOICES
    from lightning_opd.packing import ATTN_IMPLEMENTATIONS
    from lightning_opd.prompts import CHAT_TEMPLATE_MODES
    from lightning_opd.scale import OPTIMIZERS, SAVE_DTYPES
    from lightning_opd.stage1.build import SCORING_BACKENDS
    from lightning_opd.stage1.rollout import BACKENDS, DTYPES
    from lightning_opd.stage2.horizons import HORIZON_KINDS
    from lightning_opd.stage2.objectives import DIVERGENCES, OBJECTIVES, SAMPLE_REDUCTIONS, TOPK_TAILS
    from lightning_opd.tracking import REPORT_TO

    assert CHOICES["chat_template"] == CHAT_TEMPLATE_MODES
    assert CHOICES["backend"] == BACKENDS and CHOICES["scoring_backend"] == SCORING_BACKENDS
    assert CHOICES["dtype"] == DTYPES == CHOICES["teacher_dtype"]
    assert CHOICES["sample_reduction"] == SAMPLE_REDUCTIONS
    assert set(CHOICES["objective"]) == set(OBJECTIVES) and CHOICES["divergence"] == DIVERGENCES
    assert CHOICES["horizon"] == HORIZON_KINDS and set(CHOICES["verifier"]) == set(VERIFIER_CHOICES)
    assert CHOICES["optim"] == OPTIMIZERS and CHOICES["save_dtype"] == SAVE_DTYPES
    assert CHOICES["attn_implementation"] == ATTN_IMPLEMENTATIONS and CHOICES["topk_tail"] == TOPK_TAILS
    assert CHOICES["report_to"] == REPORT_TO


def test_a_typo_in_a_choice_is_refused_with_the_list():
    result = run_lopd(
        "train", "--student", "s", "--stores", "st", "--out", "o", "--objective", "lightnin", check=False
    )
    assert (
        result.returncode == 2
        and "invalid choice: 'lightnin'" in result.stderr
        and "opd_plus" in result.stderr
    )
