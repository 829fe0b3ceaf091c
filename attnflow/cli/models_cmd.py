"""``attnflow models``: the model zoo as a table (name, family, architecture, [cls], source, cached)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models", help="list the model presets and whether their weights are cached",
        description="List the model presets of the paper's models. Any timm architecture name also works "
                    "wherever a model is asked for. 'cached' says whether the weights are on this machine "
                    "(Hugging Face cache or torch hub cache); otherwise pass --checkpoint PATH.")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--family", choices=("MIM", "JEA", "MIM+FT", "other"), help="only this family")
    parser.set_defaults(func=run)
    return parser


def model_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One dict per preset: name, family, method, size, arch, arch_kwargs, has_cls, hub_tag, url, source,
    converter, cached, notes."""
    from ..models.load import weights_cached
    from ..models.registry import list_specs

    rows = []
    for spec in list_specs():
        if family and spec.family != family:
            continue
        rows.append({
            "name": spec.name, "family": spec.family, "method": spec.method, "size": spec.size,
            "arch": spec.arch, "arch_kwargs": dict(spec.arch_kwargs), "has_cls": spec.has_cls,
            "hub_tag": spec.hub_tag, "url": spec.url, "source": spec.hub_tag or spec.url or "",
            "converter": spec.converter, "cached": weights_cached(spec.name), "notes": spec.notes,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`model_rows`."""
    header = ("name", "family", "arch", "cls?", "source", "cached?")
    body = [(r["name"], r["family"], r["arch"], "yes" if r["has_cls"] else "no", _short(r["source"]),
             "yes" if r["cached"] else "no") for r in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(source: str, width: int = 56) -> str:
    """A URL shortened to ``host/.../file`` when longer than ``width``; hub tags unchanged."""
    source = source.removeprefix("https://")
    if len(source) <= width or "/" not in source:
        return source
    host, _, rest = source.partition("/")
    return f"{host}/.../{rest.rsplit('/', 1)[-1]}"


def run(args: argparse.Namespace) -> int:
    rows = model_rows(args.family)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} presets; any timm architecture name works too. Models not cached: "
              "download the source and pass --checkpoint PATH, or use --random-init.")
    return 0
