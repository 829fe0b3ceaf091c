"""``attnflow models``: the model zoo as a table (name, family, architecture, [cls], source, cached);
``attnflow models NAME...``: one preset in full, with where to download its weights and where to put them."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models", help="list the model presets and whether their weights are cached",
        description="List the model presets of the paper's models. Any timm architecture name also works "
                    "wherever a model is asked for, and so do models of two other libraries, unmodified: "
                    "hf:REPO_ID, a Hugging Face transformers vision model (ViT, ViT-MAE, DINOv2 with or without "
                    "registers, BEiT, CLIP or SigLIP vision tower), e.g. --model hf:facebook/dinov2-small "
                    "(pip install attnflow[hf]), and open_clip:ARCH/TAG, an open_clip visual tower, e.g. "
                    "--model open_clip:ViT-B-16/laion2b_s34b_b88k (pip install attnflow[open_clip]); their "
                    "weights come from the Hugging Face cache (open_clip: also ~/.cache/clip) without network, "
                    "and --model-kw sets config values. 'cached' says whether the weights are on this machine "
                    "(Hugging Face cache or torch hub cache); otherwise pass --checkpoint PATH.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="show these presets in full: official URL, the cache path to copy the file to "
                             "(e.g. from a machine with internet), a download command, format and notes")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("--family", choices=("MIM", "JEA", "MIM+FT", "other"), help="only this family")
    parser.set_defaults(func=run)
    return parser


def model_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One dict per preset: name, family, method, size, arch, arch_kwargs, has_cls, hub_tag, url, source,
    converter, cached, cached_path (the file found, or ``None``), cache_path (where the official file is
    looked for), notes."""
    from ..models.load import cached_weights_path, official_cache_path
    from ..models.registry import list_specs

    rows = []
    for spec in list_specs():
        if family and spec.family != family:
            continue
        found, target = cached_weights_path(spec.name), official_cache_path(spec)
        rows.append({
            "name": spec.name, "family": spec.family, "method": spec.method, "size": spec.size,
            "arch": spec.arch, "arch_kwargs": dict(spec.arch_kwargs), "has_cls": spec.has_cls,
            "hub_tag": spec.hub_tag, "url": spec.url, "source": spec.hub_tag or spec.url or "",
            "converter": spec.converter, "cached": found is not None,
            "cached_path": str(found) if found else None, "cache_path": str(target) if target else None,
            "notes": spec.notes,
        })
    return rows


def describe(name: str) -> str:
    """Everything about preset ``name`` a user needs to get its weights by hand (e.g. download them on a
    machine with internet and copy them to an offline cluster): the official URL, the cache path where
    attnflow finds the file, a download command, timm's copy, the file format and the notes.

    Raises:
        UnknownModelError: ``name`` is not a preset (with close matches).
    """
    from ..models import files
    from ..models.converters import get_converter
    from ..models.load import cached_weights_path, hub_repo, official_cache_path
    from ..models.registry import get_spec

    if name.startswith(("hf:", "open_clip:")):
        return describe_external(name)
    spec = get_spec(name)
    found, target, repo = cached_weights_path(name), official_cache_path(spec), hub_repo(spec)
    kwargs = f" {spec.arch_kwargs}" if spec.arch_kwargs else ""
    lines = [f"{spec.name}: {spec.label} ({spec.family}), timm {spec.arch}{kwargs}, "
             f"[cls] token: {'yes' if spec.has_cls else 'no'}",
             f"  weights:   {f'cached: {found}' if found else 'not cached'}"]
    if spec.url:
        lines.append(f"  official:  {spec.url}")
    if repo:
        lines.append(f"  timm copy: hf-hub:{repo} (used first when in the Hugging Face cache {files.hf_cache_dir()})")
    if target:
        lines.append(f"  save as:   {target} (this machine's torch hub cache, $TORCH_HOME/hub/checkpoints: "
                     f"found there with no option), or pass --checkpoint PATH")
    if not found and spec.url and target:
        lines.append(f"  download:  {files.download_command(spec.url, target)}" if files.is_direct_url(spec.url) else
                     "  download:  by hand in a browser (the URL is a web page, not a direct link)")
    converter = get_converter(spec.converter)
    lines.append(f"  format:    {converter.name}: {converter.description}")
    if spec.notes:
        lines.append(f"  notes:     {spec.notes}")
    return "\n".join(lines)


def describe_external(name: str) -> str:
    """Where the weights of an ``hf:REPO_ID`` or ``open_clip:ARCH/TAG`` model are looked for, and whether they are
    there (no network).

    Raises:
        MissingExtraError: the library is not installed (the line says what to install).
        UnknownModelError: an open_clip architecture or tag that open_clip does not know.
    """
    from ..models import files
    from ..models.load import cached_weights_path

    found = cached_weights_path(name)
    lines = [f"{name}: " + ("a Hugging Face transformers vision model" if name.startswith("hf:")
                            else "an open_clip visual tower"),
             f"  weights:   {f'cached: {found}' if found else 'not cached'}"]
    if name.startswith("hf:"):
        repo = name[3:]
        lines.append(f"  cache:     {files.hf_cache_dir()} (download on a machine with internet: hf download {repo}; "
                     "then copy the cache), or pass --checkpoint FOLDER written by save_pretrained")
    else:
        from ..models.openclip import parse_name, url_cache_dir

        arch, tag = parse_name(name)
        lines.append(f"  cache:     the Hugging Face cache {files.hf_cache_dir()}, or {url_cache_dir()} for a URL, "
                     f"as open_clip.create_model('{arch}', pretrained='{tag}') stores them; or pass --checkpoint "
                     "PATH")
    return "\n".join(lines)


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
    if args.names and not args.json:
        print("\n\n".join(describe(name) for name in args.names))
        return 0
    rows = model_rows(args.family)
    if args.names:
        from ..models.registry import get_spec

        wanted = [get_spec(name).name for name in args.names]
        rows = [r for r in rows if r["name"] in wanted]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print(f"\n{len(rows)} presets; any timm architecture name works too, and hf:REPO_ID (transformers) or "
              "open_clip:ARCH/TAG names. Models not cached: "
              "download the source and pass --checkpoint PATH, or use --random-init; `attnflow models NAME` "
              "shows the URL and the cache path to copy a downloaded file to.")
    return 0
