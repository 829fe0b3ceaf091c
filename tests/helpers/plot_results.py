"""Made-up per-(model, block, head) result tables for the plot tests, with known values."""

from __future__ import annotations

import numpy as np
import pandas as pd

from attnflow.result import COLUMNS, Result

METRICS = ("cls_self", "cls_patch_entropy", "patch_self", "patch_patch_entropy")


def value(model_i: int, block: int, head: int, metric_i: int) -> float:
    """The made-up per-head mean of the test tables (distinct per model, block, head and metric)."""
    return 0.1 * model_i + 0.5 * block + 0.03 * head ** 2 + 1.7 * metric_i


def make_result(models: dict[str, dict], n_blocks: int = 3, n_heads: int = 3, nan_cls: tuple[str, ...] = ()
                ) -> Result:
    """One run per model; ``models`` maps a name to its provenance (family, size, ...)."""
    results = []
    for i, (name, meta) in enumerate(models.items()):
        rows = []
        for k, metric in enumerate(METRICS):
            for b in range(n_blocks):
                for h in range(n_heads):
                    missing = name in nan_cls and metric.startswith("cls")
                    mean = np.nan if missing else value(i, b, h, k)
                    std = np.nan if missing else 0.01 * (h + 1) + 0.001 * b
                    rows.append((name, b, h, metric, mean, std, 0 if missing else 10))
        results.append(Result(pd.DataFrame(rows, columns=COLUMNS), {"model": name, "n_patches": 196, **meta}))
    return Result.concat(results)


FAMILIES = {"mim": {"family": "MIM"}, "jea": {"family": "JEA"}, "ft": {"family": "MIM+FT"}}
