"""``attnflow run``: plan what an analysis needs, compute the missing statistics, render the figures.

:func:`plan_run` decides, without loading any model, which results the run directory already holds (see
:mod:`attnflow.runner.cache`) and which must be computed; :func:`execute` computes them (each model loaded
once, for its statistics and its per-image maps), writes them to ``RUN_DIR/stats/`` and renders every figure.
An interrupted computation leaves ``<result>.state.pt`` behind and the next ``run`` resumes from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..models.load import cached_weights_path
from ..options import DEFAULT_DECODE
from ..result import Result
from .cache import UNKNOWN_WEIGHTS, RunKey, ShaCache, Stored, find_stored
from .config import AnalysisConfig, ConfigError, ModelEntry
from .figures import MapsData, output_files, render_maps_figure, render_stats_figure

log = logging.getLogger(__name__)

Echo = Callable[[str], None]


@dataclass
class Job:
    """One model of a run: its cache key, whether its statistics are stored, which maps figures need it.

    Attributes:
        entry: the config entry.
        key: what a stored result must match.
        stored: the matching stored result, or ``None`` (to compute).
        needs_stats: a statistics figure uses this model.
        maps: names of the ``maps`` figures that show this model.
        weights_note: where the weights come from, for the printed plan.
    """

    entry: ModelEntry
    key: RunKey
    stored: Stored | None
    needs_stats: bool
    maps: list[str]
    weights_note: str

    @property
    def compute(self) -> bool:
        """Whether the statistics must be computed."""
        return self.needs_stats and self.stored is None

    @property
    def loads_model(self) -> bool:
        """Whether the run builds this model (to compute statistics or maps)."""
        return self.compute or bool(self.maps)


@dataclass
class Plan:
    """What a run will do; :meth:`describe` is what ``attnflow run`` prints first."""

    config: AnalysisConfig
    jobs: list[Job]
    n_files: int | None
    missing_data: list[str] = field(default_factory=list)
    """Why a real run would stop for want of data (a data root); only a plan made with ``require_data=False``
    (a dry run) holds any."""

    @property
    def stats_dir(self) -> Path:
        return self.config.run_dir / "stats"

    def result_path(self, job: Job) -> Path:
        """Where ``job``'s result is (reused) or will be written (computed)."""
        return job.stored.path if job.stored else self.stats_dir / f"{job.key.stem()}.parquet"

    def state_path(self, job: Job) -> Path:
        """The resumable state file of ``job``'s computation."""
        return self.stats_dir / f"{job.key.stem()}.state.pt"

    def describe(self, dry_run: bool = False) -> list[str]:
        """One line per model (reuse / compute / maps only) and the figures to write."""
        cfg = self.config
        n = f"{self.n_files} images" if self.n_files is not None else "not found"
        if self.n_files is None and dry_run:
            n += ": not checked by a dry run"
        used = ""
        if self.n_files is not None and cfg.limit is not None and cfg.limit < self.n_files:
            used = f", limit {cfg.limit}"
        crop = f", crop {cfg.crop_pct}" if cfg.crop_pct is not None else ""
        lines = [f"analysis {cfg.name}: {cfg.title}",
                 f"  data {cfg.data_root} ({n}{used}), {cfg.img_size} px{crop}; run dir {cfg.run_dir}"]
        if cfg.expected_images and self.n_files is not None and self.n_files != cfg.expected_images:
            lines.append(f"  warning: the paper used {cfg.expected_images} images; the folder has {self.n_files}")
        if cfg.notes:
            lines.append(f"  note: {cfg.notes}")
        verb = "would compute" if dry_run else "compute"
        width = max(len(j.entry.id) for j in self.jobs)
        for job in self.jobs:
            name = job.entry.id.ljust(width)
            if job.stored is not None and job.needs_stats:
                meta = job.stored.meta
                unchecked = " (weights not on this machine: sha256 not checked)" \
                    if job.key.weights == UNKNOWN_WEIGHTS else ""
                lines.append(f"  reuse    {name}  {job.stored.path} ({meta.get('images_used')} images, "
                             f"{_weights_short(meta['analysis_key']['weights'])}){unchecked}")
            elif job.compute:
                resume = " (resuming an interrupted run)" if self.state_path(job).exists() else ""
                lines.append(f"  {verb:<8} {name}  {job.weights_note} -> {self.result_path(job)}{resume}")
            elif job.maps:
                lines.append(f"  maps     {name}  {job.weights_note} (per-image maps only)")
            else:
                lines.append(f"  skip     {name}  (no figure uses it)")
            if job.entry.notes and dry_run:
                lines.append(f"           {' ' * width}  note: {job.entry.notes}")
        for fig in cfg.figures:
            files = output_files(fig, cfg.figures_dir)
            paper = f" [{fig.paper}]" if fig.paper else ""
            shown = ", ".join(p.name for p in files[:4]) + (f", ... ({len(files)} files)" if len(files) > 4 else "")
            lines.append(f"  figure   {fig.name}{paper}: {fig.kind} -> {cfg.figures_dir}/{{{shown}}}")
        lines += [f"  missing  {problem}" for problem in self.missing_data]
        if self.missing_data:
            lines.append("  dry run: nothing was read; without this data a real run stops with the first 'missing' "
                         "line as its error")
        return lines


