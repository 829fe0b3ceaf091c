"""What every command shares: argument types, the shared option groups (one help text per option, the same in
every command), model loading from the model options, and :func:`run_resumable`, the one wrapper of a
resumable dataset command (``stats``, ``aggregate``, ``localize``).

Nothing here imports torch at module level: ``attnflow --help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import AttnflowError
from ..limits import DECODES

PRECISION_CHOICES = ("auto", "bf16", "fp16", "fp32", "none")
"""``--amp`` words (see :mod:`attnflow.options`; ``none`` is ``fp32``)."""


# ------------------------------------------------------------------------------------------ argument types

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (so that 0 or a negative number is a usage error, not a traceback)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _checked(value: Any, check: Callable[..., None]) -> Any:
    """``value`` when ``check`` (a rule of :mod:`attnflow.limits`, the one the Python API applies) accepts it."""
    from ..limits import OptionError

    try:
        check(value, name="")
    except OptionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def crop_fraction(text: str) -> float:
    """argparse type: a center-crop fraction (:func:`attnflow.limits.check_crop_pct`: the resize side is
    ``img_size / crop_pct``, bounded)."""
    from ..limits import check_crop_pct

    return _checked(_float(text), check_crop_pct)


def image_size(text: str) -> int:
    """argparse type: an input resolution (:func:`attnflow.limits.check_img_size`)."""
    from ..limits import check_img_size

    return _checked(_int(text), check_img_size)


def cam_curve_interval(text: str) -> float:
    """argparse type: the spacing of score-map thresholds (:func:`attnflow.limits.check_cam_curve_interval`)."""
    from ..limits import check_cam_curve_interval

    return _checked(_float(text), check_cam_curve_interval)


def dpi(text: str) -> int:
    """argparse type: a figure resolution (:func:`attnflow.limits.check_dpi`)."""
    from ..limits import check_dpi

    return _checked(_int(text), check_dpi)


def digits(text: str) -> int:
    """argparse type: a number of decimals (:func:`attnflow.limits.check_digits`)."""
    from ..limits import check_digits

    return _checked(_int(text), check_digits)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (:func:`attnflow.limits.check_non_negative`)."""
    from ..limits import check_non_negative

    return _checked(_float(text), lambda value, name: check_non_negative(name, value))


# ------------------------------------------------------------------------------------------ shared options

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--checkpoint-key``, ``--random-init``, ``--img-size``, ``--model-kw``: how the model
    is built (every command that builds one model)."""
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint", metavar="PATH", help="local weights file in the model's official format")
    group.add_argument("--checkpoint-key", metavar="KEY",
                       help="top-level key of the weights when not the format's default "
                            "(e.g. target_encoder for I-JEPA, student for DINO/iBOT full checkpoints)")
    group.add_argument("--random-init", action="store_true",
                       help="build the architecture without weights (smoke tests; numbers are meaningless)")
    group.add_argument("--img-size", type=image_size, default=224, help="input resolution (default 224)")
    group.add_argument("--model-kw", action="append", default=[], metavar="KEY=VALUE",
                       help="extra timm.create_model argument, e.g. dynamic_img_size=True (repeatable)")


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that build the reference model of a ``reference:<name>`` aggregation."""
    group = parser.add_argument_group("reference model (its [cls] attention weighs this model's patch tokens)")
    group.add_argument("--reference-checkpoint", metavar="PATH", help="local weights of the reference model")
    group.add_argument("--reference-checkpoint-key", metavar="KEY", help="top-level key of the reference weights")
    group.add_argument("--reference-random-init", action="store_true",
                       help="build the reference without weights (smoke tests)")
    group.add_argument("--reference-model-kw", action="append", default=[], metavar="KEY=VALUE",
                       help="extra timm.create_model argument of the reference (repeatable)")


def add_device_argument(parser: Any) -> None:
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda if available)")


def add_amp_argument(parser: Any, default: str | None = "auto") -> None:
    """``--amp`` (``default=None``: not given, so a config file's value stands)."""
    parser.add_argument("--amp", default=default, choices=PRECISION_CHOICES,
                        help="autocast precision: auto (bf16 on a GPU that supports it, else fp32), bf16, fp16 "
                             "(GPU only), fp32 (none is the same); the softmax and the numbers stay fp32")


