"""``attnflow localize``: MaxBoxAccV2 of the [cls] attention map and a Selective Aggregation head's map
(paper Appendix C.3: Table 7 and Fig. 8)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..errors import AttnflowError
from .stats_cmd import (add_model_arguments, add_resume_arguments, check_data_and_amp, non_negative_int,
                        nothing_to_resume, parse_model_kwargs, positive_int, reported_by_rank0,
                        sigterm_as_interrupt, write_and_release)

EXAMPLES = "examples"
"""Stem of the example figure written into ``--out``."""

STATE = "localization.state.pt"
"""The resumable state of a run, inside ``--out`` (one file per process under torchrun)."""


def iou_list(text: str) -> list[int]:
    """``"30,50,70"`` -> ``[30, 50, 70]`` (percent)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole percentages such as 30,50,70, got "
                                         f"{text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"IoU thresholds must be percentages in 1..100, got {text!r}")
    return values


def interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"the cam curve interval must be in (0, 1), got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..localize.boxes import BOX_FORMATS
    from .aggregate_cmd import add_loop_arguments
    from ..localize.data import INTERPOLATIONS

    parser = sub.add_parser(
        "localize", help="object localization of [cls] and Selective Aggregation maps, MaxBoxAccV2 (Table 7)",
        description="Localize objects with the last block's [cls] attention map (mean over heads) and a trained "
                    "Selective Aggregation head's map, and score the boxes with MaxBoxAccV2 exactly as "
                    "clovaai/wsolevaluation does (whole image resized to a square, bicubic score maps, 100 "
                    "thresholds, every contour's box, IoU 30/50/70).")
    parser.add_argument("--model", required=True, help="preset (see `attnflow models`) or timm architecture")
    parser.add_argument("--data", required=True, help="image folder (recursive; ImageNet-val flat or class folders)")
    parser.add_argument("--boxes", required=True,
                        help="ground-truth boxes: ILSVRC2012_bbox_val_v3.tgz or its extracted folder, Kaggle's "
                             "LOC_val_solution.csv, a wsolevaluation metadata folder, or a CSV path,x1,y1,x2,y2")
    parser.add_argument("--boxes-format", default="auto", choices=BOX_FORMATS, help="default: detect")
    parser.add_argument("--out", required=True,
                        help="output directory (localization.parquet/.csv/.json, curve.parquet/.csv, examples.pdf)")
    parser.add_argument("--head", metavar="PATH",
                        help="a trained probe head of this model (e.g. runs/probe/seed0/heads/abmilp.pt): also "
                             "localize with its Selective Aggregation map (required for models without [cls])")
    add_model_arguments(parser)
    parser.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                        help="image resizing (default bilinear, as wsolevaluation)")
    parser.add_argument("--iou-thresholds", type=iou_list, default=[30, 50, 70], metavar="D,D,...",
                        help="IoU thresholds in percent (default 30,50,70)")
    parser.add_argument("--cam-curve-interval", type=interval, default=0.01,
                        help="spacing of the score-map thresholds (default 0.01)")
    parser.add_argument("--no-hole-contours", dest="holes", action="store_false",
                        help="boxes of outer contours only (wsolevaluation also counts holes: OpenCV RETR_TREE)")
    add_loop_arguments(parser)
    parser.add_argument("--threads", type=positive_int, help="box-search threads (default min(8, CPUs))")
    parser.add_argument("--limit", type=positive_int, help="use N evenly spaced images that have boxes")
    parser.add_argument("--examples", type=non_negative_int, default=8,
                        help="images in the Fig. 8-style example figure (default 8; 0: none)")
    add_resume_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..dist import process_group

    check_data_and_amp(args.data, args.amp, args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AttnflowError(f"--out {out} is a file; localize writes a directory there")
    with process_group(args.device) as (world, device):
        return _run(args, out, world, device)


def _run(args: argparse.Namespace, out: Path, world: Any, device: Any) -> int:
    from ..data.images import DataError
    from ..localize.boxes import BoxFileError, read_boxes
    from ..localize.evaluate import localize
    from ..localize.metric import LocalizationError
    from ..localize.result import TABLE
    from ..models.load import load_model
    from ..probes.outputs import load_head

    state = out / STATE
    with reported_by_rank0(command="localize"):  # the same arguments and files in every process
        if nothing_to_resume(out / f"{TABLE}.parquet", state, world.rank, world.size, args.resume):
            return 0
        truth = read_boxes(args.boxes, args.boxes_format)
        head = load_head(args.head) if args.head else None
        model = load_model(args.model, checkpoint=args.checkpoint, random_init=args.random_init,
                           img_size=args.img_size, checkpoint_key=args.checkpoint_key,
                           **parse_model_kwargs(args.model_kw))
    random_init = bool((getattr(model, "attnflow_info", None) or {}).get("random_init", args.random_init))
    if random_init and world.is_main:
        print("attnflow: random weights: the localization scores are meaningless", flush=True)
    # errors of the arguments and the data, which every process meets alike
    with sigterm_as_interrupt(), reported_by_rank0((DataError, BoxFileError, LocalizationError), command="localize"):
        result = localize(model, args.data, truth, head=head, head_path=args.head, model_name=args.model,
                          batch_size=args.batch_size, device=device, amp=args.amp, num_workers=args.workers,
                          img_size=args.img_size, interpolation=args.interpolation, limit=args.limit,
                          iou_thresholds=args.iou_thresholds, cam_curve_interval=args.cam_curve_interval,
                          holes=args.holes, threads=args.threads, examples=args.examples,
                          progress=not args.no_progress, state_path=state, checkpoint_every=args.checkpoint_every,
                          resume=args.resume, keep_state=True)
        path = write_and_release(result, out, state, world.rank, world.size)
    if not world.is_main or path is None:
        return 0
    written = [f"{path} (+ .csv, .json)", str(out / "curve.parquet")]
    if result.examples:
        written.append(str(_write_examples(result, out, random_init, args.model)))
    _print_summary(result.frame, result.meta)
    print("wrote " + ", ".join(written))
    return 0


def _write_examples(result: Any, out: Path, random_init: bool, model: str) -> Path:
    from ..localize.figure import plot_localization_examples
    from ..plot.style import close, save_figure

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    fig = plot_localization_examples(result.examples, result.labels, random_init=random_init,
                                     title=f"{model}: boxes at each map's best threshold (IoU 50)")
    for suffix in ("pdf", "png"):
        save_figure(fig, out / f"{EXAMPLES}.{suffix}")
    close(fig)
    return out / f"{EXAMPLES}.pdf"


def _print_summary(frame: Any, meta: dict) -> None:
    ious = [int(d) for d in meta["iou_thresholds"]]
    width = max(len(str(label)) for label in frame["label"])
    print(f"{'map':<{width}s}  MaxBoxAccV2  " + "  ".join(f"IoU{d:>3d} (thr)" for d in ious))
    for source, rows in frame.groupby("source", sort=False):
        v2 = rows[rows["metric"] == "MaxBoxAccV2"]["value"].iloc[0]
        per = rows[rows["metric"] == "MaxBoxAcc"]
        cells = "  ".join(f"{r.value:5.1f} ({r.best_cam_threshold:.2f})" for r in per.itertuples())
        print(f"{rows['label'].iloc[0]:<{width}s}  {v2:11.1f}  {cells}")
    print(f"{meta['images_used']} images evaluated")
    if meta["images_skipped"]:
        print(f"skipped {meta['images_skipped']} unreadable file(s):")
        for item in meta["skipped"][:20]:
            print(f"  {item['path']}: {item['reason']}")
    if meta["images_without_boxes"]:
        print(f"{meta['images_without_boxes']} image(s) of the folder have no box in {meta['boxes']['path']} and "
              f"were not evaluated (first: {meta['without_boxes'][0]})")
