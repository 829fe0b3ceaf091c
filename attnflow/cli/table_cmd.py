"""``attnflow table``: Table 1/2/6-style summaries of probe runs (Markdown, LaTeX or CSV)."""

from __future__ import annotations

import argparse
import sys

from .common import digits


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "table", help="summarise probe runs: rows = models, columns = heads, mean ± std over seeds",
        description="Reads the results tables of probe runs (run directories, searched recursively, or "
                    "results.parquet/.csv files) and renders top-1 accuracy per model and head, each head at the "
                    "lr its runs kept (chosen on held-out training images, or the only one). Heads follow --heads, "
                    "else the paper's order (avg, cls, abmilp, abmilp+cls, ..., ap1, ap12); a model trained with "
                    "random weights is marked with a dagger.")
    parser.add_argument("runs", nargs="+", help="probe run directories or result tables (globs are fine)")
    parser.add_argument("--out", help="output file, by extension: .md (Markdown), .tex (LaTeX tabular, booktabs) "
                                      "or .csv (tidy: model, task, head, lr, mean, std, n_seeds, random_init); "
                                      "written atomically; default: print Markdown")
    parser.add_argument("--value", choices=["final", "best"], default="final",
                        help="top-1 at the last evaluated epoch (default) or the best epoch")
    parser.add_argument("--lr", choices=["best", "all"], default="best",
                        help="with lr grids: each head at the lr its runs kept (default; a grid without a held-out "
                             "choice: the best mean) or every lr")
    parser.add_argument("--heads", help="only these head specs, comma-separated, in this order")
    parser.add_argument("--task", help="only this task")
    parser.add_argument("--digits", type=digits, default=1, help="decimals (default 1, as the paper)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import AttnflowError
    from ..probes.outputs import read_run_tables
    from ..probes.summary import check_heads_present, summarize, to_markdown, write_summary

    frame = read_run_tables(args.runs)
    if args.task:
        frame = frame[frame["task"] == args.task]
    wanted = [h.strip() for h in args.heads.split(",") if h.strip()] if args.heads else None
    if wanted:
        check_heads_present(frame, wanted)
        frame = frame[frame["head"].isin(wanted)]
    if frame.empty:
        raise AttnflowError("no rows left after --task/--heads filtering")
    summary = summarize(frame, value=args.value, lr=args.lr, heads=wanted)
    if args.out:
        path = write_summary(summary, args.out, digits=args.digits, heads=wanted)
        print(f"wrote {path}")
    else:
        sys.stdout.write(to_markdown(summary, digits=args.digits, heads=wanted))
    return 0
