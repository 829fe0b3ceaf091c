"""``attnflow run CONFIG``: compute the statistics an analysis lacks (cached in its run directory), render it."""

from __future__ import annotations

import argparse

from .common import (add_decode_argument, add_device_argument, add_limit_argument, add_progress_argument,
                     add_workers_argument)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "run", help="run an analysis config (analyses/*.toml): compute what is missing, render the figures",
        description="Read an analysis config (see analyses/README.md; --limit, --batch-size, --workers and --decode "
                    "override its [data] settings), reuse every result its run directory "
                    "already holds for the same model, weights (sha256), data and resolution, compute the rest "
                    "(an interrupted computation resumes where it stopped) and render the config's figures.")
    parser.add_argument("config", help="analysis config, e.g. analyses/fig3_6_vit_b.toml")
    parser.add_argument("--data", metavar="DIR", help="the data root (image folder); overrides the config's data.root")
    parser.add_argument("--run-dir", metavar="DIR", help="where results are cached (default: the config's run_dir)")
    add_limit_argument(parser)
    parser.add_argument("--random-init", action="store_true",
                        help="every model without weights (smoke test; cached apart from real runs)")
    add_device_argument(parser)
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    add_workers_argument(parser)
    add_decode_argument(parser, default=None)  # not given: the config's data.decode (default auto)
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be reused and computed; do nothing (no --data needed: a missing data "
                             "root is reported, not checked)")
    parser.add_argument("--no-figures", action="store_true", help="compute the statistics only")
    add_progress_argument(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from ..options import decode_mode, resolve_device
    from ..runner import execute, load_config, plan_run
    from ..runner.figures import quiet_random_init_warnings

    device = resolve_device(args.device)  # before the plan hashes any weights
    cfg = load_config(args.config).with_overrides(
        data=args.data, run_dir=args.run_dir, limit=args.limit, random_init=args.random_init,
        batch_size=args.batch_size, workers=args.workers, decode=args.decode)
    decode_mode(cfg.decode, device)  # --decode gpu without CUDA: one line, before anything runs
    plan = plan_run(cfg, require_data=not args.dry_run)  # a dry run says what data is missing
    for line in plan.describe(dry_run=args.dry_run):
        print(line, flush=True)
    if args.dry_run:
        return 0
    random = any(m.random_init for m in cfg.models)
    if random:
        names = ", ".join(m.id for m in cfg.models if m.random_init)
        print(f"attnflow run: RANDOM-INIT WEIGHTS ({names}): their numbers are meaningless", flush=True)
    with quiet_random_init_warnings(random):  # said once here, and stamped on each figure
        outcome = execute(plan, device=args.device, progress=not args.no_progress, figures=not args.no_figures,
                          echo=lambda line: print(line, flush=True))
    for path in outcome.figures:
        print(f"wrote {path}")
    print(f"done: {len(outcome.computed)} computed, {len(outcome.reused)} reused, {len(outcome.figures)} figure "
          f"files in {cfg.figures_dir}")
    return 0
