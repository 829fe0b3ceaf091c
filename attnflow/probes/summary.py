"""Table 1/2/6-style summaries of probe runs: rows = models, columns = heads (per task), mean ± std over seeds.

Per (model, task, head, lr, seed) a run contributes its *final* top-1 (last evaluated epoch) or its *best*
top-1 over epochs; seeds are then averaged (std with ``ddof=1``, blank for a single seed). When a run swept
several learning rates, each (model, task, head) shows the lr with the highest mean unless ``lr="all"``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import AttnflowError
from .specs import EXAMPLES

SUMMARY_COLUMNS = ("model", "task", "head", "lr", "mean", "std", "n_seeds")
FORMATS = {".md": "markdown", ".markdown": "markdown", ".tex": "latex", ".csv": "csv"}


def summarize(frame: pd.DataFrame, *, value: str = "final", lr: str = "best") -> pd.DataFrame:
    """Mean and std over seeds of each (model, task, head, lr).

    Args:
        frame: concatenated run tables (columns ``model, task, head, lr, seed, epoch, top1``).
        value: ``"final"`` (top-1 at the last evaluated epoch) or ``"best"`` (max over epochs).
        lr: ``"best"`` (keep the lr with the highest mean per model/task/head) or ``"all"``.

    Returns:
        Columns :data:`SUMMARY_COLUMNS`, in order of first appearance of model, task and head.
    """
    if value not in ("final", "best") or lr not in ("best", "all"):
        raise AttnflowError("value must be final or best, lr must be best or all")
    frame = frame.copy()
    frame["lr"] = frame["lr"].fillna(-1.0)
    if "run" not in frame.columns:
        frame["run"] = ""
    keys = ["model", "task", "head", "lr", "seed"]
    runs = frame.groupby(keys, sort=False)["run"].nunique()
    if (runs > 1).any():
        clash = runs[runs > 1].index[0]
        where = sorted(frame.set_index(keys).loc[clash, "run"].unique())
        what = ", ".join(f"{k}={v}" for k, v in zip(keys, clash))
        raise AttnflowError(f"{what} appears in several runs ({', '.join(where)}); pass only one of them")
    if value == "final":
        last = frame.groupby(keys, sort=False)["epoch"].transform("max")
        per_seed = frame[frame["epoch"] == last].groupby(keys, sort=False)["top1"].last()
    else:
        per_seed = frame.groupby(keys, sort=False)["top1"].max()
    stats = per_seed.groupby(level=[0, 1, 2, 3], sort=False).agg(["mean", "std", "count"]).reset_index()
    stats = stats.rename(columns={"count": "n_seeds"})
    if lr == "best":
        best = stats.groupby(["model", "task", "head"], sort=False)["mean"].idxmax()
        stats = stats.loc[best.values]
    else:  # a column per (head, lr) where a head was trained with several lrs
        several = stats.groupby(["model", "task", "head"], sort=False)["lr"].transform("nunique") > 1
        stats.loc[several, "head"] = [f"{h}@lr={x:g}" for h, x in zip(stats.loc[several, "head"],
                                                                       stats.loc[several, "lr"])]
    stats["lr"] = stats["lr"].where(stats["lr"] >= 0)
    return stats.loc[:, list(SUMMARY_COLUMNS)].reset_index(drop=True)


TABLE_ORDER: tuple[str, ...] = ("avg", *(h for h in EXAMPLES if h != "avg"))
"""Default column order: the paper's Table 1 (average pooling, [cls], AbMILP, AbMILP + [cls]), then Tables 4
and 6."""


def _head_order(heads: list[str]) -> list[str]:
    known = [h for h in TABLE_ORDER if h in heads]
    return known + [h for h in heads if h not in known]


def check_heads_present(frame: pd.DataFrame, wanted: list[str]) -> None:
    """Raise one line when a requested head is in none of the runs (close names suggested).

    Raises:
        AttnflowError: a head of ``wanted`` that no row of ``frame`` has.
    """
    import difflib

    present = list(dict.fromkeys(frame["head"]))
    for head in wanted:
        if head not in present:
            close = difflib.get_close_matches(head, present, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"the runs have {', '.join(present)}"
            raise AttnflowError(f"no run has head {head!r}; {hint}")


def _label(model: str) -> str:
    from ..models.registry import find_spec

    try:
        spec = find_spec(model)
    except Exception:  # the registry is optional for rendering
        spec = None
    return spec.label if spec is not None else model


def pivot(summary: pd.DataFrame, digits: int = 1, heads: list[str] | None = None
          ) -> tuple[list[str], list[str], list[list[str]], list[set[int]]]:
    """Header, row labels, formatted cells and, per row, the columns of its best mean in each task.

    Columns are the heads in ``heads`` order (default: the paper's order, then others) per task. The best of a
    row is taken per task (an ImageNet and a CUB column are not compared), on the means as printed: heads tied
    at ``digits`` decimals are all best, as a reader of the table sees them.
    """
    tasks = list(dict.fromkeys(summary["task"]))
    columns = []
    for t in tasks:
        present = list(dict.fromkeys(summary[summary["task"] == t]["head"]))
        order = [h for h in heads if h in present] if heads else _head_order(present)
        columns += [(t, h) for h in order]
    header = [h if len(tasks) == 1 else f"{t}: {h}" for t, h in columns]
    models = list(dict.fromkeys(summary["model"]))
    cells, best = [], []
    for model in models:
        row: list[str] = []
        means: list[float | None] = []
        for task, head in columns:
            hit = summary[(summary["model"] == model) & (summary["task"] == task) & (summary["head"] == head)]
            if hit.empty:
                row.append("–")
                means.append(None)
                continue
            mean, std = float(hit["mean"].iloc[0]), hit["std"].iloc[0]
            row.append(f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {float(std):.{digits}f}"))
            means.append(round(mean, digits))
        cells.append(row)
        top: dict[str, float] = {}
        for (task, _), m in zip(columns, means):
            if m is not None:
                top[task] = max(top.get(task, m), m)
        best.append({i for i, ((task, _), m) in enumerate(zip(columns, means)) if m is not None and m == top[task]})
    return header, [_label(m) for m in models], cells, best


def to_markdown(summary: pd.DataFrame, digits: int = 1, heads: list[str] | None = None) -> str:
    """A Markdown table; each row's best head in bold."""
    header, rows, cells, best = pivot(summary, digits, heads)
    lines = ["| Model | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for label, row, b in zip(rows, cells, best):
        shown = [f"**{c}**" if i in b else c for i, c in enumerate(row)]
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
            .replace("#", r"\#").replace("[", "{[}").replace("]", "{]}"))


def to_latex(summary: pd.DataFrame, digits: int = 1, heads: list[str] | None = None) -> str:
    """A LaTeX ``tabular`` (booktabs); each row's best head in bold."""
    header, rows, cells, best = pivot(summary, digits, heads)
    lines = [r"\begin{tabular}{l" + "c" * len(header) + "}", r"\toprule",
             "Model & " + " & ".join(_tex(h) for h in header) + r" \\", r"\midrule"]
    for label, row, b in zip(rows, cells, best):
        shown = [c.replace("±", r"$\pm$").replace("–", "--") for c in row]
        shown = [rf"\textbf{{{c}}}" if i in b else c for i, c in enumerate(shown)]
        lines.append(f"{_tex(label)} & " + " & ".join(shown) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_summary(summary: pd.DataFrame, path: str | Path, digits: int = 1, heads: list[str] | None = None
                  ) -> Path:
    """Render by extension: ``.md`` Markdown, ``.tex`` LaTeX, ``.csv`` the tidy summary."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AttnflowError(f"cannot tell the table format of {path.name}; use .md, .tex or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        summary.to_csv(path, index=False)
    else:
        render = to_markdown if fmt == "markdown" else to_latex
        path.write_text(render(summary, digits, heads))
    return path
