"""``attnflow aggregate``: entropy and pairwise KL divergence of non-trainable token aggregation vectors
(paper Appendix C.2: Table 5's entropy column and Fig. 7)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, cast

from ..errors import AttnflowError
from .common import (Resumable, add_loop_arguments, add_model_arguments, add_name_argument, add_reference_arguments,
                     check_data_and_amp, crop_fraction, is_random, load_model_from, output_dir, print_skipped,
                     run_resumable)

TABLE = "aggregation"
"""Stem of the table written into ``--out``."""

STATE = "aggregation.state.pt"
"""The resumable state of a run, inside ``--out`` (one file per process under torchrun)."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "aggregate", help="entropy and KL divergence of fixed token aggregation vectors (Table 5, Fig. 7)",
        description="Non-trainable token aggregation (paper Appendix C.2): over an image folder, the mean entropy "
                    "of each approach's aggregation vectors (average [cls] attention, lowest-entropy [cls] head, "
                    "central patch attention, a reference model's [cls] attention, a trained AbMILP head) and "
                    "the mean KL divergence between every pair. Accuracies: attnflow probe --aggregation.")
    parser.add_argument("--model", required=True, help="preset (see `attnflow models`) or timm architecture")
    parser.add_argument("--data", required=True, help="image folder (recursive; class folders or flat files)")
    parser.add_argument("--out", required=True, help=f"output directory ({TABLE}.parquet/.csv/.json, kld.pdf/.png)")
    add_name_argument(parser)
    parser.add_argument("--reference", metavar="MODEL", help="reference model, e.g. dino-vit-b16")
    parser.add_argument("--head", metavar="PATH", help="a trained probe head (e.g. runs/probe/seed0/heads/abmilp.pt)")
    parser.add_argument("--sources", help="comma-separated sources (default: Table 5's that fit): cls_mean, "
                                          "cls_min_entropy, central, reference:<name>, head:<spec>; also caK, cpK "
                                          "(central KxK window), patch:R,C, rollout (attention rollout of every "
                                          "block: not a default, it taps every block)")
    add_model_arguments(parser)
    add_reference_arguments(parser)
    parser.add_argument("--crop-pct", type=crop_fraction, help="override the model's center-crop fraction")
    add_loop_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    check_data_and_amp(args.data, args.amp, args.device, args.decode)
    sources = _check_sources(args)
    out = output_dir(args.out, "aggregate")
    spec = Resumable("aggregate", out / f"{TABLE}.parquet", out / STATE, out / f"{TABLE}.parquet")
    return run_resumable(args, spec, lambda: _load(args),
                         lambda loaded, options: _compute(args, sources, loaded, options),
                         lambda result, path: _report(result, path, out))


def _check_sources(args: argparse.Namespace) -> list[str] | None:
    """The ``--sources``, parsed (an unknown name fails before any model is built) and checked against the
    ``--reference`` and ``--head`` given."""
    from ..aggregation.sources import parse_source, reference_mismatch

    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    for text in sources or []:
        source = parse_source(text, allow_head=True)
        if source.kind == "reference" and args.reference and source.target != args.reference:
            raise AttnflowError(reference_mismatch(source, args.reference))
        if source.kind == "reference" and not args.reference:
            raise AttnflowError(f"source {source.name} needs a reference model: add --reference {source.target}")
        if source.kind == "head" and not args.head:
            raise AttnflowError(f"source {source.name} needs a trained head: add --head PATH")
    ref_opts = args.reference_checkpoint or args.reference_random_init or args.reference_model_kw
    if ref_opts and not args.reference:
        raise AttnflowError("--reference-* options need --reference MODEL")
    return sources


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from ..aggregation.capture import check_reference
    from ..dist import current_world
    from ..probes.outputs import load_head

    head = load_head(args.head) if args.head else None
    model = load_model_from(args)
    reference = load_model_from(args, args.reference, prefix="reference-") if args.reference else None
    if reference is not None:
        check_reference(model, reference, args.img_size, model_name=args.model, reference_name=args.reference)
    if (is_random(model) or (reference is not None and is_random(reference))) and current_world().is_main:
        print("attnflow: random weights: the statistics are meaningless", flush=True)
    return model, reference, head


def _compute(args: argparse.Namespace, sources: list[str] | None, loaded: tuple[Any, Any, Any], options: Any) -> Any:
    from ..aggregation.analysis import aggregation_statistics

    model, reference, head = loaded
    return aggregation_statistics(model, args.data, options, reference=reference, reference_name=args.reference,
                                  head=head, sources=sources, img_size=args.img_size,
                                  crop_pct=args.crop_pct, model_name=args.name or args.model)


def _report(result: Any, path: Path, out: Path) -> None:
    import logging

    from matplotlib.figure import Figure

    from ..plot.kld import plot_kld_heatmap
    from ..plot.style import close, paper_style, save_figure

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    with paper_style():
        random = bool(result.meta.get("random_init") or (result.meta.get("reference") or {}).get("random_init"))
        fig = cast(Figure, plot_kld_heatmap(result.frame, labels=result.labels, sources=result.sources,
                                            random_init=random).figure)
        for suffix in ("pdf", "png"):
            save_figure(fig, out / f"kld.{suffix}")
    close(fig)
    frame, labels, meta = result.frame, result.labels, result.meta
    width = max(len(v) for v in labels.values())
    print(f"{'aggregation':<{width}s}  entropy (max ln {meta['n_patches']} = "
          f"{math.log(meta['n_patches']):.2f})")
    for row in frame[frame["metric"] == "entropy"].itertuples():
        print(f"{labels[row.source]:<{width}s}  {row.mean:.3f}")
    print(f"wrote {path} (+ .csv, .json), {out / 'kld.pdf'} (+ .png): {meta['images_used']} images")
    print_skipped(meta, path.with_suffix(".json"))
    floored = frame[(frame["metric"] == "kld") & (frame["q_zero_images"] > 0)]
    if len(floored):
        print(f"note: {len(floored)} KLD pair(s) met q = 0 in float32 (floored at 1.2e-38; a lower bound), "
              "see the q_zero_images column")