@dataclass
class RunOutcome:
    """What :func:`execute` did: result files per model id, figure files, computed and reused ids."""

    results: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    random_init: list[str] = field(default_factory=list)


def _weights_short(weights: str) -> str:
    return f"sha256 {weights[7:19]}" if weights.startswith("sha256:") else weights


def _key_for(entry: ModelEntry, cfg: AnalysisConfig, n_files: int | None, shas: ShaCache) -> tuple[RunKey, str]:
    """The cache key of ``entry`` before loading it, and a note on its weights."""
    if entry.random_init:
        weights, official, note = "random-init", False, "random init"
    elif entry.checkpoint is not None:
        if not entry.checkpoint.is_file():
            raise ConfigError(f"{entry.id}: checkpoint {entry.checkpoint} does not exist")
        weights, official = f"sha256:{shas.sha256(entry.checkpoint)}", False
        note = f"checkpoint {entry.checkpoint.name} ({_weights_short(weights)})"
    else:
        path = cached_weights_path(entry.name)
        official = True
        if path is None:
            weights, note = UNKNOWN_WEIGHTS, "official weights (not cached: downloaded when online)"
        else:
            weights = f"sha256:{shas.sha256(path)}"
            note = f"official weights {path.name} ({_weights_short(weights)})"
    limit = cfg.limit if not (n_files is not None and cfg.limit is not None and cfg.limit >= n_files) else None
    root = str(cfg.data_root.resolve()) if cfg.data_root is not None else None
    key = RunKey(model=entry.name, id=entry.id, weights=weights, official_weights=official,
                 model_kw=dict(entry.model_kw), checkpoint_key=entry.checkpoint_key, data_root=root,
                 n_files=n_files, limit=limit, img_size=cfg.img_size, crop_pct=cfg.crop_pct,
                 decode=DEFAULT_DECODE if cfg.decode == "auto" else cfg.decode)
    return key, note


def plan_run(cfg: AnalysisConfig, *, require_data: bool = True) -> Plan:
    """Decide what ``cfg`` needs: reuse or compute each model's statistics; which models the maps need.

    Args:
        cfg: the analysis.
        require_data: refuse a plan that would need data that is not there (a real run); ``False`` (a dry run)
            records why in ``Plan.missing_data`` instead, and reads no image.

    Raises:
        ConfigError: a checkpoint file is missing; with ``require_data``, statistics must be computed and the
            data root does not exist, or a maps figure has no images (the message asks for a data root).
    """
    from ..data.images import find_images

    data_root = cfg.data_root if cfg.data_root is not None and cfg.data_root.exists() else None
    n_files = len(find_images(data_root)) if data_root is not None else None
    shas = ShaCache(cfg.run_dir / "stats" / "sha256.json")
    stats_ids = {e.id for e in cfg.stats_models()}
    jobs = []
    for entry in cfg.models:
        key, note = _key_for(entry, cfg, n_files, shas)
        needs = entry.id in stats_ids
        stored = find_stored(cfg.run_dir / "stats", key) if needs else None
        maps = [f.name for f in cfg.figures if f.kind == "maps" and entry.id in (f.models or [e.id for e in cfg.models])]
        jobs.append(Job(entry, key, stored, needs, maps, note))
    plan = Plan(cfg, jobs, n_files, _missing_data(cfg, jobs, data_root is not None))
    if require_data and plan.missing_data:
        raise ConfigError(f"{cfg.name}: {plan.missing_data[0]}")
    return plan


