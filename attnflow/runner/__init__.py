"""Analyses: configs that name models, data and figures; ``attnflow run`` computes what is missing and renders.

::

    from attnflow.runner import load_config, plan_run, execute
    plan = plan_run(load_config("analyses/fig3_6_vit_b.toml").with_overrides(data="/data/imagenet/val"))
    print("\\n".join(plan.describe()))
    outcome = execute(plan)
"""

from .cache import RunKey, ShaCache, Stored, find_stored, key_matches, stored_results
from .config import (FIGURE_KINDS, AnalysisConfig, ConfigError, FigureEntry, ModelEntry, load_config,
                     parse_config)
from .execute import Job, Plan, RunOutcome, execute, load_entry, plan_run, render_figures

__all__ = ["FIGURE_KINDS", "AnalysisConfig", "ConfigError", "FigureEntry", "Job", "ModelEntry", "Plan", "RunKey",
           "RunOutcome", "ShaCache", "Stored", "execute", "find_stored", "key_matches", "load_config", "load_entry",
           "parse_config", "plan_run", "render_figures", "stored_results"]
