"""torchrun (gloo, 2 or 3 processes) gives the same statistics as one process; errors end every rank."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from attnflow.cli import main
from attnflow.stats import attention_stats
from attnflow.result import Result
from conftest import tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(photo_folder, tmp_path):
    """The folder, a plain DataLoader over it and a list of its batches on 2 processes == one process. Every
    process iterates the DataLoader and the list in full: they take turns by batch (each image was counted
    once per process: 2 x the count)."""
    (photo_folder / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"")  # a bad file on one of the ranks
    out = tmp_path / "dist.parquet"
    proc = _torchrun(2, [str(photo_folder), str(out), "folder", "loader", "batches"], script="dist_worker.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the folder kind reads with the default (fast) decode; the loader and the list hold the PIL path's tensors
    one_of = {decode: attention_stats(tiny_model(seed=0), photo_folder, img_size=64, batch_size=2, device="cpu",
                                      workers=0, progress=False, decode=decode) for decode in ("auto", "pil")}
    for kind in ("folder", "loader", "batches"):
        one = one_of["auto" if kind == "folder" else "pil"]
        two = Result.read(tmp_path / f"dist-{kind}.parquet")
        assert two.meta["world_size"] == 2, kind
        assert two.meta["images_used"] == one.meta["images_used"] == 7, kind
        assert two.meta["images_skipped"] == 1 and two.meta["skipped"] == one.meta["skipped"], kind
        np.testing.assert_array_equal(two.frame["count"], one.frame["count"])
        np.testing.assert_allclose(two.frame["mean"], one.frame["mean"], rtol=1e-6, atol=1e-9)
        # std of a nearly constant metric is ill-conditioned: compare it on the scale of the metric (1e-6)
        scale = np.abs(one.frame["mean"].to_numpy())
        assert (np.abs(two.frame["std"].to_numpy() - one.frame["std"].to_numpy()) <= 1e-6 * scale + 1e-9).all()


# --- `attnflow stats` under torchrun: uneven shards, corrupt files, failures --------------------------------------

TINY = ["--model", "vit_small_patch16_224", "--random-init", "--model-kw", "depth=2", "--model-kw", "embed_dim=32",
        "--model-kw", "num_heads=4", "--img-size", "64", "--workers", "0", "--no-progress"]
NO_CLS = ["--model-kw", "class_token=False", "--model-kw", "global_pool=avg"]
LAYOUT = ("resolution", "grid", "n_patches", "num_prefix_tokens", "has_cls", "images_used", "images_skipped",
          "skipped", "limit")


def _torchrun(nproc: int, args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m attnflow ARGS`` (or ``script ARGS``) with gloo on the CPU."""
    target = [str(Path(__file__).parent / "helpers" / script)] if script else ["-m", "attnflow"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", *target, *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)


def _assert_same_statistics(many: Result, one: Result) -> None:
    """Counts exact, means to 1e-6 relative, NaN exactly where one process has NaN, same provenance."""
    np.testing.assert_array_equal(many.frame["count"], one.frame["count"])
    np.testing.assert_array_equal(many.frame["mean"].isna(), one.frame["mean"].isna())
    np.testing.assert_allclose(many.frame["mean"], one.frame["mean"], rtol=1e-6, atol=1e-9)  # NaN == NaN
    for key in LAYOUT:
        assert many.meta[key] == one.meta[key], key


def test_torchrun_rank_with_only_corrupt_files(photo_folder, tmp_path):
    """Rank 0's shard (files 1, 3, 5, 7 of 7) holds only corrupt files, rank 1's one more (file 4): the
    statistics, the token layout in the sidecar and the skipped list (in folder order) are one process's."""
    files = sorted(photo_folder.iterdir())
    for i in (0, 2, 3, 4, 6):
        files[i].write_bytes(b"" if i % 2 else b"GIF89a broken")
    args = ["stats", *TINY, "--batch-size", "2", "--data", str(photo_folder)]
    proc = _torchrun(2, [*args, "--out", str(tmp_path / "two.parquet")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("skipped 5 unreadable") == 1, proc.stdout
    assert main([*args, "--out", str(tmp_path / "one.parquet")]) == 0
    two, one = Result.read(tmp_path / "two.parquet"), Result.read(tmp_path / "one.parquet")
    assert one.meta["images_used"] == 2 and one.meta["resolution"] == [64, 64]
    assert [s["path"] for s in one.meta["skipped"]] == [str(files[i]) for i in (0, 2, 3, 4, 6)]
    _assert_same_statistics(two, one)


def test_torchrun_uneven_shards_limit_and_no_cls(photo_folder, tmp_path):
    """--limit 5 of 7 images on 3 processes (shards of 2, 2, 1, each smaller than the batch) with a model
    without [cls]: the metrics of [cls] stay missing (NaN, count 0) after the all-reduce, as in one process."""
    args = ["stats", *TINY, *NO_CLS, "--limit", "5", "--batch-size", "4", "--data", str(photo_folder)]
    proc = _torchrun(3, [*args, "--out", str(tmp_path / "three.parquet")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one.parquet")]) == 0
    three, one = Result.read(tmp_path / "three.parquet"), Result.read(tmp_path / "one.parquet")
    assert three.meta["world_size"] == 3 and one.meta["images_used"] == 5 and one.meta["has_cls"] is False
    cls = one.frame["metric"].isin(["cls_self", "cls_patch_entropy", "cls_patch_mass", "patch_cls"])
    assert cls.any() and one.frame.loc[cls, "mean"].isna().all() and (one.frame.loc[cls, "count"] == 0).all()
    assert (one.frame.loc[~cls, "count"] == 5).all()
    _assert_same_statistics(three, one)


def test_torchrun_error_is_one_line_from_rank0(tmp_path):
    """Every file corrupt: the error every process meets alike is printed once (by rank 0, before any process
    exits); the ranks exit 2 (the first failure, torchrun's root cause), none hangs."""
    data = tmp_path / "bad"
    data.mkdir()
    for i in range(3):
        (data / f"img_{i}.jpg").write_bytes(b"garbage")
    proc = _torchrun(2, ["stats", *TINY, "--data", str(data), "--out", str(tmp_path / "o.parquet")])
    errors = [line for line in proc.stderr.splitlines() if "attnflow stats: error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "no readable image in the data (3 skipped" in errors[0]
    # torchrun stops the other workers once one has exited: they exit 2 or, stopped first, by its SIGTERM
    codes = re.findall(r"exitcode\s+: (-?\d+)", proc.stderr)
    assert len(codes) == 2 and set(codes) <= {"2", "-15"}, proc.stderr[-3000:]
    assert re.search(r"Root Cause[^\n]*\n(?:.*\n){0,5}\s*exitcode\s+: 2\b", proc.stderr), proc.stderr[-3000:]
    assert not list(tmp_path.glob("o.*"))


def test_torchrun_failure_on_one_rank_ends_every_rank(photo_folder, tmp_path):
    """A file that raises (not a readable-or-corrupt image) on rank 1 only: rank 1 fails with its traceback,
    rank 0 leaves the all-reduce at once (gloo: 'Connection closed by peer'), torchrun reports rank 1."""
    out = tmp_path / "o.parquet"
    proc = _torchrun(2, ["stats", *TINY, "--data", str(photo_folder), "--out", str(out)],
                     script="dist_fail_worker.py")
    assert proc.returncode != 0 and "simulated read failure" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
