"""``attnflow localize``: MaxBoxAccV2 of the [cls] attention map, a Selective Aggregation head's map and (asked for)
the attention-rollout map (paper Appendix C.3: Table 7 and Fig. 8)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .common import (Resumable, add_loop_arguments, add_model_arguments, add_name_argument, cam_curve_interval,
                     check_data_and_amp, is_random, load_model_from, non_negative_int, output_dir, positive_int,
                     print_skipped, run_resumable)

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


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..localize.boxes import BOX_FORMATS
    from ..localize.protocol import INTERPOLATIONS

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
    add_name_argument(parser)
    parser.add_argument("--head", metavar="PATH",
                        help="a trained probe head of this model (e.g. runs/probe/seed0/heads/abmilp.pt): also "
                             "localize with its Selective Aggregation map (models without [cls] need it or --rollout)")
    parser.add_argument("--rollout", action="store_true",
                        help="also localize with the attention-rollout map (Abnar & Zuidema 2020: every block's "
                             "attention averaged over heads, 0.5 A + 0.5 I, multiplied from the first block; the "
                             "[cls] row, without [cls] the mean of the patch rows); taps every block (slower)")
    add_model_arguments(parser)
    protocol = parser.add_argument_group("protocol (default: wsolevaluation's)")
    protocol.add_argument("--interpolation", default="bilinear", choices=INTERPOLATIONS,
                          help="image resizing (default bilinear, as wsolevaluation)")
    protocol.add_argument("--iou-thresholds", type=iou_list, default=[30, 50, 70], metavar="D,D,...",
                          help="IoU thresholds in percent (default 30,50,70)")
    protocol.add_argument("--cam-curve-interval", type=cam_curve_interval, default=0.01,
                          help="spacing of the score-map thresholds, in [0.001, 1) (default 0.01)")
    protocol.add_argument("--no-hole-contours", dest="holes", action="store_false",
                          help="boxes of outer contours only (wsolevaluation also counts holes: OpenCV RETR_TREE)")
    add_loop_arguments(parser, limit="images that have boxes")
    parser.add_argument("--threads", type=positive_int, help="box-search threads (default min(8, CPUs))")
    parser.add_argument("--examples", type=non_negative_int, default=8,
                        help="images in the Fig. 8-style example figure (default 8; 0: none)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..localize.protocol import BoxProtocol
    from ..localize.result import TABLE

    check_data_and_amp(args.data, args.amp, args.device, args.decode)
    protocol = BoxProtocol(tuple(args.iou_thresholds), args.cam_curve_interval, args.holes, args.interpolation)
    out = output_dir(args.out, "localize")
    spec = Resumable("localize", out / f"{TABLE}.parquet", out / STATE, out)
    return run_resumable(args, spec, lambda: _load(args),
                         lambda loaded, options: _compute(args, protocol, loaded, options),
                         lambda result, path: _report(args, result, path, out))


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from ..dist import current_world
    from ..localize.boxes import read_boxes
    from ..probes.outputs import load_head

    truth = read_boxes(args.boxes, args.boxes_format)
    head = load_head(args.head) if args.head else None
    model = load_model_from(args)
    if is_random(model) and current_world().is_main:
        print("attnflow: random weights: the localization scores are meaningless", flush=True)
    return model, truth, head


def _compute(args: argparse.Namespace, protocol: Any, loaded: tuple[Any, Any, Any], options: Any) -> Any:
    from ..localize.evaluate import localize

    model, truth, head = loaded
    return localize(model, args.data, truth, options, head=head,
                    model_name=args.name or args.model, img_size=args.img_size, protocol=protocol,
                    threads=args.threads, examples=args.examples, rollout=args.rollout)


def _report(args: argparse.Namespace, result: Any, path: Path, out: Path) -> None:
    written = [f"{path} (+ .csv, .json)", str(out / "curve.parquet")]
    if result.examples:
        written.append(str(_write_examples(result, out, bool(result.meta.get("random_init")), args.model)))
    _print_summary(result.frame, result.meta, path.with_suffix(".json"))
    print("wrote " + ", ".join(written))


def _write_examples(result: Any, out: Path, random_init: bool, model: str) -> Path:
    from ..plot.localization import plot_localization_examples
    from ..plot.style import close, save_figure

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    fig = plot_localization_examples(result.examples, result.labels, random_init=random_init,
                                     title=f"{model}: boxes at each map's best threshold (IoU 50)")
    for suffix in ("pdf", "png"):
        save_figure(fig, out / f"{EXAMPLES}.{suffix}")
    close(fig)
    return out / f"{EXAMPLES}.pdf"


def _print_summary(frame: Any, meta: dict, sidecar: Path) -> None:
    ious = [int(d) for d in meta["iou_thresholds"]]
    width = max(len(str(label)) for label in frame["label"])
    print(f"{'map':<{width}s}  MaxBoxAccV2  " + "  ".join(f"IoU{d:>3d} (thr)" for d in ious))
    for source, rows in frame.groupby("source", sort=False):
        v2 = rows[rows["metric"] == "MaxBoxAccV2"]["value"].iloc[0]
        per = rows[rows["metric"] == "MaxBoxAcc"]
        cells = "  ".join(f"{r.value:5.1f} ({r.best_cam_threshold:.2f})" for r in per.itertuples())
        print(f"{rows['label'].iloc[0]:<{width}s}  {v2:11.1f}  {cells}")
    print(f"{meta['images_used']} images evaluated")
    print_skipped(meta, sidecar)
    if meta["images_without_boxes"]:
        print(f"{meta['images_without_boxes']} image(s) of the folder have no box in {meta['boxes']['path']} and "
              f"were not evaluated (first: {meta['without_boxes'][0]})")
