"""``attnflow plot``: per-block comparison figures from stored results (the paper's Figs. 3-6 and 10-13), and probe
accuracy per block (runs of ``attnflow probe --blocks``) alone or next to them."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import AttnflowError
from .common import dpi

WIDTHS = {"single": 3.3, "double": 6.9}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "plot", help="per-block figures from result tables",
        description="Draw per-block comparisons of one or more runs (written by `attnflow stats`): one line "
                    "per model, a band for the spread over heads or images, the ln(N) bound for entropies. "
                    "One metric gives a single-column plot, several give one panel each; --by-size gives "
                    "the ViT-S/B/L grid of the paper's Figs. 10-13. --probes adds a panel of probe top-1 "
                    "against block (runs of `attnflow probe --blocks`), or draws it alone without RESULT. The "
                    "format follows --out's extension.")
    parser.add_argument("results", nargs="*", metavar="RESULT",
                        help="result files (.parquet/.csv) or folders of .parquet files")
    parser.add_argument("--out", required=True, help="output figure (.pdf, .png, .svg or .eps)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--metric", action="append", metavar="NAME",
                      help="metric to draw (repeatable; default: the paper's four)")
    what.add_argument("--all", action="store_true", help="every metric in the results")
    parser.add_argument("--band", default="heads", choices=["heads", "heads-std", "images", "none"],
                        help="spread around each line: min-max over heads (default), +-1 std over heads, "
                             "+-1 std over images, or none")
    parser.add_argument("--model", action="append", metavar="NAME", help="models to draw, in order (repeatable)")
    parser.add_argument("--by-size", action="store_true", help="grid: one column per model size (ViT-S/B/L)")
    parser.add_argument("--per-head", action="store_true",
                        help="also write a block x head heatmap per metric (OUT-heads-METRIC.EXT)")
    parser.add_argument("--width", default=None,
                        help="figure width: single (3.3 in), double (6.9 in) or inches "
                             "(default: single for one metric, else double)")
    parser.add_argument("--probes", action="append", metavar="RUN",
                        help="probe run directory or results table of `attnflow probe --blocks` (repeatable): "
                             "a panel of top-1 against block after the metrics' panels, or alone without RESULT")
    parser.add_argument("--probe-heads", default="cls,avg,abmilp", metavar="LIST",
                        help="heads drawn in the probe panel (default cls,avg,abmilp)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--dpi", type=dpi, default=300, help="resolution of PNG output (default 300)")
    parser.set_defaults(func=run)
    return parser


def result_paths(items: list[str]) -> list[Path]:
    """Expand folders to their ``*.parquet`` files; every item must exist."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise AttnflowError(f"{p}: the folder holds no .parquet result")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise AttnflowError(f"{p}: no such result file or folder")
    return paths


def read_results(items: list[str]):
    """Read and concatenate result files, turning I/O and format problems into one-line errors."""
    from ..result import Result

    results = []
    for path in result_paths(items):
        try:
            results.append(Result.read(path))
        except AttnflowError:  # already one line naming the file
            raise
        except (OSError, ValueError, KeyError) as err:
            raise AttnflowError(f"{path}: cannot read a result table ({err})") from err
    return Result.concat(results)


def _width(text: str | None, n_metrics: int) -> float:
    """The figure width in inches (:func:`attnflow.limits.check_figure_width`)."""
    from ..limits import check_figure_width

    if text is None:
        return WIDTHS["single" if n_metrics == 1 else "double"]
    if text in WIDTHS:
        return WIDTHS[text]
    try:
        value = float(text)
    except ValueError:
        raise AttnflowError(f"--width must be single, double or inches, got {text!r}") from None
    check_figure_width(value, name="--width")
    return value


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from ..plot import PAPER_METRICS, METRIC_LABELS, plot_blocks, plot_heads, plot_metrics, plot_size_grid
    from ..plot.style import SAVE_FORMATS, check_metrics, close, root_figure, save_figure

    out = Path(args.out)
    if out.suffix.lower().lstrip(".") not in SAVE_FORMATS:
        raise AttnflowError(f"--out {out}: use one of {', '.join('.' + f for f in SAVE_FORMATS)}")
    if not args.results and not args.probes:
        raise AttnflowError("nothing to plot: give RESULT files of `attnflow stats` and/or --probes RUN")
    if args.probes and args.by_size:
        raise AttnflowError("--by-size draws statistics only; leave out --probes")
    if not args.results:
        return _probe_figure(args, out)
    result = read_results(args.results)
    available = result.metrics
    if args.all:
        metrics = [m for m in METRIC_LABELS if m in available] + [m for m in available if m not in METRIC_LABELS]
    elif args.metric:
        metrics = list(dict.fromkeys(args.metric))
        check_metrics(metrics, available)
    else:
        metrics = [m for m in PAPER_METRICS if m in available] or available
    width = _width(args.width, len(metrics))
    common = dict(band=args.band, models=args.model)
    if args.probes:
        from ..plot import plot_blocks_with_probes

        fig = plot_blocks_with_probes(result, args.probes, metrics, heads=_heads(args.probe_heads),
                                      width=_width(args.width, len(metrics) + 1), title=args.title, **common)
    elif args.by_size:
        fig = plot_size_grid(result, metrics, width=width, title=args.title, **common)
    elif len(metrics) == 1:
        fig = root_figure(plot_blocks(result, metrics[0], title=args.title, **common))
        fig.set_size_inches(width, fig.get_figheight())
    else:
        fig = plot_metrics(result, metrics, width=width, title=args.title, **common)
    written = [save_figure(fig, out, dpi=args.dpi)]
    close(fig)
    if args.per_head:
        for metric in metrics:
            fig = plot_heads(result, metric, models=args.model, width=max(width, WIDTHS["double"]))
            written.append(save_figure(fig, out.with_name(f"{out.stem}-heads-{metric}{out.suffix}"), dpi=args.dpi))
            close(fig)
    for path in written:
        print(f"wrote {path}")
    return 0


def _heads(text: str) -> list[str]:
    return [h.strip() for h in text.split(",") if h.strip()]


def _probe_figure(args: argparse.Namespace, out: Path) -> int:
    """Probe top-1 against block alone (no statistics given)."""
    from ..plot import plot_probe_blocks
    from ..plot.style import close, root_figure, save_figure

    fig = root_figure(plot_probe_blocks(args.probes, heads=_heads(args.probe_heads), models=args.model,
                                        title=args.title))
    fig.set_size_inches(_width(args.width, 1), fig.get_figheight())
    print(f"wrote {save_figure(fig, out, dpi=args.dpi)}")
    close(fig)
    return 0
