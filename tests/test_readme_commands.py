"""Every `lopd` command the README shows parses with today's flags (a renamed or removed flag, or a
choice that no longer exists, fails here), and builds its job's config where it names no model."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from lightning_opd.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The `lopd ...` commands of the README's bash blocks, continuation lines joined, `&&` chains split."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#"):
                continue
            for part in line.split("&&"):
                words = shlex.split(part)
                if "lightning_opd.cli" in words:  # accelerate launch ... -m lightning_opd.cli CMD ...
                    words = ["lopd", *words[words.index("lightning_opd.cli") + 1 :]]
                if words[:1] == ["lopd"]:
                    commands.append(words[1:])
    return commands


def test_the_readme_shows_the_commands_of_every_stage():
    shown = {argv[0] for argv in readme_commands()}
    assert {"sft", "precompute", "plan", "train", "eval", "store"} <= shown


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda argv: " ".join(argv[:2]))
def test_a_readme_command_parses(argv):
    build_parser(argv[0]).parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or choice
