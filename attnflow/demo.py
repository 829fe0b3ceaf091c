"""``attnflow demo``: the whole job on a built-in default, written to one folder with an index.

Real photos that ship inside installed packages (scikit-image, matplotlib; scikit-learn's when installed) go
through the paper's ViT-B models (MAE, DINO, MoCo-v3, iBOT): per-(block, head) statistics, the per-block
figures (Figs. 3-6 style), block x head heatmaps, per-image maps (Fig. 9 style), a summary table and an
``index.md`` / ``index.html`` that lists every file. It is an analysis config built in code and run by
:mod:`attnflow.runner`, so a second demo reuses the statistics of the first.

Weights come from the local caches, else (when the network answers a single 3-second probe) from the hub
or the authors' URLs. A model without weights runs with random weights behind a loud banner - in the
printed output, the index and every figure - that says its numbers are meaningless and how to get the weights.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

DEMO_MODELS: tuple[str, ...] = ("mae-vit-b16", "dino-vit-b16", "mocov3-vit-b16", "ibot-vit-b16")
"""The paper's ViT-B/16 models (Sec. 4), in legend order."""

MAP_IMAGES = 4
"""Photos shown in the per-image maps figure."""


# ------------------------------------------------------------------------------------------------ photos

def _photo_sources() -> list[tuple[str, Callable[[], Any]]]:
    import matplotlib.cbook
    import numpy as np
    import skimage.data
    from PIL import Image

    def grace_hopper() -> Any:
        with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
            return np.asarray(img.convert("RGB"))

    sources: list[tuple[str, Callable[[], Any]]] = [
        ("astronaut", skimage.data.astronaut), ("chelsea", skimage.data.chelsea), ("coffee", skimage.data.coffee),
        ("rocket", skimage.data.rocket), ("motorcycle", lambda: skimage.data.stereo_motorcycle()[0]),
        ("grace_hopper", grace_hopper), ("camera", skimage.data.camera)]
    try:
        from sklearn.datasets import load_sample_images  # a dev extra: used only when installed

        china, flower = load_sample_images().images
        sources += [("china", lambda: china), ("flower", lambda: flower)]
    except ImportError:
        pass
    return sources


