"""torchrun --nproc_per_node=2 (gloo) gives the same statistics as one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from attnflow.collect import attention_stats
from attnflow.result import Result
from conftest import tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_equal_one(photo_folder, tmp_path):
    (photo_folder / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"")  # a bad file on one of the ranks
    out = tmp_path / "dist.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(Path(__file__).with_name("dist_worker.py")),
           str(photo_folder), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = Result.read(out)
    one = attention_stats(tiny_model(seed=0), photo_folder, img_size=64, batch_size=2, device="cpu",
                          num_workers=0, progress=False)
    assert two.meta["world_size"] == 2
    assert two.meta["images_used"] == one.meta["images_used"]
    assert two.meta["images_skipped"] == 1
    np.testing.assert_array_equal(two.frame["count"], one.frame["count"])
    np.testing.assert_allclose(two.frame["mean"], one.frame["mean"], rtol=1e-6, atol=1e-9)
    # std of a nearly constant metric is ill-conditioned: compare it on the scale of the metric (1e-6)
    scale = np.abs(one.frame["mean"].to_numpy())
    assert (np.abs(two.frame["std"].to_numpy() - one.frame["std"].to_numpy()) <= 1e-6 * scale + 1e-9).all()
