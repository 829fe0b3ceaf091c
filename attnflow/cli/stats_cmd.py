"""``attnflow stats``: per-(block, head) attention statistics of one model over an image folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..kernels import QK_KERNELS
from .common import (Resumable, add_loop_arguments, add_model_arguments, add_name_argument, check_data_and_amp,
                     crop_fraction, is_random, load_model_from, output_table, print_skipped,
                     run_resumable)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "stats", help="attention statistics of a model over an image folder",
        description="Per-(block, head) attention statistics ([cls]-self attention, [cls]-patch entropy, "
                    "patch-self ratio, patch-patch entropy, ...) over every image of a folder. Works under "
                    "torchrun for several GPUs.")
    parser.add_argument("--model", required=True, help="preset (see `attnflow models`) or timm architecture")
    parser.add_argument("--data", required=True, help="image folder (recursive; class folders or flat files)")
    parser.add_argument("--out", required=True, help="output table, e.g. runs/mae-b16.parquet (+ .csv, .json)")
    add_name_argument(parser)
    add_model_arguments(parser)
    parser.add_argument("--crop-pct", type=crop_fraction, help="override the model's center-crop fraction")
    add_loop_arguments(parser)
    engine = parser.add_argument_group("engine (the numbers are the same either way)")
    engine.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the statistics (default: on for a GPU, off on the CPU)")
    engine.add_argument("--no-compile", dest="compile", action="store_false")
    engine.add_argument("--fast-qk", dest="fast_qk", action="store_true", default=None,
                        help="keep fused attention in plain ViT blocks and rebuild the map from queries and keys "
                             "(default: on for GPU)")
    engine.add_argument("--no-fast-qk", dest="fast_qk", action="store_false",
                        help="tap every block's materialised map (the reference route)")
    engine.add_argument("--qk-kernel", choices=QK_KERNELS, default="auto",
                        help="with --fast-qk: the Triton kernel (auto: on CUDA, checked against torch on the "
                             "first batch) or the torch route (default auto)")
    parser.set_defaults(func=run)
    return parser


def state_path_for(out: Path) -> Path:
    """Where the resumable state of a run writing ``out`` lives."""
    return out.with_name(out.stem + ".state.pt")


def run(args: argparse.Namespace) -> int:
    check_data_and_amp(args.data, args.amp, args.device, args.decode)  # before loading a model, which can take a minute
    out = output_table(args.out)
    spec = Resumable("stats", out, state_path_for(out), out)
    return run_resumable(args, spec, lambda: _load(args), lambda model, options: _compute(args, model, options),
                         _report)


def _load(args: argparse.Namespace) -> Any:
    from ..dist import current_world

    model = load_model_from(args)
    if is_random(model) and current_world().is_main:
        print("attnflow: --random-init: weights are random, the statistics are meaningless", flush=True)
    return model


def _compute(args: argparse.Namespace, model: Any, options: Any) -> Any:
    from ..stats import attention_stats

    return attention_stats(model, Path(args.data), options, img_size=args.img_size, crop_pct=args.crop_pct,
                           model_name=args.name or args.model, compile=args.compile, fast_qk=args.fast_qk,
                           qk_kernel=args.qk_kernel)


def _report(result: Any, path: Path) -> None:
    meta = result.meta
    L, H = result.frame["block"].nunique(), result.frame["head"].nunique()
    print(f"wrote {path} (+ .csv, .json): {L} blocks x {H} heads x {len(result.metrics)} metrics "
          f"over {meta['images_used']} images")
    print_skipped(meta, path.with_suffix(".json"))
