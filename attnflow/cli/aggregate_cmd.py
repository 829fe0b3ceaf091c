"""``attnflow aggregate``: entropy and pairwise KL divergence of non-trainable token aggregation vectors
(paper Appendix C.2: Table 5's entropy column and Fig. 7)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, cast

from ..errors import AttnflowError
from .stats_cmd import (add_model_arguments, add_resume_arguments, check_data_and_amp, crop_fraction,
                        non_negative_int, nothing_to_resume, parse_model_kwargs, positive_int, reported_by_rank0,
                        sigterm_as_interrupt, write_and_release)

TABLE = "aggregation"
"""Stem of the table written into ``--out``."""

STATE = "aggregation.state.pt"
"""The resumable state of a run, inside ``--out`` (one file per process under torchrun)."""


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that build the reference model of a ``reference:<name>`` aggregation."""
    group = parser.add_argument_group("reference model (its [cls] attention weighs this model's patch tokens)")
    group.add_argument("--reference-checkpoint", metavar="PATH", help="local weights of the reference model")
    group.add_argument("--reference-checkpoint-key", metavar="KEY", help="top-level key of the reference weights")
    group.add_argument("--reference-random-init", action="store_true",
                       help="build the reference without weights (smoke tests)")
    group.add_argument("--reference-model-kw", action="append", default=[], metavar="KEY=VALUE",
                       help="extra timm.create_model argument of the reference (repeatable)")


def load_reference(args: argparse.Namespace, name: str) -> Any:
    """Build the reference model ``name`` from the ``--reference-*`` options, at the run's ``--img-size``."""
    from ..models.load import load_model

    return load_model(name, checkpoint=args.reference_checkpoint, random_init=args.reference_random_init,
                      img_size=args.img_size, checkpoint_key=args.reference_checkpoint_key,
                      **parse_model_kwargs(args.reference_model_kw))


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
    parser.add_argument("--reference", metavar="MODEL", help="reference model, e.g. dino-vit-b16")
    parser.add_argument("--head", metavar="PATH", help="a trained probe head (e.g. runs/probe/seed0/heads/abmilp.pt)")
    parser.add_argument("--sources", help="comma-separated sources (default: every one that fits): cls_mean, "
                                          "cls_min_entropy, central, reference:<name>, head:<spec>")
    add_model_arguments(parser)
    add_reference_arguments(parser)
    parser.add_argument("--crop-pct", type=crop_fraction, help="override the model's center-crop fraction")
    add_loop_arguments(parser)
    parser.add_argument("--limit", type=positive_int, help="use N evenly spaced images (deterministic subset)")
    add_resume_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset loop's options of ``aggregate`` and ``localize``: batch size, DataLoader workers, device and
    autocast."""
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers (default 0)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                        help="autocast dtype (default: bf16 on GPU, none on CPU); the softmax stays fp32")


def run(args: argparse.Namespace) -> int:
    from ..dist import process_group
    from ..probes.fixed import parse_source
    from ..probes.fixed_loop import reference_mismatch

    check_data_and_amp(args.data, args.amp, args.device)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    for text in sources or []:
        source = parse_source(text, allow_head=True)  # an unknown name fails before any model is built
        if source.kind == "reference" and args.reference and source.target != args.reference:
            raise AttnflowError(reference_mismatch(source, args.reference))
        if source.kind == "reference" and not args.reference:
            raise AttnflowError(f"source {source.name} needs a reference model: add --reference {source.target}")
        if source.kind == "head" and not args.head:
            raise AttnflowError(f"source {source.name} needs a trained head: add --head PATH")
    ref_opts = args.reference_checkpoint or args.reference_random_init or args.reference_model_kw
    if ref_opts and not args.reference:
        raise AttnflowError("--reference-* options need --reference MODEL")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AttnflowError(f"--out {out} is a file; aggregate writes a directory there")
    with process_group(args.device) as (world, device):
        return _run(args, sources, out, world, device)


def _run(args: argparse.Namespace, sources: list[str] | None, out: Path, world: Any, device: Any) -> int:
    import logging

    from matplotlib.figure import Figure

    from ..data.images import DataError
    from ..models.load import load_model
    from ..plot.kld import plot_kld_heatmap
    from ..plot.style import close, paper_style, save_figure
    from ..probes.fixed import AggregationError
    from ..probes.fixed_encode import check_reference
    from ..probes.fixed_loop import aggregation_statistics
    from ..probes.outputs import load_head

    state = out / STATE
    with reported_by_rank0(command="aggregate"):  # the same arguments and files in every process
        if nothing_to_resume(out / f"{TABLE}.parquet", state, world.rank, world.size, args.resume):
            return 0
        head = load_head(args.head) if args.head else None
        model = load_model(args.model, checkpoint=args.checkpoint, random_init=args.random_init,
                           img_size=args.img_size, checkpoint_key=args.checkpoint_key,
                           **parse_model_kwargs(args.model_kw))
        reference = load_reference(args, args.reference) if args.reference else None
        if reference is not None:
            check_reference(model, reference, args.img_size, model_name=args.model, reference_name=args.reference)
    if (args.random_init or args.reference_random_init) and world.is_main:
        print("attnflow: random weights: the statistics are meaningless", flush=True)
    # errors of the arguments and the data, which every process meets alike
    with sigterm_as_interrupt(), reported_by_rank0((DataError, AggregationError), command="aggregate"):
        result = aggregation_statistics(
            model, args.data, model_name=args.model, reference=reference, reference_name=args.reference, head=head,
            head_path=args.head, sources=sources, batch_size=args.batch_size, device=device, amp=args.amp,
            num_workers=args.workers, img_size=args.img_size, crop_pct=args.crop_pct, limit=args.limit,
            progress=not args.no_progress, state_path=state, checkpoint_every=args.checkpoint_every,
            resume=args.resume, keep_state=True)
        path = write_and_release(result, out / f"{TABLE}.parquet", state, world.rank, world.size)
    if not world.is_main or path is None:
        return 0
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting chatter
    with paper_style():
        fig = cast(Figure, plot_kld_heatmap(result.frame, labels=result.labels, sources=result.sources).figure)
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
    if meta["images_skipped"]:
        print(f"skipped {meta['images_skipped']} unreadable file(s):")
        for item in meta["skipped"][:20]:
            print(f"  {item['path']}: {item['reason']}")
    floored = frame[(frame["metric"] == "kld") & (frame["q_zero_images"] > 0)]
    if len(floored):
        print(f"note: {len(floored)} KLD pair(s) met q = 0 in float32 (floored at 1.2e-38; a lower bound), "
              "see the q_zero_images column")
    return 0
