"""One options vocabulary on the command line: an option shared by several commands reads the same in each
(help, default, choices), and the resumable commands' loop options default to LoopOptions' own defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from attnflow.cli import build_parser
from attnflow.options import PRECISION_ALIASES, PRECISIONS, LoopOptions

SHARED = ("--device", "--amp", "--workers", "--no-progress", "--resume", "--checkpoint-every", "--name",
          "--img-size", "--checkpoint-key")
"""Options that mean the same in every command that has them."""

RESUMABLE = ("stats", "aggregate", "localize")


def _options() -> dict[str, dict[str, argparse.Action]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found: dict[str, dict[str, argparse.Action]] = {}
    for command, parser in sub.choices.items():
        for action in parser._actions:
            for option in action.option_strings:
                found.setdefault(option, {})[command] = action
    return found


@pytest.mark.parametrize("option", SHARED)
def test_a_shared_option_reads_the_same_in_every_command(option):
    per_command = _options()[option]
    assert len(per_command) >= 2, f"{option} is no longer shared"
    helps = {command: (action.help, tuple(action.choices or ())) for command, action in per_command.items()}
    assert len(set(helps.values())) == 1, helps


def test_resumable_commands_default_to_the_loop_options():
    options, defaults = _options(), LoopOptions()
    for field in dataclasses.fields(LoopOptions):
        flag = "--" + field.name.replace("_", "-")
        for command in RESUMABLE:
            if flag in options and command in options[flag] and field.name != "device":
                assert options[flag][command].default == getattr(defaults, field.name), (command, flag)
    for command in RESUMABLE:
        assert tuple(options["--amp"][command].choices) == (*PRECISIONS, *PRECISION_ALIASES), command
        assert options["--workers"][command].default is None  # min(8, CPUs), as LoopOptions
