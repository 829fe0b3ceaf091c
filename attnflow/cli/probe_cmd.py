"""``attnflow probe``: train [cls] / average / AbMILP / attentive-probing heads on a frozen encoder."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AttnflowError
from .common import (add_amp_argument, add_device_argument, add_model_arguments, add_progress_argument,
                     add_reference_arguments, add_resume_argument, add_workers_argument, crop_fraction,
                     load_model_from, non_negative_float)

if TYPE_CHECKING:
    from ..probes.protocols import ProbeConfig


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _seeds(text: str) -> list[int]:
    """``3`` -> seeds 0, 1, 2; ``0,5,7`` -> those seeds."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed count or a list of seeds, got {text!r}") from None
    return list(range(values[0])) if len(values) == 1 and "," not in text else values


FOLDER_BLRS = "0.1,0.3,1,3,10"
"""The folder preset's base-lr grid as the help shows it (attnflow.probes.protocols.DEFAULT_BASE_LRS; kept
here so that building the parser imports no torch; a test checks they agree)."""
TASK_HELP = ("imagenet, imagenet-1pct, cub or folder (or `task` in --config). folder: any class-folder tree "
             "ROOT/train/<class>/*.jpg + ROOT/val/<class>/* (or ROOT/test/<class>/*), same class folders in both; "
             "its defaults choose each head's lr from a grid on 10%% of the training images held out")
DATA_HELP = ("dataset root: imagenet ROOT/train + ROOT/val; imagenet-1pct the same (train filtered by --split-file); "
             "cub the CUB_200_2011 release folder; folder ROOT/train/<class>/*.jpg + ROOT/val/<class>/* "
             "(or ROOT/test/<class>/*)")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "probe", help="train probe heads ([cls], avg, AbMILP, attentive) on a frozen model",
        description="Linear probing with Selective Aggregation (paper Sec. 5): one frozen-encoder pass feeds "
                    "every head and every lr. Presets follow the paper's Appendix B.2 (imagenet, imagenet-1pct, "
                    "cub); folder is any class-folder dataset. Every setting can be overridden by a flag or a "
                    "TOML --config. Runs under torchrun for several GPUs.")
    parser.add_argument("--model", required=True, help="preset (see `attnflow models`) or timm architecture")
    parser.add_argument("--task", help=TASK_HELP)
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--out", required=True, help="run directory (results.parquet/.csv/.json, heads, checkpoints)")
    parser.add_argument("--heads", help="comma-separated head specs: cls, avg, both, abmilp, abmilp+cls, "
                                        "abmilp-mlp-tanh, abmilp-mlp-relu, abmilp-mlpN-ACT, abmilp-pe, abmilp-kK (K "
                                        "aggregation patterns, concatenated; -kK-mean: averaged), sa-abmilp, "
                                        "sa-map-abmilp, ap1, ap12 (default cls,avg,abmilp,abmilp+cls)")
    parser.add_argument("--config", metavar="TOML", help="TOML file of probe settings (flags override it)")
    parser.add_argument("--aggregation", metavar="SOURCE",
                        help="fixed (non-trainable) aggregation of the patch tokens, paper Table 5: cls_mean, "
                             "cls_min_entropy, central, caK, cpK, reference:<model-name> (the official code's "
                             "features), central_sum, caK_sum, reference_sum:<model-name>, patch:R,C, rollout; trains "
                             "the cls head on that one token per image (the only head that applies)")
    add_model_arguments(parser)
    add_reference_arguments(parser)
    _add_protocol_arguments(parser)
    cache = parser.add_argument_group("feature cache")
    cache.add_argument("--cache", dest="cache", action="store_true", default=None,
                       help="extract tokens once into OUT/cache and train from disk (small datasets)")
    cache.add_argument("--views", type=int, help="augmented views per training image in the cache (default 1)")
    cache.add_argument("--cache-dtype", help="bf16 (default) or fp16")
    run_group = parser.add_argument_group("execution")
    add_resume_argument(run_group)
    add_device_argument(run_group)
    add_amp_argument(run_group, default=None)  # not given: the preset's or --config's
    add_workers_argument(run_group)
    add_progress_argument(run_group)
    parser.set_defaults(func=run)
    return parser


