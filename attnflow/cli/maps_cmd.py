"""``attnflow maps``: per-image attention maps of several models on a few images (the paper's Fig. 9)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import AttnflowError
from .common import add_device_argument, crop_fraction, dpi, image_size, positive_int

log = logging.getLogger(__name__)

RANDOM_BANNER = "RANDOM-INIT WEIGHTS: these maps are meaningless"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "maps", help="per-image [cls], central-patch and attention-rollout maps (Fig. 9)",
        description="Overlay the last block's attention on a few images for several models: [cls] -> patch "
                    "attention averaged over heads, of the lowest-entropy head, and the central patch's "
                    "attention (models without [cls] show only the latter); --kind rollout adds the attention "
                    "rollout of every block up to --block (Abnar & Zuidema 2020: heads averaged, 0.5 A + 0.5 I, "
                    "multiplied from the first block; the [cls] row, without [cls] the mean of the patch rows).")
    parser.add_argument("--model", action="append", required=True, metavar="NAME",
                        help="preset or timm architecture (repeatable)")
    parser.add_argument("--checkpoint", action="append", metavar="PATH",
                        help="weights for the --model at the same position (repeat once per model, or omit)")
    parser.add_argument("--images", required=True, help="an image file or a folder (recursive)")
    parser.add_argument("--out", required=True, help="output figure (.png, .pdf, .svg or .eps)")
    parser.add_argument("--limit", type=positive_int, default=4, help="number of images, evenly spaced (default 4)")
    parser.add_argument("--random-init", action="store_true",
                        help="build the architecture without weights (smoke tests; numbers are meaningless)")
    parser.add_argument("--img-size", type=image_size, default=224, help="input resolution (default 224)")
    parser.add_argument("--crop-pct", type=crop_fraction, default=0.875,
                        help="center-crop fraction, the same for every model so that maps align (default 0.875)")
    parser.add_argument("--kind", action="append", metavar="KIND",
                        help="map kind: cls_mean, cls_min_entropy, central, rollout or cls_head:H (repeatable; "
                             "default: the first three)")
    parser.add_argument("--block", type=int, default=-1, help="block index, negative from the end (default -1)")
    parser.add_argument("--rows", default="images", choices=["images", "models"], help="what the rows show")
    parser.add_argument("--side-by-side", action="store_true", help="draw the patch grids beside the image")
    parser.add_argument("--per-head", action="store_true",
                        help="also write every head's [cls] map of the first image (OUT-heads-MODEL.EXT)")
    parser.add_argument("--model-kw", action="append", default=[], metavar="KEY=VALUE",
                        help="extra timm.create_model argument for every model (repeatable)")
    add_device_argument(parser)
    parser.add_argument("--dpi", type=dpi, default=200, help="resolution of PNG output (default 200)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    from ..models.load import load_model
    from ..models.registry import find_spec
    from ..data.images import load_images
    from ..data.transforms import eval_resize
    from ..maps import KINDS, MAP_KINDS, ROLLOUT_KIND, model_maps
    from ..options import resolve_device
    from ..models.record import model_record
    from ..plot import plot_attention_maps, plot_head_maps
    from ..plot.style import SAVE_FORMATS, close, save_figure
    from .common import parse_model_kwargs

    out = Path(args.out)
    if out.suffix.lower().lstrip(".") not in SAVE_FORMATS:
        raise AttnflowError(f"--out {out}: use one of {', '.join('.' + f for f in SAVE_FORMATS)}")
    checkpoints = args.checkpoint or [None] * len(args.model)
    if len(checkpoints) != len(args.model):
        raise AttnflowError(f"{len(args.checkpoint)} --checkpoint for {len(args.model)} --model: give one per "
                            "model, in the same order, or none")
    if len(set(args.model)) != len(args.model):
        raise AttnflowError("each --model may be given once")
    kinds = args.kind or list(MAP_KINDS)
    for kind in kinds:
        head = kind.split(":", 1)[1] if kind.startswith("cls_head:") else None
        if kind not in KINDS and not (head is not None and head.isdigit()):
            raise AttnflowError(f"unknown map kind {kind!r}; choose from {', '.join(KINDS)} or cls_head:H")
    device = resolve_device(args.device)
    model_kw = parse_model_kwargs(args.model_kw)
    paths, images = load_images(args.images, args.limit, check=eval_resize(args.img_size, args.crop_pct).check)

    crops, maps, labels, random = None, {}, {}, []
    for name, checkpoint in zip(args.model, checkpoints):
        model = load_model(name, checkpoint=checkpoint, random_init=args.random_init, img_size=args.img_size,
                           **model_kw).to(device).eval()
        if model_record(model).random_init:
            random.append(name)
        model_crops, maps[name] = model_maps(model, images, img_size=args.img_size, crop_pct=args.crop_pct,
                                             block=args.block, device=device, rollout=ROLLOUT_KIND in kinds)
        crops = crops if crops is not None else model_crops
        spec = find_spec(name)
        labels[name] = spec.label if spec else name
        del model
    assert crops is not None  # --model is required, so the loop above ran at least once
    for kind in kinds:  # head indices can only be checked against a model
        maps[args.model[0]][0].get(kind)

    title = f"{RANDOM_BANNER} ({', '.join(random)})" if random else None
    fig = plot_attention_maps(crops, maps, kinds=kinds, labels=labels, rows=args.rows,
                              overlay=not args.side_by_side, title=title, warning=bool(random))
    written = [save_figure(fig, out, dpi=args.dpi)]
    close(fig)
    if args.per_head:
        for name in args.model:
            if not maps[name][0].has_cls:
                log.warning("%s has no [cls] token; no per-head [cls] maps", name)
                continue
            fig = plot_head_maps(crops[0], maps[name][0], overlay=not args.side_by_side,
                                 title=f"{labels[name]}: {paths[0].name}" + (f" ({RANDOM_BANNER})" if name in random
                                                                            else ""))
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            written.append(save_figure(fig, out.with_name(f"{out.stem}-heads-{safe}{out.suffix}"), dpi=args.dpi))
            close(fig)
    if random:
        print(f"attnflow maps: {RANDOM_BANNER}: {', '.join(random)}")
    for path in written:
        print(f"wrote {path}")
    return 0
