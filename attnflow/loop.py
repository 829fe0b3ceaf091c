"""The one resumable, sharded image loop under every dataset analysis.

:func:`~attnflow.attention_stats`, the Table 5 aggregation statistics
(:func:`~attnflow.aggregation.aggregation_statistics`) and localization (:func:`~attnflow.localize.localize`)
each give the loop an :class:`Analysis`: a *step* (one batch's forward and what it would add) and the
*accumulators* it adds to. The loop does the rest, once for all of them:

* sharding under torchrun (see :mod:`attnflow.data.sources`) and the DataLoader;
* the progress bar (main process);
* committing each batch atomically: a step computes without touching any state, and its commit adds the whole
  batch (accumulators, image count, skipped files, position) with Ctrl-C and SIGTERM held back, so a saved
  state is always that of whole batches;
* the resumable state: saved every ``checkpoint_every`` batches and when the loop is interrupted or fails after
  some progress, refused on resume with a line naming what differs (:mod:`attnflow.runstate`);
* at the end: the all-reduce of every accumulator, the skipped files of every process (in dataset order), and
  the "no readable image" error.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .data.images import DataError, ImageBatch
from .data.sources import ImageSource
from .dist import World, current_world
from .errors import AttnflowError
from .options import LoopOptions
from .reducers import Accumulator
from .runstate import RunState, images_fingerprint, keep_progress, rank_state_path, signals_deferred
from .vit import TokenLayout

log = logging.getLogger(__name__)

LOADER_TIMEOUT: float = 600.0
"""Seconds a DataLoader with workers may go without delivering a batch before the run stops with a
:class:`LoaderError` (a hung worker, e.g. out of shared memory, would otherwise wait forever)."""

Commit = Callable[[], None]
"""Adds one batch's results to the accumulators; fast, and never fails halfway (it runs with signals held)."""


class LoaderError(AttnflowError):
    """The image loader failed: a worker died or hung (one line, with what to try)."""


class Pending(Protocol):
    """A batch whose step is under way (e.g. a box search in threads)."""

    def wait(self) -> Commit:
        """Block until the batch's results are ready (no state changes); return its commit."""


@dataclass(frozen=True)
class Ready:
    """A batch whose results are ready at once (the usual case)."""

    commit: Commit

    def wait(self) -> Commit:
        return self.commit


@dataclass
class Analysis:
    """What an analysis gives the loop.

    Attributes:
        title: the progress bar's label.
        step: ``ImageBatch -> Pending`` for a batch with at least one image: the forward and what to add,
            without changing any state.
        accumulators: everything the analysis sums, by name (the names key the saved state).
        fingerprint: what must not change between an interrupted and a resumed run besides the images and the
            processes, which the loop adds (see :func:`attnflow.runstate.model_fingerprint`).
        in_flight: batches whose step may still be under way while the next batch runs.
        local: this process alone reads every image, even under torchrun (no sharding, no all-reduce): for work
            that one process does while the others wait (extracting a token cache).
    """

    title: str
    step: Callable[[ImageBatch], Pending]
    accumulators: Mapping[str, Accumulator]
    fingerprint: dict[str, Any]
    in_flight: int = 0
    local: bool = False


class LoopCounts(Accumulator):
    """The loop's own tally: images read and files skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.images: torch.Tensor
        self.skipped: list[tuple[str, str]]
        self.add_state("images", torch.zeros((), dtype=torch.int64))
        self.add_state("skipped", [], "cat")


class LayoutRecord(Accumulator):
    """The token layout of the run's forwards (each process's first, concatenated over processes)."""

    def __init__(self) -> None:
        super().__init__()
        self.layouts: list[tuple]
        self.add_state("layouts", [], "cat")

    def add(self, layout: TokenLayout) -> None:
        if not self.layouts:
            self.layouts.append((layout.num_prefix, layout.has_cls, tuple(layout.grid), tuple(layout.patch_size)))

    @property
    def layout(self) -> TokenLayout | None:
        """The first process's layout that read an image (``None`` before any)."""
        if not self.layouts:
            return None
        num_prefix, has_cls, grid, patch = self.layouts[0]
        return TokenLayout(int(num_prefix), bool(has_cls), (int(grid[0]), int(grid[1])),
                           (int(patch[0]), int(patch[1])))


