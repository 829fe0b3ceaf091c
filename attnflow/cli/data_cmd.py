"""``attnflow data``: list the dataset manifests and verify a dataset folder against one.

Exit codes of ``attnflow data verify``: 0 when the dataset is complete and clean (extra files only warn),
1 when something is missing, misplaced or corrupt, 2 on bad usage (unknown manifest, missing root).
"""

from __future__ import annotations

import argparse
import json

from .common import non_negative_int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``attnflow data`` with its ``list`` and ``verify`` actions."""
    parser = subparsers.add_parser(
        "data", help="list dataset manifests, verify a dataset folder",
        description="Dataset manifests (data_manifests/) and verification of local copies.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    lister = actions.add_parser("list", help="list the dataset manifests")
    lister.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verify = actions.add_parser(
        "verify", help="check a dataset folder for missing, extra and corrupt files",
        description="Compare a dataset folder with its manifest. Exit 0: complete and clean; 1: missing, "
                    "misplaced or corrupt files; 2: bad usage.")
    verify.add_argument("name", help="manifest name (see `attnflow data list`) or path to a manifest JSON")
    verify.add_argument("--root", required=True, help="the dataset folder")
    verify.add_argument("--no-decode", dest="decode", action="store_false",
                        help="only check presence and empty files, do not decode images")
    verify.add_argument("--limit", type=int, default=None, help="decode only N evenly spaced images")
    verify.add_argument("--split-file", default=None, help="split file of a subset (e.g. SimCLR's 10percent.txt)")
    verify.add_argument("--workers", type=non_negative_int, default=None,
                        help="decoding threads (default: CPU count; 0: decode in the main thread)")
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")
    verify.add_argument("--show", type=int, default=5, metavar="N", help="names listed per problem (default 5)")
    parser.set_defaults(func=run, parser=parser)
    return parser


def _run_list(args: argparse.Namespace) -> int:
    from ..data.manifests import list_manifests, load_manifest

    manifests = [load_manifest(name) for name in list_manifests()]
    if args.json:
        print(json.dumps([{"name": m.name, "kind": m.kind, "title": m.title, "num_images": m.num_images,
                           "num_classes": m.num_classes, "source": m.source} for m in manifests], indent=2))
        return 0
    width = max((len(m.name) for m in manifests), default=4)
    print(f"{'name':<{width}}  {'images':>9}  {'classes':>7}  title")
    for m in manifests:
        print(f"{m.name:<{width}}  {m.num_images:>9,}  {m.num_classes:>7,}  {m.title}")
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from ..data.verify import verify_dataset

    if args.limit is not None and args.limit <= 0:
        from ..data.images import DataError

        raise DataError(f"--limit must be positive, got {args.limit}")
    report = verify_dataset(args.name, args.root, check_images=args.decode, limit=args.limit,
                            split_file=args.split_file, workers=args.workers, progress=not args.json)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.summary(max_names=args.show))
    return 0 if report.ok else 1


def run(args: argparse.Namespace) -> int:
    """Dispatch ``attnflow data ACTION``; returns the exit code."""
    if args.action == "list":
        return _run_list(args)
    if args.action == "verify":
        return _run_verify(args)
    args.parser.print_help()
    return 2
