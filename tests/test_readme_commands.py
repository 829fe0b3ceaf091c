"""Every `attnflow ...` command the documentation shows (README.md, docs/*.md and the READMEs of analyses/,
data_manifests/ and benchmarks/results/) parses with the real command line: a renamed or removed option fails here
instead of in a reader's shell."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from attnflow.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "analyses" / "README.md",
        ROOT / "data_manifests" / "README.md", ROOT / "benchmarks" / "results" / "README.md"]


def _shell_lines(text: str) -> list[str]:
    """Lines of the shell code blocks (fences without a language or with bash/sh/console), continuation lines
    joined, comments dropped."""
    lines: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("```"):
            if block is None:
                block = [] if line[3:].strip() in ("", "bash", "sh", "console", "shell") else ["<skip>"]
            else:
                if block[:1] != ["<skip>"]:
                    for joined in "\n".join(block).replace("\\\n", " ").splitlines():
                        joined = re.sub(r"(^|\s)#.*$", "", joined).strip()
                        if joined:
                            lines.append(joined)
                block = None
        elif block is not None:
            block.append(line)
    return lines


def _inline_commands(text: str) -> list[str]:
    """`attnflow ...` commands quoted inline (table cells, prose) with options, not the ones elided with '...'
    (a bare `attnflow stats` names the command, it is not one to run)."""
    inline = re.sub(r"```.*?```", "", text, flags=re.S)  # outside the code blocks
    return [c for c in re.findall(r"`(attnflow [^`\n]+)`", inline) if "..." not in c and " --" in c]


def commands(path: Path) -> list[str]:
    """Every attnflow command line in ``path``: ``attnflow ARGS`` or ``torchrun ... -m attnflow ARGS``."""
    text = path.read_text()
    found = []
    for line in _shell_lines(text) + _inline_commands(text):
        for part in re.split(r";|&&|\bdo\b|\bdone\b", line):
            match = re.search(r"(?:^|\s)(?:attnflow|-m attnflow)\s+(.*)$", part.strip())
            if match and not part.strip().startswith(("pip ", "python -m pip", "git ")):
                found.append(match.group(1).strip())
    return found


def _argv(args: str) -> list[str]:
    argv = shlex.split(args)
    # shell variables stand for paths or names: any word parses where they stand
    return ["X" if "$" in word else word for word in argv]


CASES = [(path.relative_to(ROOT).as_posix(), args) for path in DOCS for args in commands(path)]


def test_the_readmes_show_every_command():
    shown = {shlex.split(args)[0] for _, args in CASES}
    assert set(COMMANDS) <= shown, set(COMMANDS) - shown
    assert len(CASES) >= 60


def test_every_page_with_commands_is_read():
    """The pages this test reads exist, and each docs page that shows a command is among them."""
    assert all(path.is_file() for path in DOCS)
    assert {d for d, _ in CASES} >= {"README.md", "docs/running.md", "docs/metrics.md", "docs/probes.md",
                                     "docs/localization.md"}


@pytest.mark.parametrize("doc,args", CASES, ids=[f"{d}:{a[:60]}" for d, a in CASES])
def test_readme_command_parses(doc, args, capsys):
    parser = build_parser()
    try:
        parsed = parser.parse_args(_argv(args))
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return
        pytest.fail(f"{doc}: `attnflow {args}` does not parse: {capsys.readouterr().err.strip()}")
    assert isinstance(parsed, argparse.Namespace) and parsed.command in COMMANDS
