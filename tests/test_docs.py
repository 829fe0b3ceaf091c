"""The documentation's structure: the README's length, links and anchors that resolve, repository paths and
``attnflow.*`` names that exist, a layout that matches the package, benchmark commands whose scripts and options
exist. (Commands are parsed in test_readme_commands.py, Python blocks run in test_readme_python.py.)"""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "benchmarks" / "results" / "README.md"]
"""The pages this test reads; their relative links, quoted paths and names must resolve."""

MAX_README_LINES = 200


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", _prose(path.read_text()), flags=re.M)}


def _links(path: Path) -> list[str]:
    """Targets of the Markdown links and images of ``path`` (outside code blocks)."""
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _prose(path.read_text()))


def test_readme_is_at_most_200_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move details to docs/"


def test_readme_keeps_the_setup_commands():
    """CI (.ci/run) installs exactly as these lines say; the before-stop hook looks for them too."""
    text = README.read_text()
    pin = "pip install torch==2.14.1 torchvision==0.29.1"
    assert f"python3 -m venv .venv && . .venv/bin/activate && {pin} -e . && attnflow demo" in text
    assert f'python3 -m venv .venv && . .venv/bin/activate && {pin} -e ".[dev]" && python -m pytest -q' in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'torch==2.14.1 torchvision==0.29.1 -e ".[dev]"' in ci and "python -m pytest -q" in ci


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    """Every relative link (and image) points to an existing file, and its #anchor to a heading there."""
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(page)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in _links(README) if not re.match(r"^[a-z]+:", t)}
    assert set(DOCS) <= linked, sorted(_rel(p) for p in set(DOCS) - linked)
    assert len(DOCS) >= 8


REPO_PATH = re.compile(r"(?<![\w./-])((?:attnflow|tests|benchmarks|analyses|figures|data_manifests|docs)/[\w./*<>{}$-]*)")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_quoted_repository_paths_exist(page):
    """Paths such as `attnflow/kernels/qk_metrics.py` or `tests/test_loop.py` quoted in the text exist (globs and
    placeholders such as `benchmarks/results/h200_*` are not paths)."""
    quoted = re.findall(r"`([^`\n]+)`", _prose(page.read_text()))
    missing = []
    for span in quoted:
        for path in REPO_PATH.findall(span):
            path = path.rstrip(".")
            if any(c in path for c in "*<>{}$") or path.endswith("_"):
                continue
            if not (ROOT / path).exists():
                missing.append(path)
    assert not missing, f"{_rel(page)} quotes paths that do not exist: {missing}"


def _resolve(dotted: str) -> object:
    """Import ``attnflow.a.b`` as far as it is a module, then follow attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_quoted_attnflow_names_exist(page):
    """Every `attnflow.x.y` the text quotes (a module, class, function or constant) exists: a renamed or moved name
    breaks this test."""
    names = set()
    for span in re.findall(r"`([^`\n]+)`", _prose(page.read_text())):
        names.update(re.findall(r"(?<![\w/])(attnflow(?:\.[A-Za-z_]\w*)+)", span))
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as err:
            missing.append(f"{name} ({type(err).__name__}: {err})")
    assert not missing, f"{_rel(page)}: " + "; ".join(missing)


def _layout_block() -> list[str]:
    section = README.read_text().split("## Layout", 1)[1]
    block = re.search(r"```\w*\n(.*?)```", section, flags=re.S)
    assert block, "README's Layout section has no code block"
    return block.group(1).splitlines()


def _tracked_top_level() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return {f.split("/")[0] for f in out.splitlines() if "/" in f and not f.startswith(".")}


def test_readme_layout_matches_the_tree():
    """The layout names every module and package of attnflow/ (one line each, or on its package's line), every
    name it lists exists, and every tracked top-level folder is there."""
    lines = _layout_block()
    text = "\n".join(lines)
    package = ROOT / "attnflow"
    entries = [p.name + ("/" if p.is_dir() else "") for p in package.iterdir()
               if p.name != "__pycache__" and not p.name.endswith(".pyc")]
    unnamed = [e for e in entries if not re.search(rf"(?<![\w.]){re.escape(e)}(?![\w])", text)]
    assert not unnamed, f"README layout does not name {unnamed}"
    listed_top = [line.split()[0] for line in lines if line and not line[0].isspace()]
    listed_nested = [line.split()[0] for line in lines if line.startswith("  ") and line.strip()
                     and not line.startswith("   ")]
    assert all((ROOT / name).exists() for name in listed_top), listed_top
    assert all((package / name).exists() for name in listed_nested), [n for n in listed_nested
                                                                     if not (package / n).exists()]
    tracked = _tracked_top_level()
    assert tracked <= {name.rstrip("/") for name in listed_top}, tracked - {n.rstrip("/") for n in listed_top}
    for sub in (p for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        line = next(line for line in lines if line.strip().startswith(sub.name + "/"))
        modules = [m.stem for m in sub.glob("*.py") if m.stem != "__init__"]
        described = line.split(None, 1)[1]
        assert described.strip(), f"{sub.name}/ has no description"
        assert modules, sub


def _benchmark_commands(page: Path) -> list[list[str]]:
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if re.match(r"^(python3?|bash) benchmarks/", line):
                commands.append(shlex.split(line))
    inline = re.findall(r"`((?:python3?|bash) benchmarks/[^`]+)`", _prose(page.read_text()))
    return commands + [shlex.split(c) for c in inline]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_benchmark_commands_name_existing_scripts_and_options(page):
    """A shown `python benchmarks/X.py --opt` names a script that exists and defines --opt."""
    for argv in _benchmark_commands(page):
        script = ROOT / argv[1]
        assert script.is_file(), f"{_rel(page)}: {argv[1]} does not exist"
        source = script.read_text()
        for opt in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{opt}"' in source, f"{_rel(page)}: {argv[1]} has no option {opt}"
