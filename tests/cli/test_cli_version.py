"""``attnflow --version``: one line, exit 0, answered without importing torch (or any sub-command)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import attnflow
from attnflow.cli import main

REPO = Path(__file__).resolve().parents[2]


def pyproject_version() -> str:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.parametrize("argv", [["--version"], ["-v", "--version"]])
def test_version_prints_one_line_and_exits_0(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out == f"attnflow {attnflow.__version__}\n"
    assert re.fullmatch(r"attnflow \d+\.\d+\.\d+\S*\n", out)


def test_version_matches_the_package_metadata():
    assert attnflow.__version__ == pyproject_version()


def test_version_imports_no_torch_and_no_sub_command():
    code = ("import sys; from attnflow.cli import main; rc = main(['--version']); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'numpy', 'pandas') "
            "or m.endswith('_cmd')); print(rc, heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"attnflow {attnflow.__version__}", "0 []"]


def test_python_m_attnflow_version():
    done = subprocess.run([sys.executable, "-m", "attnflow", "--version"], capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"attnflow {attnflow.__version__}\n", "")


def test_version_after_a_sub_command_is_that_command_s_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["models", "--version"])
    assert exit_.value.code == 2 and "unrecognized arguments: --version" in capsys.readouterr().err