def add_workers_argument(parser: Any) -> None:
    parser.add_argument("--workers", type=non_negative_int, metavar="N",
                        help="DataLoader worker processes (default min(8, CPUs))")


def add_decode_argument(parser: Any, default: str | None = "auto") -> None:
    """``--decode`` (``default=None``: not given, so a config file's value stands)."""
    parser.add_argument("--decode", default=default, choices=DECODES,
                        help="how image files become tensors: fast (libjpeg-turbo JPEG decode, uint8 resize and "
                             "crop, normalised on the device), pil (PIL and timm's transform: the exact path), gpu "
                             "(JPEGs decoded on the CUDA device), auto (= fast; default); see docs/performance.md")


def add_limit_argument(parser: Any, what: str = "images") -> None:
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help=f"use N evenly spaced {what} (a deterministic subset)")


def add_progress_argument(parser: Any) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_resume_argument(parser: Any) -> None:
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --out")


def add_loop_arguments(parser: argparse.ArgumentParser, *, limit: str = "images") -> None:
    """The options of a resumable dataset loop (see :class:`attnflow.options.LoopOptions`), in one group."""
    group = parser.add_argument_group("run")
    group.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    add_device_argument(group)
    add_amp_argument(group)
    add_workers_argument(group)
    add_decode_argument(group)
    add_limit_argument(group, limit)
    add_resume_argument(group)
    group.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="BATCHES",
                       help="save resumable state every N batches (default 50)")
    add_progress_argument(group)


def add_name_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="the run's name in the table's model column and in figure legends "
                                       "(default: --model), e.g. mae-b16-cub for a second dataset")


# ------------------------------------------------------------------------------------------ models

