"""One command-line style: every `lopd` command and `lopd store` sub-command is generated from a
dataclass config (flags mirror its fields), and the generated parsers round-trip."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from lightning_opd.cli import JOBS, build_parser
from lightning_opd.config import config_from_args
from pipelines import store_tools


def _subparser(parser, name):
    (action,) = [a for a in parser._actions if a.dest in ("command", "store_command")]
    return action.choices[name]


def _dests(parser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help",)}


@pytest.mark.parametrize("command", sorted(JOBS))
def test_every_command_mirrors_its_config(command):
    module_name, config_name, _ = JOBS[command]
    config_cls = getattr(importlib.import_module(module_name), config_name)
    sub = _subparser(build_parser(command), command)
    assert _dests(sub) == {f.name for f in dataclasses.fields(config_cls)}


@pytest.mark.parametrize("command", sorted(store_tools.COMMANDS))
def test_every_store_command_mirrors_its_config(command):
    config_cls, _, _ = store_tools.COMMANDS[command]
    sub = _subparser(_subparser(build_parser("store"), "store"), command)
    assert _dests(sub) == {f.name for f in dataclasses.fields(config_cls)}


def test_store_commands_parse_positionals_lists_and_choices():
    parser = build_parser("store")
    args = parser.parse_args(["store", "merge", "a", "b", "c", "--out", "m", "--allow-duplicate"])
    config = config_from_args(store_tools.MergeConfig, args)
    assert config.stores == ["a", "b", "c"] and config.out == "m" and config.allow_duplicate
    args = parser.parse_args(["store", "filter", "s", "--out", "o", "--finish-reasons", "stop", "length"])
    assert config_from_args(store_tools.FilterConfig, args).finish_reasons == ["stop", "length"]
    with pytest.raises(SystemExit):
        parser.parse_args(["store", "export", "s", "d", "--to", "csv"])
    with pytest.raises(SystemExit):
        parser.parse_args(["store", "filter", "s"])  # --out is required


@pytest.mark.parametrize("command", sorted(JOBS) + [f"store {c}" for c in sorted(store_tools.COMMANDS)])
def test_every_help_page_renders(command, capsys):
    # argparse %-formats help text: one literal "%" in a field's help (e.g. "95% CI") crashed --help.
    argv = command.split()
    with pytest.raises(SystemExit) as done:
        build_parser(argv[0]).parse_args([*argv, "--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out
