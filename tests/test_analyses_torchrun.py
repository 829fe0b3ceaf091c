"""`torchrun -m attnflow localize` and `aggregate` (2 gloo processes) write what one process writes, once, and
leave no state behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd

from attnflow.cli import main
from localize_data import MODEL, write_boxes


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "attnflow", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def test_torchrun_localize_and_aggregate_equal_one_process(photo_folder, tmp_path):
    write_boxes(photo_folder, tmp_path / "boxes.csv")
    localize = ["localize", *MODEL, "--data", str(photo_folder), "--boxes", str(tmp_path / "boxes.csv"),
                "--examples", "0", "--no-progress", "--batch-size", "2"]
    aggregate = ["aggregate", *MODEL, "--data", str(photo_folder), "--no-progress", "--batch-size", "2"]
    for args, name in ((localize, "loc"), (aggregate, "agg")):
        proc = _torchrun([*args, "--out", str(tmp_path / f"{name}2")])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("wrote ") == 1, proc.stdout  # rank 0 reports
        assert main([*args, "--out", str(tmp_path / f"{name}1")]) == 0
        assert not list((tmp_path / f"{name}2").glob("*.state*.pt"))

    one, two = (pd.read_parquet(tmp_path / d / "curve.parquet") for d in ("loc1", "loc2"))
    np.testing.assert_array_equal(two["hits"], one["hits"])
    one, two = (pd.read_parquet(tmp_path / d / "aggregation.parquet") for d in ("agg1", "agg2"))
    assert (one["count"] == two["count"]).all()
    np.testing.assert_allclose(two["mean"], one["mean"], rtol=1e-6, atol=1e-9)


def test_torchrun_error_met_by_every_process_is_printed_once(photo_folder, tmp_path):
    write_boxes(photo_folder, tmp_path / "boxes.csv")
    out = tmp_path / "loc"
    out.mkdir()
    for rank in (0, 1):  # a leftover state of an interrupted 2-process run, and no --resume
        (out / f"localization.state.rank{rank}.pt").write_bytes(b"x")
    proc = _torchrun(["localize", *MODEL, "--data", str(photo_folder), "--boxes", str(tmp_path / "boxes.csv"),
                      "--out", str(out), "--no-progress"])
    assert proc.returncode != 0
    assert proc.stderr.count("attnflow localize: error: an interrupted run left") == 1, proc.stderr[-3000:]
