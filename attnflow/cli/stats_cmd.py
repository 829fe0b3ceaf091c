"""``attnflow stats``: per-(block, head) attention statistics of one model over an image folder."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

from ..errors import AttnflowError
from ..kernels import QK_KERNELS


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


def crop_fraction(text: str) -> float:
    """argparse type: a center-crop fraction in (0, 1] (the resize side is ``img_size / crop_pct``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds a model."""
    parser.add_argument("--checkpoint", metavar="PATH", help="local weights file in the model's official format")
    parser.add_argument("--checkpoint-key", metavar="KEY",
                        help="top-level key of the weights when not the format's default "
                             "(e.g. target_encoder for I-JEPA, student for DINO/iBOT full checkpoints)")
    parser.add_argument("--random-init", action="store_true",
                        help="build the architecture without weights (smoke tests; numbers are meaningless)")
    parser.add_argument("--img-size", type=positive_int, default=224, help="input resolution (default 224)")
    parser.add_argument("--model-kw", action="append", default=[], metavar="KEY=VALUE",
                        help="extra timm.create_model argument, e.g. dynamic_img_size=True (repeatable)")


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


def check_data_and_amp(data: str, amp: str, device: str | None) -> None:
    """Fail fast, before a model is loaded (which can take a minute): a missing ``--data``, and ``--amp bf16/fp16``
    on the CPU, whose autocast would round the softmax."""
    import torch

    from ..data.images import DataError

    if not Path(data).exists():
        raise DataError(f"{data}: no such file or folder")
    run_on = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if amp in ("bf16", "fp16") and not run_on.startswith("cuda"):
        raise AttnflowError(f"--amp {amp} on the CPU rounds the softmax; use --amp none (or auto) on the CPU")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "stats", help="attention statistics of a model over an image folder",
        description="Per-(block, head) attention statistics ([cls]-self attention, [cls]-patch entropy, "
                    "patch-self ratio, patch-patch entropy, ...) over every image of a folder. Works under "
                    "torchrun for several GPUs.")
    parser.add_argument("--model", required=True, help="preset (see `attnflow models`) or timm architecture")
    parser.add_argument("--data", required=True, help="image folder (recursive; class folders or flat files)")
    parser.add_argument("--out", required=True, help="output table, e.g. runs/mae-b16.parquet (+ .csv, .json)")
    parser.add_argument("--name", help="the run's name in the table's model column and in plot legends "
                                       "(default: --model), e.g. mae-b16-cub for a second dataset")
    add_model_arguments(parser)
    parser.add_argument("--crop-pct", type=crop_fraction, help="override the model's center-crop fraction")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--workers", type=non_negative_int, help="DataLoader workers (default min(8, CPUs))")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="autocast dtype (default: bf16 on GPU, fp32 on CPU); the softmax stays fp32")
    parser.add_argument("--limit", type=positive_int, help="use N evenly spaced images (deterministic subset)")
    add_resume_arguments(parser)
    parser.add_argument("--compile", dest="compile", action="store_true", default=None,
                        help="torch.compile the statistics (default: on for GPU or long runs)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--fast-qk", dest="fast_qk", action="store_true", default=None,
                        help="keep fused attention in plain ViT blocks and rebuild the map from queries and keys "
                             "(default: on for GPU)")
    parser.add_argument("--no-fast-qk", dest="fast_qk", action="store_false",
                        help="tap every block's materialised map (the reference route)")
    parser.add_argument("--qk-kernel", choices=QK_KERNELS, default="auto",
                        help="with --fast-qk: the Triton kernel (auto: on CUDA, checked against torch on the "
                             "first batch) or the torch route (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume`` and ``--checkpoint-every`` of a resumable run (stats, localize, aggregate)."""
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --out")
    parser.add_argument("--checkpoint-every", type=positive_int, default=50, metavar="BATCHES",
                        help="save resumable state every N batches (default 50)")


def state_path_for(out: Path) -> Path:
    """Where the resumable state of a run writing ``out`` lives."""
    return out.with_name(out.stem + ".state.pt")


def _init_distributed() -> tuple[int, int, str | None]:
    """Initialise torch.distributed when launched by torchrun; returns rank, world size, device."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size(), None) if dist.is_initialized() else (0, 1, None)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return dist.get_rank(), world, f"cuda:{local}"
    dist.init_process_group("gloo")
    return dist.get_rank(), world, "cpu"


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


class OutputWriteError(AttnflowError):
    """The finished results could not be written (full disk, quota, permissions); their state is kept."""


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
    run saves its state before it exits."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def run(args: argparse.Namespace) -> int:
    from ..collect import attention_stats
    from ..data.images import DataError
    from ..models.load import load_model

    rank, world, dist_device = _init_distributed()
    try:
        with reported_by_rank0():  # the same arguments and files in every process
            if not Path(args.data).exists():  # before loading a model, which can take a minute
                raise DataError(f"{args.data}: no such file or folder")
            out = Path(args.out)
            if out.suffix not in (".parquet", ".csv"):
                out = out.with_suffix(".parquet")
            check_output_folder(out)
            state = state_path_for(out)
            if nothing_to_resume(out, state, rank, world, args.resume):
                return 0
            model = load_model(args.model, checkpoint=args.checkpoint, random_init=args.random_init,
                               img_size=args.img_size, checkpoint_key=args.checkpoint_key,
                               seed_name=args.name or args.model, **parse_model_kwargs(args.model_kw))
        if args.random_init and rank == 0:
            print("attnflow: --random-init: weights are random, the statistics are meaningless", flush=True)
        # a folder's DataError (empty folder; no readable image in any process) is the same in every process
        with sigterm_as_interrupt(), reported_by_rank0((DataError,)):
            result = attention_stats(
                model, Path(args.data), batch_size=args.batch_size, device=args.device or dist_device,
                amp=args.amp, num_workers=args.workers, img_size=args.img_size, crop_pct=args.crop_pct,
                limit=args.limit, model_name=args.name or args.model, state_path=state, checkpoint_every=args.checkpoint_every,
                resume=args.resume, progress=not args.no_progress, compile=args.compile,
                fast_qk=args.fast_qk, qk_kernel=args.qk_kernel, keep_state=True)
            path = write_and_release(result, out, state, rank, world)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank != 0 or path is None:
        return 0
    meta = result.meta
    L, H = result.frame["block"].nunique(), result.frame["head"].nunique()
    print(f"wrote {path} (+ .csv, .json): {L} blocks x {H} heads x {len(result.metrics)} metrics "
          f"over {meta['images_used']} images")
    if meta["images_skipped"]:
        print(f"skipped {meta['images_skipped']} unreadable file(s):")
        for item in meta["skipped"][:20]:
            print(f"  {item['path']}: {item['reason']}")
        if meta["images_skipped"] > 20:
            print(f"  ... and {meta['images_skipped'] - 20} more (listed in {path.with_suffix('.json')})")
    return 0

