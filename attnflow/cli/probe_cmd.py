"""``attnflow probe``: train [cls] / average / AbMILP / attentive-probing heads on a frozen encoder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import AttnflowError
from .common import add_model_arguments, add_reference_arguments, load_model_from


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


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "probe", help="train probe heads ([cls], avg, AbMILP, attentive) on a frozen model",
        description="Linear probing with Selective Aggregation (paper Sec. 5): one frozen-encoder pass feeds "
                    "every head. Presets follow the paper's Appendix B.2; every setting can be overridden by a "
                    "flag or a TOML --config. Runs under torchrun for several GPUs.")
    parser.add_argument("--model", required=True, help="preset (see `attnflow models`) or timm architecture")
    parser.add_argument("--task", help="imagenet, imagenet-1pct, cub or folder (or `task` in --config)")
    parser.add_argument("--data", required=True, help="dataset root (see the task's layout in the README)")
    parser.add_argument("--out", required=True, help="run directory (results.parquet/.csv/.json, heads, checkpoints)")
    parser.add_argument("--heads", help="comma-separated head specs: cls, avg, abmilp, abmilp+cls, abmilp-mlp-tanh, "
                                        "abmilp-mlp-relu, sa-abmilp, ap1, ap12 (default cls,avg,abmilp,abmilp+cls)")
    parser.add_argument("--config", metavar="TOML", help="TOML file of probe settings (flags override it)")
    parser.add_argument("--aggregation", metavar="SOURCE",
                        help="fixed (non-trainable) aggregation of the patch tokens, paper Table 5: cls_mean, "
                             "cls_min_entropy, central or reference:<model-name>; trains the cls head on "
                             "sum_i w_i x_i (the only head that applies)")
    add_model_arguments(parser)
    add_reference_arguments(parser)
    group = parser.add_argument_group("protocol overrides (default: the task's preset)")
    group.add_argument("--seeds", type=_seeds, help="number of seeds (3 -> 0,1,2) or a list 0,5,7")
    group.add_argument("--epochs", type=int, help="epochs (preset: 90; 50 for ViT-L/H on ImageNet)")
    group.add_argument("--batch-size", type=int, help="global batch per optimizer step (imagenet 16384, else 1024)")
    group.add_argument("--micro-batch", type=int, help="per-process micro-batch; the rest is gradient accumulation")
    group.add_argument("--accum-steps", type=int, help="micro-batches per step, fixed (overrides --micro-batch); "
                                                       "the same for any number of processes")
    group.add_argument("--lr", type=_floats, help="absolute peak lr, or several (a grid trained in one pass)")
    group.add_argument("--blr", dest="base_lr", type=float, help="base lr: lr = blr x batch / 256 (default 0.1)")
    group.add_argument("--optimizer", help="lars or sgd")
    group.add_argument("--momentum", type=float)
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--warmup-epochs", type=float)
    group.add_argument("--min-lr", type=float)
    group.add_argument("--layernorm", dest="layernorm", action="store_true", default=None,
                       help="apply the encoder's final LayerNorm to the tokens (the paper's numbers: no)")
    group.add_argument("--no-layernorm", dest="layernorm", action="store_false")
    group.add_argument("--block", type=int, help="encoder block to read (default -1, the last; SimMIM: 7)")
    group.add_argument("--train-aug", help="rrc-flip (default) or none")
    group.add_argument("--crop-pct", type=float, help="validation center-crop fraction (default 0.875)")
    group.add_argument("--head-init", help="classifier init: default (torch, the paper's code) or mae")
    group.add_argument("--split-file", help="ImageNet-1%% split file (default: the shipped 1%% split)")
    group.add_argument("--eval-every", type=int, help="evaluate every N epochs (and after the last)")
    group.add_argument("--limit", type=int, help="use N evenly spaced train and val images (quick checks)")
    cache = parser.add_argument_group("feature cache")
    cache.add_argument("--cache", dest="cache", action="store_true", default=None,
                       help="extract tokens once into OUT/cache and train from disk (small datasets)")
    cache.add_argument("--views", type=int, help="augmented views per training image in the cache (default 1)")
    cache.add_argument("--cache-dtype", help="bf16 (default) or fp16")
    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    run_group.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    run_group.add_argument("--amp", help="encoder autocast: auto (bf16 on GPU), bf16, fp16, none")
    run_group.add_argument("--workers", dest="num_workers", type=int, help="DataLoader workers (default 8)")
    run_group.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


OVERRIDES = ("heads", "seeds", "epochs", "batch_size", "micro_batch", "accum_steps", "lr", "base_lr", "optimizer", "momentum",
             "weight_decay", "warmup_epochs", "min_lr", "layernorm", "block", "train_aug", "crop_pct", "head_init",
             "split_file", "eval_every", "limit", "cache", "views", "cache_dtype", "amp", "num_workers",
             "aggregation")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.registry import find_spec
    from ..probes.protocols import read_toml, resolve_config
    from ..probes.specs import DEFAULT_HEADS_NO_CLS
    from ..probes.tasks import load_task
    from ..probes.train import probe_images

    task = args.task or (read_toml(args.config).get("task") if args.config else None)
    if not task:
        raise AttnflowError("say which task: --task imagenet|imagenet-1pct|cub|folder (or task = ... in --config)")
    amp = {"fp32": "none"}.get(args.amp, args.amp)
    toml = read_toml(args.config) if args.config else {}
    heads_chosen = args.heads is not None or "heads" in toml
    overrides = {k: getattr(args, k) for k in OVERRIDES if k != "amp"}
    if (args.aggregation or toml.get("aggregation")) and not heads_chosen:
        overrides["heads"] = "cls"  # the only head that reads the one fixed-weight token
    config = resolve_config(task, args.config, **overrides, amp=amp, img_size=args.img_size)
    ref_opts = args.reference_checkpoint or args.reference_random_init or args.reference_model_kw
    if ref_opts and not (config.aggregation or "").startswith("reference:"):
        raise AttnflowError("--reference-* options apply to --aggregation reference:<model-name> only")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AttnflowError(f"--out {out} is a file; the probe writes a run directory there")
    if not args.resume and any(out.glob("seed*/checkpoint.pt")):
        raise AttnflowError(f"{out} already holds a probe run; pass --resume to continue it or choose a new --out")
    model = load_model_from(args)
    if args.random_init:
        print("attnflow: --random-init: weights are random, the accuracies are meaningless", flush=True)
    reference = None
    if config.aggregation is not None:
        from ..aggregation.sources import parse_source

        source = parse_source(config.aggregation)
        if source.kind == "reference" and source.target:
            from ..aggregation.capture import check_reference

            reference = load_model_from(args, source.target, prefix="reference-")
            check_reference(model, reference, args.img_size, model_name=args.model, reference_name=source.target)
    elif not heads_chosen and getattr(model, "cls_token", None) is None:
        config.heads = DEFAULT_HEADS_NO_CLS
        print(f"attnflow: {args.model} has no [cls] token: heads {DEFAULT_HEADS_NO_CLS}", flush=True)
    spec = find_spec(args.model)
    data = load_task(config, args.data, model)
    table = probe_images(model, data, config, out, model_name=args.model, model_size=spec.size if spec else None,
                         device=torch.device(args.device) if args.device else None, resume=args.resume,
                         progress=not args.no_progress, reference=reference)
    last = table[table["epoch"] == table.groupby(["seed"])["epoch"].transform("max")]
    summary = last.groupby(["head", "lr"], sort=False)["top1"].agg(["mean", "std"]).reset_index()
    for row in summary.itertuples():
        std = "" if row.std != row.std else f" ± {row.std:.2f}"
        print(f"{row.head:>20s}  lr {row.lr:<8g} top-1 {row.mean:.2f}{std}")
    print(f"wrote {out / 'results.parquet'}")
    return 0
