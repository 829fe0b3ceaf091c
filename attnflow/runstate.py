"""The resumable state of a run over a dataset (see :mod:`attnflow.loop`, which runs every analysis).

A run saves its state (items done, the accumulators' sums, skipped files) every few batches, when it is
interrupted, and when it fails after some progress; it removes the file when it ends with nothing worth
resuming. The state carries a fingerprint of everything that changes the numbers (model, weights, images,
resolution, crop, autocast dtype, decode path, number of processes, and what an analysis adds): a resume with other
options is refused with a line that names them. The batch size, device, workers and q/k route may change: they give the
same numbers. States hold only tensors, numbers, strings and lists, and are read with
``torch.load(weights_only=True)``: a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .atomic import temporary_path, write_atomically
from .errors import AttnflowError
from .options import dtype_name
from .provenance import weights_fingerprint

log = logging.getLogger(__name__)

OPTIONS: dict[str, str] = {
    "model": "the model",
    "weights": "the weights (checkpoint, checkpoint key, model_kw, or the input size through the position table)",
    "images": "the image files (the folder, limit, or files replaced under the same names)",
    "n_items": "the number of images (the folder, limit)",
    "img_size": "img_size",
    "crop_pct": "crop_pct",
    "amp": "amp",
    "decode": "decode (pil, fast, gpu: the pixels differ slightly)",
    "world": "the number of processes (torchrun --nproc_per_node)",
    "rank": "the process rank",
    "head": "the head's weights",
    "boxes": "the ground-truth boxes",
    "metric": "the metric settings (IoU thresholds, cam curve interval, hole contours, interpolation)",
    "sources": "the aggregation sources",
    "rules": "the version of the aggregation sources' definitions (attnflow 'rules' 2: the official central patch)",
    "reference": "the reference model's weights",
}
"""Fingerprint keys and what a user changes them with (in the order a mismatch names them)."""

FORMAT = 2
"""Version of the state layout; a state of another version is refused with a line saying so."""

_HASHED = frozenset({"weights", "images", "head", "boxes", "reference"})
"""Fingerprint keys whose values are digests: a mismatch says they differ rather than printing them."""

_ABSENT: dict[str, str] = {"decode": "pil"}
"""What a fingerprint without the key means (``decode`` is recorded only when it is not the exact path, so states
written before it existed, all of the exact path, still resume)."""


class StateFileError(AttnflowError):
    """A state file that cannot be read (truncated, not a state file)."""


class StateMismatchError(AttnflowError):
    """A state file written by a run with other options than the one that would resume from it."""


def rank_state_path(path: Path, rank: int, world: int) -> Path:
    """The state file of one process: ``path`` itself, or ``STEM.rank{rank}SUFFIX`` under torch.distributed."""
    return path if world == 1 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def state_files(path: Path) -> list[Path]:
    """The state files that exist for ``path``, of a one-process run and of torchrun runs of any size."""
    ranks = sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}")) if path.parent.is_dir() else []
    return ([path] if path.exists() else []) + ranks


def images_fingerprint(paths: list[Path], root: Path) -> str:
    """A short hash of the image files of a run: their names relative to ``root`` and their sizes in bytes.

    The same files moved elsewhere (a copy on a local disk) keep it; another folder, another ``limit``, or
    files replaced by other images under the same names (which almost always changes their sizes) change it.
    Contents are not hashed: reading ImageNet-val twice to resume would cost as much as the run. A file that
    cannot be stat'ed (a broken link) counts with size -1, as the run skips it.
    """
    digest = hashlib.sha256()
    for p in paths:
        try:
            rel = p.relative_to(root)
        except ValueError:
            rel = Path(p.name)
        try:
            size = p.stat().st_size
        except OSError:
            size = -1
        digest.update(rel.as_posix().encode() + b"\0" + str(size).encode() + b"\0")
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module, name: str, amp: torch.dtype | None, *, decode: str | None = None,
                      **extra: Any) -> dict[str, Any]:
    """The model's part of a run's fingerprint: its name, weights and autocast dtype, plus ``extra`` keys of the
    analysis (``img_size``, ``crop_pct``, ``head``, ...; see :data:`OPTIONS`) and the decode path of a folder's
    images (``fast`` or ``gpu``; ``pil`` or ``None`` add nothing). The loop adds the images and the processes."""
    out = {"model": name, "weights": weights_fingerprint(model), "amp": dtype_name(amp), **extra}
    return out | ({"decode": decode} if decode not in (None, "pil") else {})


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One phrase per differing key, e.g. ``crop_pct 0.875 (now 0.5)``."""
    keys = [k for k in OPTIONS if k in saved or k in current] + sorted((set(saved) | set(current)) - set(OPTIONS))
    out = []
    for key in keys:
        old, new = saved.get(key, _ABSENT.get(key)), current.get(key, _ABSENT.get(key))
        if old == new:
            continue
        label = OPTIONS.get(key, key)
        shown = ["the default" if v is None else v for v in (old, new)]
        out.append(f"{label} differ" if key in _HASHED else f"{label} {shown[0]} (now {shown[1]})")
    return out


