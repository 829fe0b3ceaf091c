"""Table 1/2/6-style summaries of probe runs: rows = models, columns = heads (per task), mean ± std over seeds.

Per (model, task, head, lr, seed) a run contributes its *final* top-1 (last evaluated epoch) or its *best*
top-1 over epochs; seeds are then averaged (std with ``ddof=1``, blank for a single seed). Each head shows the lr
its runs kept (``selected`` in the run table: its only lr, or the one chosen per seed on held-out training
data); a grid trained without a held-out split (``holdout = 0``, or a table written before lrs were chosen)
shows the lr with the highest mean, a choice made on the validation set, as this command always did; ``lr="all"``
shows every lr. Heads follow the order asked for, else :data:`TABLE_ORDER`. A model whose
runs had random weights is marked with a dagger and a footnote: its numbers mean nothing.

Blocks: run tables say which encoder block (0-based ``block``) each head read. Where a (model, task) has heads of
several blocks (a several-block run, or runs on different blocks) the table keeps them apart as
``head@block=B``; ``by_block=True`` keeps ``block`` as a column instead (the per-block probe figure's data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..atomic import write_atomically
from ..errors import AttnflowError
from ..limits import check_digits
from .specs import EXAMPLES, MULTI_PATTERN_EXAMPLES

SUMMARY_COLUMNS = ("model", "task", "head", "lr", "mean", "std", "n_seeds", "random_init")
FORMATS = {".md": "markdown", ".markdown": "markdown", ".tex": "latex", ".csv": "csv"}
RANDOM_NOTE = "random weights: numbers meaningless"
DAGGER_TEX = r"$^\dagger$"

TABLE_ORDER: tuple[str, ...] = ("avg", *(h for h in EXAMPLES if h not in ("avg", "ap1", "ap12")),
                                 *MULTI_PATTERN_EXAMPLES, "ap1", "ap12")
"""Default head order: the paper's Table 1 (average pooling, [cls], AbMILP, AbMILP + [cls]), then Tables 4
and 6 (AbMILP scorers, SA-AbMILP), multi-pattern AbMILP (``abmilp-k2`` ... ``abmilp-k12-mean``) and attentive
probing (ap1, ap12) last, so that K patterns sit between AbMILP and AP; other heads follow in order of
appearance."""


def _qualifiers(label: str) -> list[tuple[str, float, str]]:
    """Sort key of a label's ``@key=value`` parts, numbers by value (``@block=9`` before ``@block=10``)."""
    key = []
    for part in label.split("@")[1:]:
        name, _, value = part.partition("=")
        try:
            key.append((name, float(value), ""))
        except ValueError:
            key.append((name, float("inf"), value))
    return key


def head_order(present: list[str], heads: list[str] | None = None) -> list[str]:
    """``present`` heads in ``heads`` order when given (others left out), else in :data:`TABLE_ORDER`; a grid
    column ``head@lr=x`` or a block's column ``head@block=B`` sits with its head, by increasing lr or block."""
    base = [h.split("@")[0] for h in present]
    order = list(heads) if heads else [*TABLE_ORDER, *dict.fromkeys(b for b in base if b not in TABLE_ORDER)]
    ranked = sorted((order.index(b), _qualifiers(h), h) for b, h in zip(base, present) if b in order)
    return [h for _, _, h in ranked]