def write_photos(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Write the built-in photos as JPEG files ``NN_<name>.jpg`` into ``folder``; returns their paths.

    Args:
        folder: output folder (created).
        limit: the first ``limit`` photos only.

    Returns:
        Paths in order (astronaut, chelsea, coffee, rocket, motorcycle, grace_hopper, camera[, china, flower]).
    """
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sources = _photo_sources()[:limit]
    paths = []
    for i, (name, load) in enumerate(sources, start=1):
        path = folder / f"{i:02d}_{name}.jpg"
        if not path.is_file():
            img = np.asarray(load())
            Image.fromarray(img).convert("RGB").save(path, quality=92)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------ network

def network_available(timeout: float = 3.0) -> bool:
    """One probe of the Hugging Face endpoint, bounded by ``timeout`` even when DNS hangs; ``False`` offline."""
    from .models import files

    if files.offline():
        return False
    return files.reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)  # DNS included


@contextlib.contextmanager
def _offline(on: bool) -> Iterator[None]:
    """Set ``ATTNFLOW_OFFLINE=1`` inside the block (restored after) so that no load touches the network."""
    if not on:
        yield
        return
    old = os.environ.get("ATTNFLOW_OFFLINE")
    os.environ["ATTNFLOW_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTNFLOW_OFFLINE", None)
        else:
            os.environ["ATTNFLOW_OFFLINE"] = old


def how_to_get_weights(name: str) -> str:
    """One line: where the weights of preset ``name`` come from and where to put them."""
    from .models import files
    from .models.registry import find_spec

    spec = find_spec(name)
    if spec is None:
        return f"{name}: give a local weights file as its checkpoint: {name}=PATH"
    where = [f"timm hub tag {spec.hub_tag}"] if spec.hub_tag else []
    where += [spec.url] if spec.url else []
    cache = f" and save it as {files.torch_hub_checkpoint_dir() / spec.cache_filename}" if spec.cache_filename else ""
    return f"{name}: download {' or '.join(where)}{cache}, or give the file as its checkpoint: {name}=PATH"


# ------------------------------------------------------------------------------------------------ report

@dataclass
class DemoReport:
    """What the demo wrote.

    Attributes:
        out_dir: the output folder.
        files: ``(path relative to out_dir, one-line description)`` for every file, index excluded.
        weights: model -> ``"random-init"`` or where its weights came from.
        random_init: models that ran with random weights.
        banner: the warning lines (empty when every model had real weights).
        seconds: wall time.
    """

    out_dir: Path
    files: list[tuple[str, str]] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)
    random_init: list[str] = field(default_factory=list)
    banner: list[str] = field(default_factory=list)
    seconds: float = 0.0


def banner_lines(random: Sequence[str], why: str) -> list[str]:
    """The loud random-weights warning for ``random`` models (empty when there are none); ``why`` says why."""
    if not random:
        return []
    bar = "!" * 100
    lines = [bar, f"!!  RANDOM-INIT WEIGHTS: {', '.join(random)}",
             f"!!  {why}: these models ran with RANDOM weights.",
             "!!  Their statistics, figures and maps are MEANINGLESS - they only show that the pipeline works.",
             "!!  To use the real weights:"]
    lines += [f"!!    {how_to_get_weights(m)}" for m in random]
    lines += ["!!  (`attnflow models` lists every preset with its source; rerun `attnflow demo` once cached.)", bar]
    return lines


# ------------------------------------------------------------------------------------------------ main

def run_demo(out_dir: str | Path = "attnflow-demo", *, device: str | None = None, limit: int | None = None,
             models: Sequence[str] = DEMO_MODELS, checkpoints: Mapping[str, str | Path] | None = None,
             random_init: bool = False, offline: bool = False, img_size: int = 224,
             model_kw: Mapping[str, Any] | None = None, batch_size: int = 8, progress: bool = False,
             echo: Callable[[str], None] = log.info) -> DemoReport:
    """Run the demo; see the module docstring.

    Args:
        out_dir: output folder (created; a second run reuses its statistics).
        device: ``cuda``/``cpu`` (default: autodetect).
        limit: use the first ``limit`` photos.
        models: presets, in legend order.
        checkpoints: model -> local weights file.
        random_init: every model with random weights (no weight look-up at all).
        offline: use the local caches only (no network probe).
        img_size: input resolution.
        model_kw: ``timm.create_model`` overrides for every model (tests shrink the models with it).
        batch_size: images per forward pass.
        progress: tqdm bars.
        echo: where progress lines and the banner go (the CLI passes ``print``).

    Returns:
        :class:`DemoReport`.
    """
    import matplotlib

    matplotlib.use("Agg")
    from .limits import check_img_size
    from .options import resolve_device
    from .runner import execute, parse_config, plan_run

    resolve_device(device)  # before any photo is written or model loaded
    check_img_size(img_size)
    start = time.perf_counter()
    out = Path(out_dir)
    checkpoint_paths = {k: Path(v) for k, v in (checkpoints or {}).items()}
    unknown = [m for m in checkpoint_paths if m not in models]
    if unknown:
        from .errors import AttnflowError

        raise AttnflowError(f"a checkpoint is given for {', '.join(unknown)}, which the demo does not run "
                            f"({', '.join(models)})")
    photos = write_photos(out / "photos", limit)
    echo(f"attnflow demo: {len(photos)} photos -> {out / 'photos'}")
    weights, no_network = _choose_weights(models, checkpoint_paths, random_init, offline, img_size, model_kw, echo)
    random = [m for m in models if weights[m] == "random-init"]
    why = ("random weights were asked for (random_init)" if random_init else
           "no pretrained weights in the local caches, and " + ("the network is off or unreachable" if no_network
                                                                else "the download failed"))
    report = DemoReport(out, weights=weights, random_init=random, banner=banner_lines(random, why))
    for line in report.banner:
        echo(line)

    raw = {
        "name": "demo", "title": "attnflow demo: the paper's ViT-B/16 models on built-in photos",
        "run_dir": str(out), "figures_dir": str(out / "figures"),
        "data": {"root": str(out / "photos"), "img_size": img_size, "crop_pct": 0.875,
                 "batch_size": batch_size, "workers": 0},
        "models": [{"name": m, "random_init": weights[m] == "random-init", "model_kw": dict(model_kw or {}),
                    **({"checkpoint": str(checkpoint_paths[m])} if m in checkpoint_paths else {})} for m in models],
        "figures": [
            {"name": "blocks", "kind": "set", "formats": ["png", "pdf"]},
            {"name": "heads", "kind": "heads", "formats": ["png"],
             "metrics": ["cls_self", "cls_patch_entropy", "patch_self", "patch_patch_entropy"]},
            {"name": "maps", "kind": "maps", "limit": min(MAP_IMAGES, len(photos))},
        ],
    }
    plan = plan_run(parse_config(raw))
    for line in plan.describe():
        echo(line)
    with _offline(no_network):
        outcome = execute(plan, device=device, progress=progress, compile=False, echo=echo)
    _write_tables(out, plan, outcome.results, weights)
    report.seconds = time.perf_counter() - start
    report.files = describe_files(out, models)
    write_index(report)
    return report


def _choose_weights(models: Sequence[str], checkpoints: Mapping[str, Path], random_init: bool, offline: bool,
                    img_size: int, model_kw: Mapping[str, Any] | None,
                    echo: Callable[[str], None]) -> tuple[dict[str, str], bool]:
    """Per model: ``"checkpoint <file>"``, ``"cached"``, ``"downloaded"`` or ``"random-init"``; and whether the
    network is off. The network is probed at most once, and only when some model's weights are not cached."""
    from .models.load import WeightsUnavailableError, load_model, weights_cached

    weights: dict[str, str] = {}
    online: bool | None = None
    with _offline(offline):
        for m in models:
            if random_init:
                weights[m] = "random-init"
            elif m in checkpoints:
                weights[m] = f"checkpoint {checkpoints[m]}"
            elif weights_cached(m):
                weights[m] = "cached"
            else:
                if online is None:
                    online = network_available()
                    echo("attnflow demo: network " + ("available: downloading missing weights" if online else
                                                      "unavailable or off: missing weights -> random init"))
                weights[m] = "random-init"
                if online:
                    try:
                        load_model(m, img_size=img_size, **dict(model_kw or {}))  # downloads into the cache
                        weights[m] = "downloaded"
                    except WeightsUnavailableError as err:
                        echo(f"attnflow demo: {m}: {err}")
    return weights, offline or online is False


def _write_tables(out: Path, plan: Any, results: Mapping[str, Path], weights: Mapping[str, str]) -> None:
    """``results.parquet`` (all models), ``summary.csv`` (one row per model) and ``per_block.csv`` (blocks 0-based,
    as in ``results.parquet``)."""
    import pandas as pd

    from .plot.info import model_info
    from .plot.style import PAPER_METRICS
    from .result import Result

    ids = [j.entry.id for j in plan.jobs if j.entry.id in results]
    result = Result.concat(Result.read(results[i]) for i in ids)
    result.write(out / "results.parquet")
    rows, blocks = [], []
    for model in ids:
        info, meta = model_info(result, model), result.run_meta(model)
        sub = result.frame[result.frame["model"] == model]
        row: dict[str, Any] = {"model": model, "label": info.label, "family": info.family,
                               "weights": weights.get(model, "?"), "sha256": meta.get("checkpoint_sha256"),
                               "images": meta.get("images_used"), "blocks": sub["block"].nunique(),
                               "heads": sub["head"].nunique()}
        for metric in PAPER_METRICS:
            per_block = result.per_block(metric)
            values = per_block[per_block["model"] == model].sort_values("block")["value"]
            row[f"{metric}_last_block"] = values.iloc[-1] if len(values) else float("nan")
            row[f"{metric}_mean_over_blocks"] = values.mean() if len(values) else float("nan")
        rows.append(row)
        for metric in PAPER_METRICS:
            per_block = result.per_block(metric)
            for _, r in per_block[per_block["model"] == model].iterrows():
                blocks.append({"model": model, "block": int(r["block"]), "metric": metric, "value": r["value"]})
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    frame = pd.DataFrame(blocks)
    wide = frame.pivot_table(index=["model", "block"], columns="metric", values="value", sort=False).reset_index()
    wide.to_csv(out / "per_block.csv", index=False)


# ------------------------------------------------------------------------------------------------ index

def _describe(rel: str, models: Sequence[str]) -> str:
    """One-line description of a demo output file from its relative path."""
    from .plot.style import METRIC_LABELS, METRIC_TITLES

    path = Path(rel)
    stem, ext = path.stem, path.suffix.lstrip(".").upper()
    if path.parts[0] == "photos":
        return f"input photo ({stem.split('_', 1)[-1]}), shipped with scikit-image / matplotlib / scikit-learn"
    if path.parts[0] == "stats":
        if path.name == "sha256.json":
            return "sha256 of the weight files, cached by size and modification time"
        model = next((m for m in models if stem.startswith(m + "-")), stem)
        what = {"PARQUET": "per-(block, head) statistics table", "CSV": "the same table as CSV",
                "JSON": "provenance: weights, sha256, images, resolution, versions, cache key"}
        return f"{model}: {what.get(ext, 'result file')}"
    if path.parts[0] == "figures":
        if stem.startswith("blocks-"):
            part = stem[len("blocks-"):]
            if part == "metrics":
                return f"the four metrics per block, one panel each (Figs. 3-6 side by side), {ext}"
            if part == "sizes":
                return f"the metrics per block by model size (Figs. 10-13), {ext}"
            return f"{METRIC_LABELS.get(part, part)} per block ({METRIC_TITLES.get(part, 'extra metric')}), {ext}"
        if stem.startswith("heads-"):
            part = stem[len("heads-"):]
            return f"{METRIC_LABELS.get(part, part)}: block x head heatmap per model, {ext}"
        if stem == "maps":
            return f"per-image maps of the last block: [cls] mean, lowest-entropy head, central patch (Fig. 9), {ext}"
    top = {"summary.csv": "one row per model: weights, images, each metric at the last block and averaged over blocks",
           "per_block.csv": "each metric per (model, block), averaged over heads (block 0-based as in every table; "
                            "figures number blocks from 1)",
           "results.parquet": "all models' statistics in one table (`attnflow plot attnflow-demo/results.parquet`)",
           "results.csv": "the same table as CSV", "results.json": "provenance of every model's run"}
    return top.get(rel, "output file")


def describe_files(out: Path, models: Sequence[str]) -> list[tuple[str, str]]:
    """Every file under ``out`` (index files excluded) with its description, sorted by folder then name."""
    order = {"summary.csv": 0, "per_block.csv": 1, "figures": 2, "results.parquet": 3, "results.csv": 3,
             "results.json": 3, "stats": 4, "photos": 5}
    rels = sorted((p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
                   and p.name not in ("index.md", "index.html") and not p.name.endswith((".tmp", ".state.pt"))),
                  key=lambda r: (order.get(r.split("/", 1)[0], 9), r))
    return [(r, _describe(r, models)) for r in rels]


def write_index(report: DemoReport) -> list[Path]:
    """Write ``index.md`` and ``index.html`` listing every file of the report; returns both paths."""
    out = report.out_dir
    weights = "\n".join(f"- `{m}`: {'**RANDOM-INIT (meaningless)**' if w == 'random-init' else w}"
                        for m, w in report.weights.items())
    banner = ("\n".join(["```", *report.banner, "```"]) + "\n\n") if report.banner else ""
    md = ["# attnflow demo\n", banner, f"Models and weights:\n\n{weights}\n",
          f"\nFinished in {report.seconds:.0f} s. Files:\n", "| file | what it is |", "| --- | --- |"]
    md += [f"| [{rel}]({rel}) | {desc} |" for rel, desc in report.files]
    (out / "index.md").write_text("\n".join(md) + "\n")

    esc = html.escape
    rows = []
    for rel, desc in report.files:
        preview = f'<br><img src="{esc(rel)}" style="max-width:900px">' if rel.startswith("figures/") and \
            rel.endswith(".png") else ""
        rows.append(f'<tr><td><a href="{esc(rel)}">{esc(rel)}</a></td><td>{esc(desc)}{preview}</td></tr>')
    warn = (f'<pre style="color:#c00000;font-weight:bold;border:3px solid #c00000;padding:8px">'
            f'{esc(chr(10).join(report.banner))}</pre>') if report.banner else ""
    items = "".join(f"<li><code>{esc(m)}</code>: {esc(w)}</li>" for m, w in report.weights.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>attnflow demo</title></head><body>"
            f"<h1>attnflow demo</h1>{warn}<p>Models and weights:</p><ul>{items}</ul>"
            f"<p>Finished in {report.seconds:.0f} s.</p><table border='1' cellpadding='4'>"
            f"<tr><th>file</th><th>what it is</th></tr>{''.join(rows)}</table></body></html>\n")
    (out / "index.html").write_text(page)
    return [out / "index.md", out / "index.html"]
