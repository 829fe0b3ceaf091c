"""``attnflow demo``: the paper's ViT-B models on built-in photos; statistics, figures, maps and an index."""

from __future__ import annotations

import argparse

from ..errors import AttnflowError
from .common import add_device_argument, image_size


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "demo", help="end-to-end demo on built-in photos (statistics, figures, maps, index)",
        description="Run MAE, DINO, MoCo-v3 and iBOT ViT-B/16 on photos that ship with scikit-image and "
                    "matplotlib: attention statistics, per-block figures, block x head heatmaps, per-image maps, "
                    "summary tables and an index (index.md, index.html) in one folder. Weights come from the "
                    "local caches or, when the network answers, the hub; models without weights run with random "
                    "weights behind a loud warning (their numbers are meaningless).")
    parser.add_argument("--out", default="attnflow-demo", help="output folder (default attnflow-demo/)")
    add_device_argument(parser)
    parser.add_argument("--limit", type=int, help="use the first N photos (default: all, 7-9)")
    parser.add_argument("--model", action="append", metavar="NAME",
                        help="run these presets instead of the four ViT-B/16 (repeatable)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="local weights file of one model, e.g. mocov3-vit-b16=vit-b-300ep.pth.tar (repeatable)")
    parser.add_argument("--offline", action="store_true", help="use the local caches only (no network probe)")
    parser.add_argument("--random-init", action="store_true",
                        help="every model with random weights (pipeline check; numbers are meaningless)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--img-size", type=image_size, default=224, help="input resolution (default 224)")
    parser.add_argument("--model-kw", action="append", default=[], help=argparse.SUPPRESS)  # tests: tiny models
    parser.set_defaults(func=run)
    return parser


def _checkpoints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise AttnflowError(f"--checkpoint expects MODEL=PATH, got {item!r}")
        out[model] = path
    return out


def run(args: argparse.Namespace) -> int:
    from ..demo import DEMO_MODELS, run_demo
    from ..runner.figures import quiet_random_init_warnings
    from .common import parse_model_kwargs

    if args.limit is not None and args.limit <= 0:
        raise AttnflowError(f"--limit must be positive, got {args.limit}")
    with quiet_random_init_warnings():  # the banner says it, loudly, and each figure is stamped
        report = run_demo(args.out, device=args.device, limit=args.limit, models=tuple(args.model or DEMO_MODELS),
                          checkpoints=_checkpoints(args.checkpoint), random_init=args.random_init,
                          offline=args.offline, img_size=args.img_size, model_kw=parse_model_kwargs(args.model_kw),
                          batch_size=args.batch_size, progress=args.progress,
                          echo=lambda line: print(line, flush=True))
    print(f"wrote {len(report.files)} files to {report.out_dir} in {report.seconds:.0f} s; "
          f"open {report.out_dir / 'index.html'} (or index.md)")
    for line in report.banner:  # again at the end, where nobody can miss it
        print(line)
    return 0
