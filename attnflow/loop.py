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

from .data.images import DataError, ImageBatch
from .data.sources import ImageSource
from .dist import World, current_world
from .options import LoopOptions
from .reducers import Accumulator
from .runstate import RunState, images_fingerprint, keep_progress, rank_state_path, signals_deferred
from .vit import TokenLayout

log = logging.getLogger(__name__)

Commit = Callable[[], None]
"""Adds one batch's results to the accumulators; fast, and never fails halfway (it runs with signals held)."""


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
    """

    title: str
    step: Callable[[ImageBatch], Pending]
    accumulators: Mapping[str, Accumulator]
    fingerprint: dict[str, Any]
    in_flight: int = 0


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
        StateFileError, StateMismatchError: with ``options.resume``, an unreadable state or one of another run.
        Whatever the step raises (after saving the state of the last whole batch).
    """
    world = current_world()
    counts = LoopCounts()
    accumulators: dict[str, Accumulator] = {"loop": counts, **analysis.accumulators}
    state = RunState(rank_state_path(Path(options.state_path), world.rank, world.size)
                     if options.state_path is not None else None, _fingerprint(analysis, source, world))
    saved = state.load() if options.resume else None
    progress = _Progress(saved)
    for name, accumulator in accumulators.items() if saved else ():
        accumulator.load_state_dict(saved["accumulators"][name])  # type: ignore[index]
    if saved:
        log.info("resuming %s from %s: %d images done", analysis.title, state.path, int(counts.images))
    device = options.torch_device()
    batches, total = source.shard(world.rank, world.size, progress.done, options.batch_size, options.num_workers,
                                  pin_memory=device.type == "cuda")
    bar = tqdm(total=total, initial=progress.done, unit="img" if source.is_dataset else "batch",
               desc=analysis.title, disable=not options.progress or not world.is_main, dynamic_ncols=True)

    def snapshot() -> dict[str, Any]:
        return {"done": progress.done, "seconds": progress.seconds(),
                "accumulators": {name: acc.state_dict() for name, acc in accumulators.items()}}

    try:
        _batches(analysis, source, batches, counts, progress, bar, lambda: state.try_save(snapshot()),
                 options.checkpoint_every if state.path is not None else 0)
    except BaseException as err:
        keep_progress(state, snapshot() if progress.done else None, int(counts.images), err)
        raise
    finally:
        bar.close()
    final = snapshot() if options.keep_state and state.path is not None else None  # before the all-reduce
    for accumulator in accumulators.values():
        accumulator.all_reduce()
    run = LoopRun(int(counts.images), source.in_order(list(counts.skipped)), progress.seconds(), saved is not None,
                  world)
    if run.images == 0:
        state.remove()  # every file was unreadable: nothing to resume
        example = f", e.g. {run.skipped[0][0]}: {run.skipped[0][1]}" if run.skipped else ""
        raise DataError(f"no readable image in the data ({len(run.skipped)} skipped{example})")
    if final is not None:
        state.save(final)
    else:
        state.remove()
    return run


@dataclass
class _Progress:
    """Items of this process's shard done (positions or batches), and the time spent over the resumed runs."""

    saved: dict[str, Any] | None
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.done = int(self.saved["done"]) if self.saved else 0

    def seconds(self) -> float:
        return float((self.saved or {}).get("seconds", 0.0)) + time.perf_counter() - self.started


def _batches(analysis: Analysis, source: ImageSource, batches: Iterator[ImageBatch], counts: LoopCounts,
             progress: _Progress, bar: Any, save: Callable[[], Any], every: int) -> None:
    """Step through the batches; commit each whole batch once its step is done, oldest first, keeping at most
    ``analysis.in_flight`` batches under way."""
    pending: deque[tuple[Pending, ImageBatch]] = deque()
    committed = 0

    def drain(keep: int) -> None:
        nonlocal committed
        while len(pending) > keep:
            step, batch = pending[0]
            commit = step.wait()  # may block; changes nothing
            with signals_deferred():  # the whole batch counts, or none of it
                pending.popleft()
                commit()
                counts.images += batch.images.shape[0]
                counts.skipped.extend(batch.bad)
                progress.done += source.items_in(batch)
            for path, reason in batch.bad:
                log.warning("skipped %s (%s)", path, reason)
            bar.update(source.items_in(batch))
            committed += 1
            if every and committed % every == 0:
                save()  # (a state copies the accumulators to the host: a device sync)

    for batch in batches:
        pending.append((analysis.step(batch) if batch.images.numel() else Ready(_nothing), batch))
        drain(keep=analysis.in_flight)
    drain(keep=0)


def _nothing() -> None:
    """The commit of a batch without a readable image."""


def _fingerprint(analysis: Analysis, source: ImageSource, world: World) -> dict[str, Any]:
    images = images_fingerprint(source.paths, source.root) if source.paths is not None and source.root else None
    return {**analysis.fingerprint, "images": images, "n_items": len(source) if source.is_dataset else None,
            "world": world.size, "rank": world.rank}