def _add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("protocol overrides (default: the task's preset)")
    group.add_argument("--seeds", type=_seeds, help="number of seeds (3 -> 0,1,2) or a list 0,5,7")
    group.add_argument("--epochs", type=int, help="epochs (preset: 90; 50 for ViT-L/H on ImageNet)")
    group.add_argument("--batch-size", type=int, help="global batch per optimizer step (imagenet 16384, "
                                                      "imagenet-1pct and cub 1024, folder min(256, training images))")
    group.add_argument("--micro-batch", type=int, help="per-process micro-batch; the rest is gradient accumulation")
    group.add_argument("--accum-steps", type=int, help="micro-batches per step, fixed (overrides --micro-batch); "
                                                       "the same for any number of processes")
    group.add_argument("--lr", type=_floats, help="absolute peak lr, or several (a grid trained in one pass)")
    group.add_argument("--blr", dest="base_lr", type=_floats,
                       help=f"base lr, or several: lr = blr x batch / 256 (paper presets 0.1; folder "
                            f"{FOLDER_BLRS}, each head's chosen on held-out training images)")
    group.add_argument("--holdout", type=float,
                       help="share of the training images held out to choose each head's lr when there are several "
                            "(folder 0.1; paper presets 0: every lr is reported on the validation set)")
    group.add_argument("--optimizer", help="lars or sgd")
    group.add_argument("--momentum", type=float)
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--warmup-epochs", type=non_negative_float)
    group.add_argument("--min-lr", type=float)
    group.add_argument("--layernorm", dest="layernorm", action="store_true", default=None,
                       help="apply the encoder's final LayerNorm to the tokens (the paper's numbers: no)")
    group.add_argument("--no-layernorm", dest="layernorm", action="store_false")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--block", type=int, help="encoder block to read, counted from 0 (default -1, the last; "
                                                 "SimMIM: 7)")
    which.add_argument("--blocks", metavar="LIST",
                       help="train the heads on each of several blocks, all from one frozen forward pass: block "
                            "indices counted from 0 like --block (the paper's 1-based blocks 6, 9, 12 of ViT-B are "
                            "--blocks 5,8,11; negative from the end) or 'all'; adds OUT/blocks.pdf/.png, top-1 "
                            "against block")
    group.add_argument("--train-aug", help="rrc-flip (default) or none")
    group.add_argument("--crop-pct", type=crop_fraction, help="validation center-crop fraction (default 0.875)")
    group.add_argument("--head-init", help="classifier init: default (torch, the paper's code) or mae")
    group.add_argument("--eval-amp", help="autocast of the heads at evaluation: fp32 (default) or fp16 (the official "
                                          "code's evaluate)")
    group.add_argument("--split-file", help="ImageNet-1%% split file (default: the shipped 1%% split)")
    group.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    group.add_argument("--limit", type=int, help="use N evenly spaced train and val images (quick checks)")


OVERRIDES = ("heads", "seeds", "epochs", "batch_size", "micro_batch", "accum_steps", "lr", "base_lr", "holdout",
             "optimizer", "momentum", "weight_decay", "warmup_epochs", "min_lr", "layernorm", "block", "blocks",
             "train_aug",
             "crop_pct", "head_init", "split_file", "eval_every", "limit", "cache", "views", "cache_dtype", "amp",
             "workers", "aggregation", "eval_amp")


def _config(args: argparse.Namespace) -> tuple[ProbeConfig, bool]:
    """The run's settings (preset < --config < flags) and whether the heads were chosen by the user."""
    from ..probes.protocols import read_toml, resolve_config

    toml = read_toml(args.config) if args.config else {}
    task = args.task or toml.get("task")
    if not task:
        raise AttnflowError("say which task: --task imagenet|imagenet-1pct|cub|folder (or task = ... in --config)")
    heads_chosen = args.heads is not None or "heads" in toml
    overrides = {k: getattr(args, k) for k in OVERRIDES}
    if (args.aggregation or toml.get("aggregation")) and not heads_chosen:
        overrides["heads"] = "cls"  # the only head that reads the one fixed-weight token
    return resolve_config(task, args.config, **overrides, img_size=args.img_size), heads_chosen


def _check_out(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AttnflowError(f"--out {out} is a file; the probe writes a run directory there")
    if not args.resume and any(out.glob("seed*/checkpoint.pt")):
        raise AttnflowError(f"{out} already holds a probe run; pass --resume to continue it or choose a new --out")
    return out


def _reference(args: argparse.Namespace, config: ProbeConfig, model: Any) -> Any:
    """The reference model of ``--aggregation reference:<name>`` (``None`` for other aggregations)."""
    ref_opts = args.reference_checkpoint or args.reference_random_init or args.reference_model_kw
    if ref_opts and not (config.aggregation or "").startswith(("reference:", "reference_sum:", "reference-sum:")):
        raise AttnflowError("--reference-* options apply to --aggregation reference:<model-name> only (or "
                            "reference_sum:<model-name>)")
    if config.aggregation is None:
        return None
    from ..aggregation.sources import parse_source

    source = parse_source(config.aggregation)
    if source.kind != "reference" or not source.target:
        return None
    from ..aggregation.capture import check_reference

    reference = load_model_from(args, source.target, prefix="reference-")
    check_reference(model, reference, args.img_size, model_name=args.model, reference_name=source.target)
    return reference


def print_settings(settings: dict[str, Any]) -> None:
    """The resolved settings, one ``name: value`` per line, before any training."""
    print("attnflow probe: settings", flush=True)
    for name, value in settings.items():
        if value is None:
            continue
        shown = ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value) if isinstance(
            value, list) else value
        print(f"  {name + ':':<14s}{shown}", flush=True)