def _missing_data(cfg: AnalysisConfig, jobs: list[Job], root_ok: bool) -> list[str]:
    """Why a run of ``jobs`` cannot proceed without data: statistics to compute without a data root, maps figures
    without images; each a phrase that asks for a data root."""
    problems = []
    missing = [j.entry.id for j in jobs if j.compute]
    if missing and not root_ok:
        where = cfg.data_root if cfg.data_root is not None else "(none given)"
        problems.append(f"data root {where} does not exist, and the statistics of {', '.join(missing)} are not "
                        f"cached in {cfg.run_dir}: give a data root (the config's data.root), e.g. the ImageNet "
                        "validation folder")
    for fig in cfg.figures:
        images = fig.images or cfg.data_root
        if fig.kind == "maps" and (images is None or not images.exists()):
            problems.append(f"figure {fig.name!r} draws maps on {images}, which does not exist: give a data "
                            "root (the config's data.root) or set images = \"...\" in the figure")
    return problems


def load_entry(entry: ModelEntry, img_size: int) -> torch.nn.Module:
    """Build a config entry's model; random weights are seeded by the entry's id (``load_model``'s
    ``seed_name``): reruns agree, and two random entries of one architecture differ."""
    from ..models.load import load_model

    key = None if entry.random_init else entry.checkpoint_key  # no file to read it from
    return load_model(entry.name, checkpoint=entry.checkpoint, random_init=entry.random_init, img_size=img_size,
                      checkpoint_key=key, seed_name=entry.id, **dict(entry.model_kw))