class RunState:
    """The state file of one process: atomic saves, checked loads.

    Args:
        path: the file (``None``: no state is kept).
        fingerprint: :func:`run_fingerprint` of this run.
    """

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def load(self) -> dict[str, Any] | None:
        """The saved state, or ``None`` when there is none.

        Raises:
            StateFileError: the file is unreadable (truncated, not a state file).
            StateMismatchError: the file belongs to a run with other options.
        """
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to unpickle means the file is unusable
            raise StateFileError(f"the state file {self.path} is unreadable ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else 'no detail'}); delete {self.path} "
                                 "to start over") from err
        if isinstance(state, dict) and "done_items" in state:
            raise StateFileError(f"{self.path} was written by an older attnflow (state format 1); delete "
                                 f"{self.path} to start over")
        if not isinstance(state, dict) or state.get("format") != FORMAT or not {"fingerprint", "done",
                                                                                "accumulators"} <= set(state):
            raise StateFileError(f"{self.path} is not an attnflow state file; delete {self.path} to start over")
        if state["fingerprint"] != self.fingerprint:
            diff = _differences(state["fingerprint"], self.fingerprint)
            raise StateMismatchError(f"cannot resume from {self.path}: it belongs to a different run: "
                                     f"{'; '.join(diff)}. Resume with the interrupted run's options, or delete "
                                     f"{self.path} to start over")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically (see :mod:`attnflow.atomic`): a run killed while writing leaves the previous
        state intact."""
        if self.path is None:
            return
        payload = {**state, "format": FORMAT, "fingerprint": self.fingerprint}
        write_atomically({self.path: lambda tmp: torch.save(payload, tmp)})

    def try_save(self, state: dict[str, Any]) -> bool:
        """:meth:`save`, logging instead of raising when the disk refuses (the run itself can go on)."""
        try:
            self.save(state)
        except OSError as err:
            log.warning("could not save the run's state to %s: %s", self.path, err.strerror or err)
            return False
        return True

    def remove(self) -> None:
        """Delete the state file (and a temporary file a killed save left)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            temporary_path(self.path).unlink(missing_ok=True)


def keep_progress(state_file: RunState, state: dict[str, Any] | None, n_images: int, err: BaseException) -> None:
    """After a failed or interrupted loop: save ``state`` (the last completed batch; the failed one is redone)
    when there is progress to resume, else remove the state file, so a plain rerun need not ask to resume."""
    if state_file.path is None:
        return
    if state is None:
        state_file.remove()
        return
    what = "interrupted" if isinstance(err, KeyboardInterrupt) else f"failed ({type(err).__name__})"
    if state_file.try_save(state):
        log.warning("%s after %d images; state saved to %s: resume the run to continue (after fixing the cause), "
                    "or delete it to start over", what, n_images, state_file.path)


@contextlib.contextmanager
def signals_deferred(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGCHLD back while a batch's results are added to a run's state or the state is
    saved, so an interrupt never lands between two of the additions (a state saved then would count part of a
    batch that the resumed run counts again), and torch's DataLoader watchdog (a SIGCHLD handler that raises when a
    worker dies) cannot abort them either. A signal that arrives meanwhile is noted and raised again as soon as the
    block ends, for the handlers in place before it. Python runs signal handlers in the main thread whichever thread
    the signal reaches, so noting it there is enough; elsewhere (signals cannot be handled there) the block runs as
    is. Only Python handlers are held: a default or ignored SIGCHLD stays as it is. With ``reraise=False`` (saving
    the state of a run that is already failing or interrupted) the noted signals are dropped: the run's own error
    goes on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous: dict[int, Any] = {}
    for held in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        handler = signal.getsignal(held)
        if handler is None or (held == signal.SIGCHLD and not callable(handler)):
            continue  # None: a handler set outside Python (it could not be restored); SIG_DFL/SIG_IGN children
        previous[held] = signal.signal(held, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for arrived in dict.fromkeys(noted) if reraise else ():  # once each, in arrival order
            signal.raise_signal(arrived)