def print_results(table: Any) -> None:
    """Per head (and block, when a run trained several): the lr kept (per seed when they differ), its validation
    top-1 (mean ± std over seeds) and, when chosen on held-out images, its held-out top-1; every lr of a grid
    reported without a held-out choice."""
    last = table[table["epoch"] == table.groupby(["seed"])["epoch"].transform("max")]
    kept = last[last["selected"]] if last["selected"].any() else last
    blocks = "block" in last.columns and last["block"].nunique() > 1
    group = (["block"] if blocks else []) + (["head"] if last["selected"].any() else ["head", "lr"])
    for key, rows in kept.groupby(group, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        head = f"block {key[0]} {key[1]}" if blocks else key[0]
        lrs = ",".join(f"{x:.3g}" for x in dict.fromkeys(rows["lr"]))
        std = "" if len(rows) < 2 else f" ± {rows['top1'].std():.2f}"
        held = rows["holdout_top1"].mean()
        note = "" if held != held else f"  (held-out top-1 {held:.2f})"
        print(f"{head:>20s}  lr {lrs:<10s} top-1 {rows['top1'].mean():.2f}{std}{note}")


def print_skipped_images(meta: dict[str, Any], sidecar: Path, shown: int = 20) -> None:
    """The unreadable files of a run (``images_skipped`` per split in ``results.json``), at most ``shown`` of them."""
    counts = meta.get("images_skipped") or {}
    total = sum(counts.values())
    if not total:
        return
    print(f"skipped {total} unreadable file(s) (train {counts.get('train', 0)}, val {counts.get('val', 0)}):")
    listed = meta.get("skipped") or []
    for item in listed[:shown]:
        print(f"  {item['split']}: {item['path']}: {item['reason']}")
    if len(listed) > shown:
        print(f"  ... and {len(listed) - shown} more (listed in {sidecar})")


def write_block_figure(table: Any, out: Path) -> list[Path]:
    """``OUT/blocks.pdf`` and ``.png``: top-1 of [cls], avg and AbMILP (those the run trained, else every head it
    trained) against block, for a run of several blocks (nothing for a one-block run)."""
    if table["block"].nunique() < 2:
        return []
    import matplotlib

    matplotlib.use("Agg")
    from ..plot import PROBE_HEADS, plot_probe_blocks
    from ..plot.style import close, root_figure, save_figure

    trained = list(dict.fromkeys(table["head"]))
    heads = [h for h in PROBE_HEADS if h in trained] or trained
    try:
        ax = plot_probe_blocks(out, heads=heads)  # read as `attnflow plot --probes OUT` reads it (random weights)
    except AttnflowError as err:  # e.g. none of the drawn heads was trained: the run itself is fine
        print(f"attnflow: no per-block figure: {err}", flush=True)
        return []
    fig = root_figure(ax)
    written = [save_figure(fig, out / f"blocks.{ext}") for ext in ("pdf", "png")]
    close(fig)
    return written


def run(args: argparse.Namespace) -> int:
    config, heads_chosen = _config(args)
    return _probe(args, config, heads_chosen, _check_out(args))


def _probe(args: argparse.Namespace, config: ProbeConfig, heads_chosen: bool, out: Path) -> int:
    from ..atomic import output_lock
    from ..models.registry import find_spec
    from ..probes.fit import check_classes
    from ..options import resolve_device
    from ..probes.specs import DEFAULT_HEADS_NO_CLS
    from ..probes.tasks import load_task
    from ..probes.train import probe_images, resolved_settings
    from ..vit import model_has_cls

    device = resolve_device(args.device)
    model = load_model_from(args)
    if args.random_init:
        print("attnflow: --random-init: weights are random, the accuracies are meaningless", flush=True)
    reference = _reference(args, config, model)
    if config.aggregation is None and not heads_chosen and not model_has_cls(model):
        config.heads = DEFAULT_HEADS_NO_CLS
        print(f"attnflow: {args.model} has no [cls] token: heads {DEFAULT_HEADS_NO_CLS}", flush=True)
    spec = find_spec(args.model)
    size = spec.size if spec else None
    data = load_task(config, args.data, model)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    settings = resolved_settings(config, data, device=device, world_size=world_size, model_size=size)
    if int(os.environ.get("RANK", "0")) == 0:
        print_settings(settings)
    check_classes(data.num_classes, data.info["root"])  # a refused task leaves no run directory behind
    with contextlib.ExitStack() as held:
        if int(os.environ.get("RANK", "0")) == 0:  # one run at a time per run directory, from its first write
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(output_lock(out))
        table = probe_images(model, data, config, out, model_name=args.model, model_size=size,
                             device=device if args.device else None, resume=args.resume,
                             progress=not args.no_progress, reference=reference)
    print_results(table)
    sidecar = out / "results.json"
    if int(os.environ.get("RANK", "0")) == 0 and sidecar.is_file():
        print_skipped_images(json.loads(sidecar.read_text(encoding="utf-8")), sidecar)
    print(f"wrote {out / 'results.parquet'}")
    if int(os.environ.get("RANK", "0")) == 0:
        for path in write_block_figure(table, out):
            print(f"wrote {path}")
    return 0