def _keep_lrs(per_seed: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys`` (e.g. model, task, head) and seed the rows of the kept lr: the run's ``selected`` lr, or for a
    grid that no held-out split chose, the lr with the best mean over seeds."""
    open_ = ~per_seed.groupby([*keys, "seed"], sort=False)["selected"].transform("any")
    if open_.any():
        means = per_seed[open_].groupby([*keys, "lr"], sort=False)["top1"].mean()
        best = set(means.groupby(level=list(range(len(keys))), sort=False).idxmax())
        chosen = [key in best for key in per_seed[[*keys, "lr"]].itertuples(index=False, name=None)]
        per_seed = per_seed.assign(selected=per_seed["selected"] | (open_ & pd.Series(chosen, index=per_seed.index)))
    return per_seed[per_seed["selected"]]


def _with_blocks(frame: pd.DataFrame, by_block: bool) -> pd.DataFrame:
    """``block`` as integers (-1 for tables written before runs recorded it); unless ``by_block``, the heads of a
    (model, task) that has several blocks renamed ``head@block=B`` (and ``block`` dropped)."""
    blocks = frame["block"] if "block" in frame.columns else pd.Series(-1, index=frame.index)
    frame = frame.assign(block=blocks.fillna(-1).astype(int))
    if by_block:
        return frame
    several = frame.groupby(["model", "task"], sort=False)["block"].transform("nunique") > 1
    heads = [f"{h}@block={b}" if s else h for h, b, s in zip(frame["head"], frame["block"], several)]
    return frame.assign(head=heads).drop(columns="block")


def _check_one_run_per_seed(frame: pd.DataFrame, keys: list[str]) -> None:
    runs = frame.groupby(keys, sort=False)["run"].nunique()
    if (runs > 1).any():
        clash = runs[runs > 1].index[0]
        where = sorted(frame.set_index(keys).loc[clash, "run"].unique())
        what = ", ".join(f"{k}={v}" for k, v in zip(keys, clash))
        raise AttnflowError(f"{what} appears in several runs ({', '.join(where)}); pass only one of them")


def summarize(frame: pd.DataFrame, *, value: str = "final", lr: str = "best", heads: list[str] | None = None,
              by_block: bool = False) -> pd.DataFrame:
    """Mean and std over seeds of each (model, task, head) at its kept lr, or of each (head, lr).

    Args:
        frame: concatenated run tables (columns ``model, task, head, lr, seed, epoch, top1``; optional
            ``selected``, ``random_init``, ``run``).
        value: ``"final"`` (top-1 at the last evaluated epoch) or ``"best"`` (max over epochs).
        lr: ``"best"`` (each head at its kept lr, see the module docstring) or ``"all"`` (every lr; a head with
            several becomes ``head@lr=x``).
        heads: the head order (default :data:`TABLE_ORDER`).
        by_block: one row per (model, task, block, head), with a ``block`` column after ``task`` (blocks
            ascending); else the heads of several blocks are named ``head@block=B`` (see the module docstring).

    Returns:
        Columns :data:`SUMMARY_COLUMNS` (with ``block`` when ``by_block``), models and tasks in order of first
        appearance, heads in ``heads`` order; ``lr`` is NaN where the seeds kept different lrs.
    """
    if value not in ("final", "best") or lr not in ("best", "all"):
        raise AttnflowError("value must be final or best, lr must be best or all")
    frame = _with_blocks(frame.assign(lr=frame["lr"].fillna(-1.0)), by_block)
    for column, default in (("run", ""), ("selected", False), ("random_init", False)):
        if column not in frame.columns:
            frame[column] = default
    base = ["model", "task", *(["block"] if by_block else []), "head"]
    keys = [*base, "lr", "seed"]
    _check_one_run_per_seed(frame, keys)
    grouped = frame.groupby(keys, sort=False)
    if value == "final":
        last = grouped["epoch"].transform("max")
        per_seed = frame[frame["epoch"] == last].groupby(keys, sort=False).agg(
            top1=("top1", "last"), selected=("selected", "any"))
    else:
        per_seed = grouped.agg(top1=("top1", "max"), selected=("selected", "any"))
    per_seed = per_seed.reset_index()
    if lr == "best":
        per_seed = _keep_lrs(per_seed, base)
        group = base
    else:
        several = per_seed.groupby(base, sort=False)["lr"].transform("nunique") > 1
        per_seed.loc[several, "head"] = [f"{h}@lr={x:g}" for h, x in zip(per_seed.loc[several, "head"],
                                                                          per_seed.loc[several, "lr"])]
        group = [*base, "lr"]
    stats = per_seed.groupby(group, sort=False).agg(
        mean=("top1", "mean"), std=("top1", "std"), n_seeds=("top1", "count"),
        lr_=("lr", lambda x: x.iloc[0] if x.nunique() == 1 else float("nan"))).reset_index()
    stats["lr"] = stats.pop("lr_") if lr == "best" else stats["lr"]
    stats["lr"] = stats["lr"].where(stats["lr"] >= 0)
    random = frame.groupby("model", sort=False)["random_init"].any()
    stats["random_init"] = stats["model"].map(random).astype(bool)
    columns = list(SUMMARY_COLUMNS)
    if by_block:
        columns.insert(2, "block")
    return _ordered(stats.loc[:, columns], heads)


def _ordered(stats: pd.DataFrame, heads: list[str] | None) -> pd.DataFrame:
    """Rows grouped by model and task (first appearance), then by block (ascending, when a column), heads in
    :func:`head_order` within each."""
    rank = {h: i for i, h in enumerate(head_order(list(dict.fromkeys(stats["head"])), heads))}
    models = {m: i for i, m in enumerate(dict.fromkeys(stats["model"]))}
    tasks = {t: i for i, t in enumerate(dict.fromkeys(stats["task"]))}
    stats = stats[stats["head"].isin(rank)]
    blocks = stats["block"] if "block" in stats.columns else [0] * len(stats)
    key = [(models[m], tasks[t], int(b), rank[h])
           for m, t, b, h in zip(stats["model"], stats["task"], blocks, stats["head"])]
    return stats.iloc[sorted(range(len(key)), key=key.__getitem__)].reset_index(drop=True)


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


@dataclass
class Pivot:
    """A summary laid out as a table: one row per model, one column per (task, head).

    Attributes:
        header: column titles (``head``, or ``task: head`` with several tasks).
        labels: row labels (the models' display names).
        cells: formatted ``mean ± std`` (``–`` where a model lacks the head).
        best: per row, the columns of its best mean in each task.
        random: per row, whether the model's runs had random weights.
    """

    header: list[str]
    labels: list[str]
    cells: list[list[str]]
    best: list[set[int]]
    random: list[bool]


def _cell(hit: pd.DataFrame, digits: int) -> tuple[str, float | None]:
    if hit.empty:
        return "–", None
    mean, std = float(hit["mean"].iloc[0]), hit["std"].iloc[0]
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {float(std):.{digits}f}"), round(mean, digits)


def pivot(summary: pd.DataFrame, digits: int = 1, heads: list[str] | None = None) -> Pivot:
    """The table layout of a summary (see :class:`Pivot`).

    Columns are the heads in ``heads`` order (default :data:`TABLE_ORDER`, then others) per task. The best of a
    row is taken per task (an ImageNet and a CUB column are not compared), on the means as printed: heads tied
    at ``digits`` decimals are all best, as a reader of the table sees them.

    Raises:
        OptionError: ``digits`` outside :func:`attnflow.limits.check_digits`.
    """
    check_digits(digits)
    tasks = list(dict.fromkeys(summary["task"]))
    columns = [(t, h) for t in tasks
               for h in head_order(list(dict.fromkeys(summary[summary["task"] == t]["head"])), heads)]
    models = list(dict.fromkeys(summary["model"]))
    random = summary.groupby("model", sort=False)["random_init"].any() if "random_init" in summary else None
    table = Pivot([h if len(tasks) == 1 else f"{t}: {h}" for t, h in columns], [_label(m) for m in models], [], [],
                  [bool(random[m]) if random is not None else False for m in models])
    for model in models:
        pairs = [_cell(summary[(summary["model"] == model) & (summary["task"] == task) & (summary["head"] == head)],
                       digits) for task, head in columns]
        top: dict[str, float] = {}
        for (task, _), (_, m) in zip(columns, pairs):
            if m is not None:
                top[task] = max(top.get(task, m), m)
        table.cells.append([text for text, _ in pairs])
        table.best.append({i for i, ((task, _), (_, m)) in enumerate(zip(columns, pairs))
                           if m is not None and m == top[task]})
    return table


def to_markdown(summary: pd.DataFrame, digits: int = 1, heads: list[str] | None = None) -> str:
    """A Markdown table; each row's best head in bold; models with random weights marked † (with a footnote)."""
    table = pivot(summary, digits, heads)
    lines = ["| Model | " + " | ".join(table.header) + " |", "|---|" + "---:|" * len(table.header)]
    for label, row, b, random in zip(table.labels, table.cells, table.best, table.random):
        shown = [f"**{c}**" if i in b else c for i, c in enumerate(row)]
        lines.append(f"| {label}{' †' if random else ''} | " + " | ".join(shown) + " |")
    if any(table.random):
        lines += ["", f"† {RANDOM_NOTE}"]
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    return (text.replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%").replace("_", r"\_")
            .replace("#", r"\#").replace("[", "{[}").replace("]", "{]}"))


def to_latex(summary: pd.DataFrame, digits: int = 1, heads: list[str] | None = None) -> str:
    """A LaTeX ``tabular`` (booktabs); each row's best head in bold; models with random weights marked with a
    dagger, the footnote in the table's last row."""
    table = pivot(summary, digits, heads)
    lines = [r"\begin{tabular}{l" + "c" * len(table.header) + "}", r"\toprule",
             "Model & " + " & ".join(_tex(h) for h in table.header) + r" \\", r"\midrule"]
    for label, row, b, random in zip(table.labels, table.cells, table.best, table.random):
        shown = [c.replace("±", r"$\pm$").replace("–", "--") for c in row]
        shown = [rf"\textbf{{{c}}}" if i in b else c for i, c in enumerate(shown)]
        mark = DAGGER_TEX if random else ""
        lines.append(f"{_tex(label)}{mark} & " + " & ".join(shown) + r" \\")
    lines.append(r"\bottomrule")
    if any(table.random):
        lines.append(rf"\multicolumn{{{len(table.header) + 1}}}{{l}}{{\footnotesize $^\dagger$ {RANDOM_NOTE}}} \\")
    lines.append(r"\end{tabular}")
    return "\n".join(lines) + "\n"


def write_summary(summary: pd.DataFrame, path: str | Path, digits: int = 1, heads: list[str] | None = None
                  ) -> Path:
    """Render by extension, atomically (a temporary file renamed into place): ``.md``/``.markdown`` Markdown,
    ``.tex`` LaTeX, ``.csv`` the tidy summary (:data:`SUMMARY_COLUMNS`, heads in ``heads`` order).

    Raises:
        AttnflowError: another extension.
        OptionError: ``digits`` outside :func:`attnflow.limits.check_digits`.
    """
    check_digits(digits)
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise AttnflowError(f"cannot tell the table format of {path.name}; use .md, .tex or .csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        ordered = _ordered(summary, heads)
        write_atomically({path: lambda tmp: ordered.to_csv(tmp, index=False)})
    else:
        text = (to_markdown if fmt == "markdown" else to_latex)(summary, digits, heads)
        write_atomically({path: lambda tmp: tmp.write_text(text)})
    return path