@dataclass
class LoopRun:
    """What the loop did, over every process.

    Attributes:
        images: images read.
        skipped: ``(path, reason)`` of every skipped file, in dataset order.
        seconds: wall time, summed over the runs of a resumed loop.
        resumed: whether the loop continued a saved state.
        world: this process's place in the run.
    """

    images: int
    skipped: list[tuple[str, str]]
    seconds: float
    resumed: bool
    world: World = field(default_factory=World)

    def meta(self) -> dict[str, Any]:
        """The provenance keys every result records."""
        return {"images_used": self.images, "images_skipped": len(self.skipped),
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
                "world_size": self.world.size, "seconds": round(self.seconds, 3), "resumed": self.resumed}


def run_loop(analysis: Analysis, source: ImageSource, options: LoopOptions) -> LoopRun:
    """Run ``analysis`` over ``source``: every readable image once, over every process.

    Raises:
        DataError: no process read an image.
        LoaderError: a DataLoader worker died or sent nothing for :data:`LOADER_TIMEOUT` seconds.
        StateFileError, StateMismatchError: with ``options.resume``, an unreadable state or one of another run.
        Whatever the step raises (after saving the state of the last whole batch).
    """
    world = World() if analysis.local else current_world()
    counts = LoopCounts()
    accumulators: dict[str, Accumulator] = {"loop": counts, **analysis.accumulators}
    state = RunState(rank_state_path(Path(options.state_path), world.rank, world.size)
                     if options.state_path is not None else None, _fingerprint(analysis, source, world))
    saved = state.load() if options.resume else None
    for name, accumulator in accumulators.items() if saved else ():
        accumulator.load_state_dict(saved["accumulators"][name])  # type: ignore[index]
    if saved:
        log.info("resuming %s from %s: %d images done", analysis.title, state.path, int(counts.images))
    progress = _Progress(saved, accumulators)
    _iterate(analysis, source, options, state, progress, world)
    final = progress.snapshot() if options.keep_state and state.path is not None else None  # before the all-reduce
    for accumulator in accumulators.values() if not analysis.local else ():
        accumulator.all_reduce()
    run = LoopRun(int(counts.images), source.in_order(list(counts.skipped)), progress.seconds(), saved is not None,
                  world)
    if run.images == 0:
        state.remove()  # every file was unreadable: nothing to resume
        raise DataError(f"no readable image in the data ({len(run.skipped)} skipped{_example(run.skipped)})")
    if run.skipped and world.is_main:
        log.warning("skipped %d unreadable file(s)%s; the result's provenance lists every one", len(run.skipped),
                    _example(run.skipped))
    if final is not None:
        state.save(final)
    else:
        state.remove()
    return run


def _iterate(analysis: Analysis, source: ImageSource, options: LoopOptions, state: RunState, progress: _Progress,
             world: World) -> None:
    """The batches of this process, with the progress bar; on any failure or interrupt the loader is shut down
    first, then the state of the last whole batch is saved (nothing can interrupt the save)."""
    device = options.torch_device()
    batches, total = source.shard(world.rank, world.size, progress.done, options.batch_size, options.num_workers,
                                  pin_memory=device.type == "cuda", timeout=LOADER_TIMEOUT)
    bar = tqdm(total=total, initial=progress.done, unit="img" if source.is_dataset else "batch",
               desc=analysis.title, disable=not options.progress or not world.is_main, dynamic_ncols=True)
    every = options.checkpoint_every if state.path is not None else 0
    on_device = (source.on_device(batch, device) for batch in batches)  # uint8 batches: normalised there
    try:
        with logging_redirect_tqdm():  # log lines above the bar, never glued to it
            _batches(analysis, source, on_device, progress, bar, lambda: state.try_save(progress.snapshot()), every)
    except BaseException as err:
        with signals_deferred(reraise=False):  # neither a second Ctrl-C nor a worker's exit aborts the save
            bar.close()
            _shut_down(batches)
            keep_progress(state, progress.snapshot() if progress.done else None, int(progress.counts.images), err)
        loader_error = _loader_error(err, workers=options.num_workers > 0)
        if loader_error is not None:
            raise loader_error from err  # one line to the user; the cause kept for debugging
        raise
    bar.close()