def parse_model_kwargs(items: list[str]) -> dict[str, Any]:
    """``["depth=2", "qkv_bias=False"]`` -> ``{"depth": 2, "qkv_bias": False}`` (Python literals or strings)."""
    import ast

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AttnflowError(f"--model-kw expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_model_from(args: argparse.Namespace, name: str | None = None, *, prefix: str = "") -> Any:
    """The model ``name`` (default ``args.model``) built from the model options (``--{prefix}checkpoint``, ...)
    at the run's ``--img-size``; random weights are seeded by the run's name (``--name``, else the model's)."""
    from ..models.load import load_model

    option = prefix.replace("-", "_")
    name = name or args.model
    run_name = getattr(args, "name", None) if not prefix else None
    return load_model(name, checkpoint=getattr(args, f"{option}checkpoint"),
                      random_init=getattr(args, f"{option}random_init"), img_size=args.img_size,
                      checkpoint_key=getattr(args, f"{option}checkpoint_key"), seed_name=run_name or name,
                      **parse_model_kwargs(getattr(args, f"{option}model_kw")))


def is_random(model: Any) -> bool:
    """Whether ``model`` was built without weights."""
    from ..models.record import model_record

    return model_record(model).random_init


def check_data_and_amp(data: str, amp: str, device: str | None, decode: str = "auto") -> None:
    """Fail fast, before a model is loaded (which can take a minute): a missing ``--data``, an unknown device,
    ``--amp bf16/fp16`` on the CPU, whose autocast would round the softmax, and ``--decode gpu`` without CUDA."""
    from ..data.images import DataError
    from ..options import autocast_dtype, decode_mode, resolve_device

    if not Path(data).exists():
        raise DataError(f"{data}: no such file or folder")
    resolved = resolve_device(device)
    autocast_dtype(amp, resolved)
    decode_mode(decode, resolved)


def loop_options(args: argparse.Namespace, device: Any, state: Path | None) -> Any:
    """The :class:`~attnflow.options.LoopOptions` of the loop options in ``args`` (``device``: this process's)."""
    from ..options import LoopOptions

    return LoopOptions(batch_size=args.batch_size, device=str(device), amp=args.amp, workers=args.workers,
                       limit=args.limit, progress=not args.no_progress, state_path=state, resume=args.resume,
                       checkpoint_every=args.checkpoint_every, keep_state=state is not None, decode=args.decode)


# ------------------------------------------------------------------------------------------ outputs

def check_output_folder(out: Path) -> None:
    """Create the folder of ``out`` now, so that an unwritable ``--out`` fails before the run, not after it.

    Raises:
        AttnflowError: when the folder cannot be created or written to.
    """
    folder = out.parent
    if folder.exists() and not folder.is_dir():
        raise AttnflowError(f"--out {out}: cannot create the folder {folder}: it is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AttnflowError(f"--out {out}: cannot create the folder {folder}: {err.strerror or err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AttnflowError(f"--out {out}: the folder {folder} is not writable")


def output_dir(out: str, command: str) -> Path:
    """``--out`` of a command that writes a directory: refused when it is a file or cannot be written; created."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise AttnflowError(f"--out {path} is a file; {command} writes a directory there")
    check_output_folder(path / "x")
    return path


def output_table(out: str) -> Path:
    """``--out`` of a command that writes one result table: ``NAME.parquet`` (``.csv``: the same table), with
    ``NAME.csv`` and ``NAME.json`` beside it; its folder is created now (an unwritable one fails before the run).

    Raises:
        AttnflowError: a folder, or another suffix (one line naming what would be written).
    """
    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        raise AttnflowError(f"--out {out} is a folder: give the table's file name, e.g. {path / 'stats.parquet'}")
    if path.suffix not in ("", ".parquet", ".csv"):
        raise AttnflowError(f"--out {out}: a result table is written as .parquet, with .csv and .json beside it: "
                            f"use {path.with_suffix('.parquet')}")
    path = path.with_suffix(".parquet")
    check_output_folder(path)
    return path


def print_skipped(meta: dict[str, Any], sidecar: Path, shown: int = 20) -> None:
    """The skipped files of a run, at most ``shown`` of them (all are in the sidecar)."""
    if not meta["images_skipped"]:
        return
    print(f"skipped {meta['images_skipped']} unreadable file(s):")
    for item in meta["skipped"][:shown]:
        print(f"  {item['path']}: {item['reason']}")
    if meta["images_skipped"] > shown:
        print(f"  ... and {meta['images_skipped'] - shown} more (listed in {sidecar})")


# ------------------------------------------------------------------------------------------ resumable runs

class OutputWriteError(AttnflowError):
    """The finished results could not be written (full disk, quota, permissions); their state is kept."""


@dataclass(frozen=True)
class Resumable:
    """A resumable dataset command.

    Attributes:
        command: its name, in error lines.
        table: the output that marks a completed run (a requeued ``--resume`` after it has nothing to do).
        state: its state file (one per process under torchrun).
        write_to: what ``result.write`` is given (the table, or the output directory).
    """

    command: str
    table: Path
    state: Path
    write_to: Path


def run_resumable(args: argparse.Namespace, spec: Resumable, load: Callable[[], Any],
                  compute: Callable[[Any, Any], Any], report: Callable[[Any, Path], None]) -> int:
    """The one wrapper of a resumable command: join torchrun's process group (and leave it), refuse a leftover
    state without ``--resume`` (or say there is nothing to resume), ``load`` what the run needs, ``compute`` the
    result under SIGTERM-as-Ctrl-C (the loop saves its state), write it on the main process and release every
    process's state once it is on disk, then ``report`` it (main process). An error that every process meets is
    printed once.

    Args:
        args: the parsed arguments (the loop options among them).
        spec: the command's outputs.
        load: -> what ``compute`` needs (models, boxes, heads); runs after the state checks.
        compute: ``(loaded, LoopOptions) -> result`` with a ``write(path) -> Path`` method.
        report: ``(result, written path)`` -> prints the summary.
    """
    from ..atomic import output_lock
    from ..dist import process_group

    with process_group(args.device) as (world, device), contextlib.ExitStack() as held:
        with reported_by_rank0(command=spec.command):  # the same arguments and files in every process
            if world.is_main:  # one run at a time per output: rank 0 holds the lock for the whole run
                held.enter_context(output_lock(spec.write_to))
            if nothing_to_resume(spec.table, spec.state, world.rank, world.size, args.resume):
                return 0
            loaded = load()
        with sigterm_as_interrupt(), reported_by_rank0(command=spec.command):
            result = compute(loaded, loop_options(args, device, spec.state))
            path = write_and_release(result, spec.write_to, spec.state, world.rank, world.size)
        if world.is_main and path is not None:
            report(result, path)
    return 0


def check_state_files(state: Path, world: int, resume: bool) -> None:
    """Refuse to start over a leftover state, or to resume one of another number of processes.

    Raises:
        AttnflowError: a leftover state without ``--resume``; with ``--resume``, state files of a run with
            another number of processes.
    """
    from ..runstate import rank_state_path, state_files

    found = state_files(state)
    listed = " ".join(str(p) for p in found)
    if found and not resume:
        raise AttnflowError(f"an interrupted run left {listed}: rerun with --resume (and its options) to continue "
                            f"it, or delete {listed} to start over")
    mine = {rank_state_path(state, r, world) for r in range(world)}
    if resume and found and not set(found) <= mine:
        ranks = [p for p in found if p != state]
        other = (f"{len(ranks)} processes (torchrun --nproc_per_node={len(ranks)})" if ranks and state not in found
                 else "one process (no torchrun)" if not ranks else "one process and by torchrun")
        raise AttnflowError(f"{listed} {'was' if len(found) == 1 else 'were'} written by {other}, this run has "
                            f"{world}: resume with the same number of processes, or delete {listed} to start over")


def nothing_to_resume(out: Path, state: Path, rank: int, world: int, resume: bool) -> bool:
    """Whether a ``--resume`` run has nothing to do: ``out`` exists and no state is left (a requeued job that
    always passes ``--resume`` after its run completed; rank 0 says so). Otherwise checks the state files.

    Raises:
        AttnflowError: see :func:`check_state_files`.
    """
    from ..runstate import state_files

    if resume and out.exists() and not state_files(state):
        if rank == 0:
            print(f"attnflow: nothing to resume: {out} is complete and no state is left (drop --resume to "
                  "compute it again)")
        return True
    check_state_files(state, world, resume)
    return False


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a cluster's time limit or preemption, torchrun stopping its workers) like Ctrl-C, so the
    run saves its state before it exits. Both raise KeyboardInterrupt in this process only: a DataLoader worker
    forked meanwhile inherits the handler and ignores the signal (the whole process group gets it; the main
    process ends its workers itself)."""
    pid = os.getpid()

    def interrupt(signum: int, frame: Any) -> None:
        if os.getpid() == pid:
            raise KeyboardInterrupt

    try:
        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_REPORTED = "attnflow/error_reported"
"""Store key rank 0 sets once it has printed an error that every process met (see :func:`reported_by_rank0`)."""


@contextlib.contextmanager
def reported_by_rank0(errors: tuple[type[AttnflowError], ...] = (AttnflowError,),
                      wait: timedelta = timedelta(seconds=60), command: str = "stats") -> Iterator[None]:
    """Around work whose ``errors`` every torchrun process meets alike (the same arguments and files, or a
    result they share), so that the line is printed once: rank 0 prints it and exits 2; the other ranks wait
    (at most ``wait``) until it has, then exit 2 silently: exiting first, they would have torchrun stop rank 0
    before it prints. Without a process group the error goes through (the CLI prints it). ``command`` names the
    sub-command in the line, as the CLI does."""
    try:
        yield
    except errors as err:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise
        store = dist.distributed_c10d._get_default_store()
        if dist.get_rank() == 0:
            print(f"attnflow {command}: error: {err}", file=sys.stderr, flush=True)
            store.set(_REPORTED, "1")
        else:
            try:
                store.wait([_REPORTED], wait)
            except RuntimeError:  # rank 0 did not meet this error (or is gone): report it here
                print(f"attnflow {command}: error (rank {dist.get_rank()}): {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def write_and_release(result: Any, out: Path, state: Path, rank: int, world: int) -> Path | None:
    """Write the result (rank 0), then remove every process's state once the outputs are safely on disk.

    Raises:
        OutputWriteError: the outputs could not be written; the state files are kept for ``--resume``.
    """
    from ..runstate import RunState, rank_state_path

    path, error = None, None
    if rank == 0:
        try:
            path = result.write(out)
        except OSError as err:
            error = err
    if world > 1:
        import torch.distributed as dist

        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, error is None)
        written = all(flags)
    else:
        written = error is None
    if written:
        RunState(rank_state_path(state, rank, world), {}).remove()
        return path
    if rank == 0:
        raise OutputWriteError(f"cannot write {out}: {getattr(error, 'strerror', None) or error}; the finished "
                               f"results are kept in {state}: make room and rerun with --resume (it only "
                               "writes the outputs)") from error
    return None