def execute(plan: Plan, *, device: str | None = None, progress: bool = True, compile: bool | None = None,
            figures: bool = True, echo: Echo = log.info,
            stats_kwargs: dict[str, Any] | None = None) -> RunOutcome:
    """Compute what ``plan`` lacks, then render its figures.

    Args:
        plan: from :func:`plan_run`.
        device: ``cuda``/``cpu`` (default: autodetect).
        progress: tqdm bars.
        compile: ``torch.compile`` the statistics (default: :func:`attention_stats`'s rule).
        figures: render the figures (else only the statistics).
        echo: where progress lines go (the CLI passes ``print``).
        stats_kwargs: extra keyword arguments for :func:`attnflow.attention_stats`.

    Returns:
        :class:`RunOutcome`.
    """
    from ..stats import attention_stats
    from ..options import resolve_device
    from ..models.registry import find_spec
    from ..maps import ROLLOUT_KIND, model_maps
    from ..models.record import model_record

    cfg = plan.config
    dev = resolve_device(device)
    outcome = RunOutcome()
    maps_crop = cfg.crop_pct if cfg.crop_pct is not None else 0.875
    maps_data = {f.name: _maps_images(f.images or cfg.data_root, f.limit, cfg.img_size, maps_crop)
                 for f in cfg.figures if f.kind == "maps"}
    figure_blocks = {f.name: f.block for f in cfg.figures if f.kind == "maps"}
    rollout = {f.name: ROLLOUT_KIND in (f.kinds or ()) for f in cfg.figures if f.kind == "maps"}
    for job in plan.jobs:
        if job.entry.random_init:
            outcome.random_init.append(job.entry.id)
        if job.stored is not None and job.needs_stats:
            outcome.results[job.entry.id] = job.stored.path
            outcome.reused.append(job.entry.id)
        if not job.loads_model:
            continue
        model = load_entry(job.entry, cfg.img_size).to(dev)
        record = model_record(model)
        if job.compute:
            if cfg.data_root is None:  # plan_run refuses such a plan
                raise ConfigError(f"{cfg.name}: no data root to compute the statistics of {job.entry.id} on: "
                                  "give a data root (the config's data.root)")
            echo(f"computing {job.entry.id} over {cfg.data_root} ...")
            key = job.key.to_json() | {"weights": f"sha256:{record.sha256}" if record.sha256 else "random-init"}
            result = attention_stats(
                model, cfg.data_root, batch_size=cfg.batch_size, device=dev, amp=cfg.amp, workers=cfg.workers,
                img_size=cfg.img_size, crop_pct=cfg.crop_pct, limit=cfg.limit, model_name=job.entry.id,
                state_path=plan.state_path(job), checkpoint_every=cfg.checkpoint_every, resume=True,
                progress=progress, compile=compile, decode=cfg.decode,
                meta={"analysis_key": key, "analysis": cfg.name, "img_size": cfg.img_size,
                      **dict(job.entry.display)},
                keep_state=True, **(stats_kwargs or {}))
            path = _write_result(result, plan.result_path(job), plan.state_path(job))
            outcome.results[job.entry.id] = path
            outcome.computed.append(job.entry.id)
            echo(f"wrote {path} ({result.meta['images_used']} images, {result.meta['seconds']:.1f} s)")
        for name in job.maps:
            data = maps_data[name]
            crops, maps = model_maps(model, data.images, img_size=cfg.img_size, crop_pct=maps_crop,
                                     block=figure_blocks[name], device=dev, rollout=rollout[name])
            data.maps_data.crops = data.maps_data.crops if data.maps_data.crops is not None else crops
            data.maps_data.maps[job.entry.id] = maps
            spec = find_spec(job.entry.name)
            data.maps_data.labels[job.entry.id] = job.entry.display.get("label") or (spec.label if spec
                                                                                       else job.entry.id)
            if record.random_init:
                data.maps_data.random.append(job.entry.id)
        del model
    if figures:
        outcome.figures = render_figures(plan, outcome.results, {k: v.maps_data for k, v in maps_data.items()})
    return outcome


@dataclass
class _MapsInput:
    images: list[Any]
    maps_data: MapsData


def _write_result(result: Result, path: Path, state: Path) -> Path:
    """Write ``result``, then remove its resumable state; when the write fails (full disk, quota) the state is
    kept, so the next ``attnflow run`` only writes the outputs.

    Raises:
        AttnflowError: the outputs could not be written (names the kept state file).
    """
    from ..errors import AttnflowError
    from ..runstate import RunState

    try:
        written = result.write(path)
    except OSError as err:
        raise AttnflowError(f"cannot write {path}: {err.strerror or err}; the finished statistics are kept in "
                            f"{state}: make room and rerun (it only writes the outputs)") from err
    RunState(state, {}).remove()
    return written


def _maps_images(root: Path | None, limit: int, img_size: int, crop_pct: float) -> _MapsInput:
    from ..data.images import load_images
    from ..data.transforms import eval_resize

    if root is None:
        raise ConfigError("a maps figure needs images: set images = \"...\" or a data root")
    paths, images = load_images(root, limit, check=eval_resize(img_size, crop_pct).check)
    return _MapsInput(images, MapsData(paths=list(paths)))


def render_figures(plan: Plan, results: dict[str, Path], maps: dict[str, MapsData]) -> list[Path]:
    """Render every figure of the plan's config from result files and computed maps."""
    cfg = plan.config
    loaded: dict[str, Result] = {}
    written: list[Path] = []
    for fig in cfg.figures:
        if fig.kind == "maps":
            written += render_maps_figure(fig, maps[fig.name], cfg.figures_dir)
            continue
        ids = list(fig.models or [e.id for e in cfg.stats_models()])
        for i in ids:
            if i not in loaded:
                loaded[i] = Result.read(results[i])
                loaded[i].meta.update(cfg.model(i).display)  # display keys may change without recomputing
        written += render_stats_figure(fig, Result.concat(loaded[i] for i in ids), cfg.figures_dir)
    return written