def _example(skipped: list[tuple[str, str]]) -> str:
    return f", e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""


def _loader_error(err: BaseException, workers: bool) -> LoaderError | None:
    """A DataLoader's failure (a worker that died or hung; torch raises it from the next batch or from its SIGCHLD
    watchdog, wherever the main process is; a worker killed mid-transfer can also break the queue's pipe, seen as
    a ConnectionError or EOFError) as one line with what to try; ``None`` for any other error."""
    text = str(err) or type(err).__name__
    broken_pipe = workers and isinstance(err, (ConnectionError, EOFError))
    if not broken_pipe and (not isinstance(err, RuntimeError) or not text.startswith("DataLoader")):
        return None
    hint = ("; a worker died (out of shared memory? a container's /dev/shm is 64 MB by default: give it more with "
            "Docker's shm-size option, or use fewer workers, or workers=0)" if "timed out" not in text else
            "; a worker hung (out of shared memory, or a stalled file system): try fewer workers, or workers=0")
    return LoaderError(f"the image loader failed: {text.splitlines()[0].strip()}{hint}")


def _shut_down(batches: Iterator[ImageBatch]) -> None:
    """Stop a DataLoader's worker processes now, after a failure or an interrupt: they ignore Ctrl-C and SIGTERM
    (the main process ends them) and a hung one would never stop by itself, so they are killed, then reaped."""
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception as err:  # noqa: BLE001 - a worker that is already gone: nothing left to stop
            log.debug("shutting the loader down: %s", err)


@dataclass
class _Progress:
    """Items of this process's shard done (positions or batches), its accumulators, and the time spent over the
    resumed runs."""

    saved: dict[str, Any] | None
    accumulators: dict[str, Accumulator]
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.done = int(self.saved["done"]) if self.saved else 0

    @property
    def counts(self) -> LoopCounts:
        return self.accumulators["loop"]  # type: ignore[return-value]

    def seconds(self) -> float:
        return float((self.saved or {}).get("seconds", 0.0)) + time.perf_counter() - self.started

    def snapshot(self) -> dict[str, Any]:
        """The state to save: items done, time, every accumulator's host copy."""
        return {"done": self.done, "seconds": self.seconds(),
                "accumulators": {name: acc.state_dict() for name, acc in self.accumulators.items()}}


def _batches(analysis: Analysis, source: ImageSource, batches: Iterator[ImageBatch], progress: _Progress, bar: Any,
             save: Callable[[], Any], every: int) -> None:
    """Step through the batches; commit each whole batch once its step is done, oldest first, keeping at most
    ``analysis.in_flight`` batches under way."""
    pending: deque[tuple[Pending, ImageBatch]] = deque()
    committed, counts = 0, progress.counts

    def drain(keep: int) -> None:
        nonlocal committed
        while len(pending) > keep:
            step, batch = pending[0]
            commit = step.wait()  # may block; changes nothing
            with signals_deferred():  # the whole batch counts, or none of it
                pending.popleft()
                commit()
                counts.images += len(batch.images)
                counts.skipped.extend(batch.bad)
                progress.done += source.items_in(batch)
            for path, reason in batch.bad:
                log.debug("skipped %s (%s)", path, reason)
            bar.update(source.items_in(batch))
            committed += 1
            if every and committed % every == 0:
                save()  # (a state copies the accumulators to the host: a device sync)

    for batch in batches:
        pending.append((analysis.step(batch) if len(batch.images) else Ready(_nothing), batch))
        drain(keep=analysis.in_flight)
    drain(keep=0)


def _nothing() -> None:
    """The commit of a batch without a readable image."""


def _fingerprint(analysis: Analysis, source: ImageSource, world: World) -> dict[str, Any]:
    images = images_fingerprint(source.paths, source.root) if source.paths is not None and source.root else None
    return {**analysis.fingerprint, "images": images, "n_items": len(source) if source.is_dataset else None,
            "world": world.size, "rank": world.rank}
