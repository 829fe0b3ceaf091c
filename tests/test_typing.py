"""The package type-checks: mypy (pinned in the dev extras, configured in pyproject.toml) finds no error in
attnflow/. The public API is typed; this keeps the annotations true as the code changes."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_error(tmp_path, monkeypatch):
    api = pytest.importorskip("mypy.api", reason="mypy is in the dev extras: pip install -e '.[dev]'")
    monkeypatch.chdir(ROOT)  # mypy reads [tool.mypy] from pyproject.toml here
    cache = ROOT / ".mypy_cache"  # git-ignored; a warm cache makes reruns take a few seconds
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache)])
    assert status == 0, f"mypy found errors:\n{stdout}{stderr}"
