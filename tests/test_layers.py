"""Layers point one way: cli -> analyses -> loop -> tap/metrics/models/data.

Two rules keep the command line out of the library (every module under attnflow/ except attnflow/cli/):

- no library module imports :mod:`attnflow.cli` (only ``attnflow/__main__.py`` may: it is ``python -m
  attnflow``);
- no library string (messages, log lines, warnings, docstrings) or comment names a command-line flag: a Python
  user never sees ``--limit``, so the library names the option by the word both users share (``limit``,
  ``checkpoint``, ``qk_kernel``, the data root). Only the CLI's help texts and its own messages spell flags.
  Flags of other programs (torchrun's ``--nproc_per_node``, the official code's ``--abmilp_sa``, Docker's) are not
  attnflow's and may be named: a hit counts when it is one of attnflow's own options.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnflow"
CLI = PACKAGE / "cli"

FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")
"""A long option as a command line spells it: ``--limit``, ``--qk-kernel``, ``--nproc_per_node``."""

def attnflow_flags() -> frozenset[str]:
    """Every long option of every attnflow command (from the real parser)."""
    import argparse

    from attnflow.cli import build_parser

    parser = build_parser()
    flags = {o for a in parser._actions for o in a.option_strings}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= {o for a in sub._actions for o in a.option_strings}
                for inner in sub._actions:  # `attnflow data verify ...`
                    if isinstance(inner, argparse._SubParsersAction):
                        flags |= {o for p in inner.choices.values() for a in p._actions for o in a.option_strings}
    return frozenset(f for f in flags if f.startswith("--"))


ATTNFLOW_FLAGS = attnflow_flags()


def library_modules() -> list[Path]:
    """Every module under attnflow/ except the CLI package."""
    return sorted(p for p in PACKAGE.rglob("*.py") if CLI not in p.parents)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def flags_named(source: str) -> list[tuple[int, str, str]]:
    """``(line, flag, where)`` for each flag that a string constant or a comment of ``source`` names.

    Also catches a flag built from a name in an f-string (``f"--{key}"``).
    """
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            hits += [(node.lineno, m.group(), "string") for m in FLAG.finditer(node.value)]
        elif isinstance(node, ast.JoinedStr):
            for part, after in zip(node.values, node.values[1:]):
                if (isinstance(part, ast.Constant) and isinstance(part.value, str)
                        and isinstance(after, ast.FormattedValue) and re.search(r"(?<![\w-])--$", part.value)):
                    hits.append((node.lineno, "--{...}", "f-string"))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            hits += [(tok.start[0], m.group(), "comment") for m in FLAG.finditer(tok.string)]
    return sorted(h for h in hits if h[1] in ATTNFLOW_FLAGS or h[1] == "--{...}")


def cli_imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, what)`` for each import of ``attnflow.cli`` (absolute, relative, or a module path in a string,
    as lazy re-exports and ``importlib.import_module`` take it) in the source of ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    hits = []

    def is_cli(name: str) -> bool:
        return name == "attnflow.cli" or name.startswith("attnflow.cli.")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            hits += [(node.lineno, a.name) for a in node.names if is_cli(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if is_cli(target):
                hits.append((node.lineno, target))
            elif target == "attnflow":
                hits += [(node.lineno, f"attnflow.{a.name}") for a in node.names if a.name == "cli"]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and is_cli(node.value):
            hits.append((node.lineno, repr(node.value)))
    return hits


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


# ------------------------------------------------------------------------------------------------ the rules

def test_library_names_no_command_line_flag():
    found = [f"{_rel(p)}:{line}: {flag} in a {where}"
             for p in library_modules() for line, flag, where in flags_named(p.read_text(encoding="utf-8"))]
    assert not found, ("library modules must name options by their Python/config word (limit, checkpoint, "
                       "qk_kernel, the data root), not by a CLI flag; only attnflow/cli/ spells flags:\n"
                       + "\n".join(found))


def test_library_does_not_import_the_cli():
    allowed = {PACKAGE / "__main__.py"}
    found = []
    for p in library_modules():
        if p in allowed:
            continue
        module, is_package = _module_name(p)
        found += [f"{_rel(p)}:{line}: imports {what}" for line, what in cli_imports(p.read_text(encoding="utf-8"),
                                                                                     module, is_package)]
    assert not found, "only attnflow/cli/ and attnflow/__main__.py may import attnflow.cli:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------ the scanners

def test_scans_cover_the_package():
    mods = {_rel(p) for p in library_modules()}
    assert "attnflow/loop.py" in mods and "attnflow/models/load.py" in mods
    assert not any(m.startswith("attnflow/cli/") for m in mods)


def test_flag_scan_finds_strings_comments_and_built_flags():
    source = ('"""Use ``--qk-kernel torch``."""\n'
              'x = 1  # matters for --random-init\n'
              'msg = f"pass --checkpoint {name}=PATH"\n'
              'opt = f"--{key}"\n'
              'ok = "torchrun --nproc_per_node=2; official --abmilp_sa both; a -- b; ---; x--y; qk_kernel"\n')
    assert [(line, flag) for line, flag, _ in flags_named(source)] == [
        (1, "--qk-kernel"), (2, "--random-init"), (3, "--checkpoint"), (4, "--{...}")]


def test_import_scan_finds_every_spelling():
    source = ("import attnflow.cli\n"
              "from attnflow.cli.common import x\n"
              "from attnflow import cli\n"
              "from ..cli import main\n"
              "from .. import cli\n"
              "EXPORTS = {'main': 'attnflow.cli'}\n"
              "from ..models import load\n"
              "from .client import y\n")
    assert [line for line, _ in cli_imports(source, "attnflow.runner.execute", False)] == [1, 2, 3, 4, 5, 6]
    assert cli_imports("from .cli import main\n", "attnflow", True) == [(1, "attnflow.cli")]
    assert cli_imports("from . import cli\n", "attnflow.runner", True) == []
