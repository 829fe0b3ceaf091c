"""Probe run outputs: the tidy result table (parquet + CSV + JSON provenance) and saved heads.

A run directory holds::

    results.parquet / results.csv   columns model, task, head, lr, seed, epoch, top1, top5, train_loss,
                                    holdout_top1, holdout_loss, selected (see attnflow.probes.fit.RESULT_COLUMNS)
    results.json                    provenance (model, checkpoint sha256, dataset, protocol, resolved batch and
                                    lrs, the lr each head kept per seed, versions, ...)
    seed{S}/checkpoint.pt           per-epoch training state (heads + optimizers + history) to resume
    seed{S}/heads/{name}.pt         the final heads; ``load_head(path).scores(tokens)`` gives aggregation maps

The three ``results`` files are written all or nothing (:func:`attnflow.result.write_table`).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch

from ..atomic import write_atomically
from ..result import write_table
from ..errors import AttnflowError
from .heads import ProbeHead
from .specs import parse_head_spec

HEAD_FORMAT = "attnflow-probe-head/1"
TABLE_NAME = "results"


def safe_name(name: str) -> str:
    """A file-name-safe form of an entry name (``abmilp+cls@lr=0.4`` -> ``abmilp+cls_lr=0.4``)."""
    return name.replace("@", "_").replace("/", "_")


def save_head(path: str | Path, head: ProbeHead, meta: dict[str, Any] | None = None) -> Path:
    """Save a trained head with everything :func:`load_head` needs to rebuild it."""
    path = Path(path)
    payload = {"format": HEAD_FORMAT, "spec": head.spec.name, "dim": head.dim, "num_classes": head.num_classes,
               "has_cls": head.has_cls, "grid": getattr(head, "grid", None),
               "state_dict": {k: v.cpu() for k, v in head.state_dict().items()}, "meta": meta or {}}
    write_atomically({path: lambda tmp: torch.save(payload, tmp)})
    return path


def load_head(path: str | Path, map_location: str | torch.device = "cpu") -> ProbeHead:
    """Rebuild a saved head in eval mode; ``head.scores(tokens)`` then gives per-image aggregation weights.

    The file is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so a
    crafted file cannot run code.

    Raises:
        AttnflowError: when the file is missing or not a saved probe head.
    """
    path = Path(path)
    if not path.is_file():
        raise AttnflowError(f"no saved head at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # not a torch file at all (text, truncated download, ...)
        raise AttnflowError(f"{path} is not a saved attnflow probe head ({type(err).__name__}: "
                            f"{(str(err).splitlines() or [''])[0]})") from None
    if not isinstance(state, dict) or state.get("format") != HEAD_FORMAT:
        raise AttnflowError(f"{path} is not a saved attnflow probe head")
    head = ProbeHead(parse_head_spec(state["spec"]), state["dim"], state["num_classes"], state["has_cls"],
                     grid=state.get("grid"))
    head.load_state_dict(state["state_dict"])
    head.meta = state.get("meta", {})
    head.path = str(path)
    return head.eval()


def environment() -> dict[str, str]:
    """Package versions for provenance."""
    import timm

    import attnflow

    return {"attnflow": attnflow.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def write_run_table(frame: pd.DataFrame, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``results.parquet``, ``results.csv`` and ``results.json`` into ``out_dir`` (all or nothing, with the
    software environment in the sidecar; see :func:`attnflow.result.write_table`); returns the parquet."""
    return write_table(Path(out_dir) / f"{TABLE_NAME}.parquet", frame.reset_index(drop=True),
                       {**meta, "environment": environment()})


def find_run_tables(paths: Iterable[str | Path]) -> list[Path]:
    """Result tables named by ``paths``: run directories (searched recursively) or table files."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(p.rglob(f"{TABLE_NAME}.parquet")) or sorted(p.rglob(f"{TABLE_NAME}.csv"))
        elif p.is_file() and p.suffix in (".parquet", ".csv"):
            found.append(p)
        else:
            raise AttnflowError(f"no probe run at {p} (expected a run directory or a results table)")
    if not found:
        raise AttnflowError("no probe result tables found in " + ", ".join(map(str, paths)))
    return list(dict.fromkeys(found))


def _sidecar(table: Path) -> dict[str, Any]:
    """The ``results.json`` sidecar of a run table (``{}`` when there is none or it is unreadable)."""
    try:
        meta = json.loads(table.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _data_root(meta: dict[str, Any]) -> str:
    """The dataset root a run recorded, or ``""``."""
    data = meta.get("data")
    return str(data.get("root", "")) if isinstance(data, dict) else ""


def _random_init(meta: dict[str, Any]) -> bool:
    """Whether the run's encoder had random weights (its numbers then mean nothing)."""
    info = meta.get("model_info")
    return bool(info.get("random_init")) if isinstance(info, dict) else False


def _tell_datasets_apart(frame: pd.DataFrame) -> pd.DataFrame:
    """Relabel a task that runs did on several dataset roots as ``task (folder name)``, one label per root,
    so that ``attnflow table`` never averages seeds or picks a best lr across two datasets."""
    for task, rows in frame.groupby("task", sort=False):
        roots = [r for r in dict.fromkeys(rows["data_root"]) if r]
        if len(roots) < 2:
            continue
        names = [Path(r).name for r in roots]
        labels = dict(zip(roots, names if len(set(names)) == len(names) else roots))
        mask = frame["task"] == task
        frame.loc[mask, "task"] = [f"{task} ({labels[r]})" if r else task for r in frame.loc[mask, "data_root"]]
    return frame


def _read_table(table: Path) -> pd.DataFrame:
    """A run table, or one line saying why the file cannot be read (truncated parquet, binary or empty CSV)."""
    try:
        return pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid, pandas' ParserError and UnicodeDecodeError too
        detail = (str(err).splitlines() or [""])[0]
        raise AttnflowError(f"{table}: not a readable probe result table ({type(err).__name__}: {detail})") \
            from None


def read_run_tables(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate the probe tables of many runs, with a ``run`` column (the run directory) and ``data_root`` and
    ``random_init`` columns (from each run's JSON sidecar); a table without ``model`` gets its directory name.
    A task run on several dataset roots (e.g. two ``folder`` datasets) is split into one task per root."""
    frames = []
    for table in find_run_tables(paths):
        frame = _read_table(table)
        missing = {"head", "seed", "epoch", "top1"} - set(frame.columns)
        if missing:
            raise AttnflowError(f"{table} is not a probe result table (lacks {', '.join(sorted(missing))})")
        for column in ("seed", "epoch", "top1", "lr"):
            if column in frame.columns and not pd.api.types.is_numeric_dtype(frame[column]):
                raise AttnflowError(f"{table} is not a probe result table: its {column} column is not numeric "
                                    f"(e.g. {frame[column].iloc[0]!r})")
        if frame["top1"].isna().all():
            raise AttnflowError(f"{table} is not a probe result table: its top1 column holds no number")
        if "model" not in frame.columns:
            frame = frame.assign(model=table.parent.name)
        if "task" not in frame.columns:
            frame = frame.assign(task="")
        if "lr" not in frame.columns:
            frame = frame.assign(lr=float("nan"))
        if "selected" not in frame.columns:  # a table written before lrs were chosen on held-out data
            frame = frame.assign(selected=False)
        meta = _sidecar(table)
        frames.append(frame.assign(run=str(table.parent), data_root=_data_root(meta), random_init=_random_init(meta)))
    return _tell_datasets_apart(pd.concat(frames, ignore_index=True))
