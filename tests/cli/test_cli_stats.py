"""`attnflow stats` end to end: good, corrupt and empty files; exit codes and messages; kill + resume; torchrun."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from attnflow.cli import main
from attnflow.result import Result

TINY = ["--model", "vit_small_patch16_224", "--random-init", "--model-kw", "depth=2", "--img-size", "64",
        "--workers", "0", "--no-progress", "--batch-size", "3"]


def test_stats_end_to_end_with_bad_files(photo_folder, tmp_path, capsys):
    (photo_folder / "ILSVRC2012_val_00000097.JPEG").write_bytes(b"")
    (photo_folder / "ILSVRC2012_val_00000098.JPEG").write_bytes(b"GIF89a broken")
    out = tmp_path / "runs" / "tiny.parquet"
    assert main(["stats", *TINY, "--data", str(photo_folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random-init" in text and "skipped 2 unreadable file(s)" in text
    assert "ILSVRC2012_val_00000097.JPEG: empty file" in text
    assert out.exists() and out.with_suffix(".csv").exists() and out.with_suffix(".json").exists()
    res = Result.read(out)
    assert list(res.frame.columns) == ["model", "block", "head", "metric", "mean", "std", "count"]
    assert sorted(res.frame.block.unique()) == [0, 1] and res.frame["head"].nunique() == 6
    assert res.meta["images_used"] == len(list(photo_folder.glob("*"))) - 2
    assert res.meta["random_init"] is True and res.meta["resolution"] == [64, 64]
    assert res.meta["dataset_root"] == str(photo_folder)


@pytest.mark.parametrize("make_data,message", [
    (lambda p: p.mkdir(), "holds no image files"),
    (lambda p: p.write_text("hello"), "not an image file"),
    (lambda p: None, "no such file or folder"),
])
def test_bad_data_gives_one_line(tmp_path, capsys, make_data, message):
    data = tmp_path / "data"
    make_data(data)
    code = main(["stats", *TINY, "--data", str(data), "--out", str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_wrong_resolution_and_unknown_model(photo_folder, tmp_path, capsys):
    args = [a if a != "64" else "70" for a in TINY]
    assert main(["stats", *args, "--data", str(photo_folder), "--out", str(tmp_path / "o.parquet")]) == 2
    assert "multiple of 16" in capsys.readouterr().err
    code = main(["stats", "--model", "mae-vit-b61", "--data", str(photo_folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "mae-vit-b16" in err and len(err.strip().splitlines()) == 1


def test_existing_state_needs_resume(photo_folder, tmp_path, capsys):
    out = tmp_path / "o.parquet"
    (tmp_path / "o.state.pt").write_bytes(b"x")
    assert main(["stats", *TINY, "--data", str(photo_folder), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def _many_photos(src, dst, n):
    dst.mkdir()
    files = sorted(src.iterdir())
    for i in range(n):
        img = Image.open(files[i % len(files)]).convert("RGB").resize((96, 96))
        img.save(dst / f"img_{i:04d}.jpg")
    return dst


def test_kill_then_resume_equals_uninterrupted(photo_folder, tmp_path):
    data = _many_photos(photo_folder, tmp_path / "many", 48)
    args = ["--model", "vit_small_patch16_224", "--random-init", "--img-size", "96", "--workers", "0",
            "--no-progress", "--batch-size", "1", "--checkpoint-every", "1", "--data", str(data)]
    out = tmp_path / "killed.parquet"
    state = tmp_path / "killed.state.pt"
    proc = subprocess.Popen([sys.executable, "-m", "attnflow", "stats", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the run finished before it could be killed")
    assert state.exists(), proc.stderr.read().decode()[-2000:]
    assert main(["stats", *args, "--out", str(out), "--resume"]) == 0
    resumed = Result.read(out)
    assert resumed.meta["resumed"] and not state.exists()
    full_out = tmp_path / "full.parquet"
    assert main(["stats", *args, "--out", str(full_out)]) == 0
    full = Result.read(full_out)
    assert resumed.meta["images_used"] == full.meta["images_used"] == 48
    pd.testing.assert_frame_equal(resumed.frame, full.frame, check_exact=False, rtol=1e-10)


def test_torchrun_cli_equals_one_process(photo_folder, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out2 = tmp_path / "two.parquet"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "attnflow", "stats", *TINY, "--data", str(photo_folder),
           "--out", str(out2)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out1 = tmp_path / "one.parquet"
    assert main(["stats", *TINY, "--data", str(photo_folder), "--out", str(out1)]) == 0
    one, two = Result.read(out1), Result.read(out2)
    assert two.meta["world_size"] == 2 and two.meta["images_used"] == one.meta["images_used"]
    np.testing.assert_allclose(two.frame["mean"], one.frame["mean"], rtol=1e-6, atol=1e-9)
    # std of a nearly constant metric is ill-conditioned: compare it on the scale of the metric (1e-6)
    scale = np.abs(one.frame["mean"].to_numpy())
    assert (np.abs(two.frame["std"].to_numpy() - one.frame["std"].to_numpy()) <= 1e-6 * scale + 1e-9).all()


# --- long runs: leftover state, output errors, signals ------------------------------------------------------------

TINY4 = [*TINY, "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4"]


def test_only_unreadable_files_then_plain_rerun_gives_the_same_error(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"img_{i}.jpg").write_bytes(b"garbage")
    args = ["stats", *TINY4, "--checkpoint-every", "1", "--data", str(bad), "--out", str(tmp_path / "o.parquet")]
    for _ in range(2):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "no readable image" in err and "--resume" not in err, err
    assert not list(tmp_path.glob("o.state*"))


def test_leftover_state_message_says_what_to_do(photo_folder, tmp_path, capsys):
    state = tmp_path / "o.state.pt"
    state.write_bytes(b"x")
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and f"delete {state}" in err and len(err.splitlines()) == 1, err


def test_leftover_state_of_a_torchrun_run(photo_folder, tmp_path, capsys):
    ranks = [tmp_path / "o.state.rank0.pt", tmp_path / "o.state.rank1.pt"]
    for p in ranks:
        p.write_bytes(b"x")
    args = ["stats", *TINY4, "--data", str(photo_folder), "--out", str(tmp_path / "o.parquet")]
    assert main(args) == 2  # a one-process run must not ignore the files of a 2-process run
    err = capsys.readouterr().err
    assert f"delete {ranks[0]} {ranks[1]}" in err and "--resume" in err, err
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "2 processes" in err and "--nproc_per_node=2" in err and len(err.splitlines()) == 1, err
    assert all(p.exists() for p in ranks)


def test_resume_of_a_finished_run_does_nothing(photo_folder, tmp_path, capsys, monkeypatch):
    """A requeued job that always passes --resume ends cleanly once its run is complete, loading nothing."""
    import attnflow.models.load

    out = tmp_path / "o.parquet"
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(out)]) == 0
    capsys.readouterr()
    before = out.read_bytes()
    monkeypatch.setattr(attnflow.models.load, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to resume" in printed and "drop --resume" in printed, printed
    assert out.read_bytes() == before


def test_full_disk_on_output_keeps_the_state(photo_folder, tmp_path, capsys, monkeypatch):
    import errno

    full = tmp_path / "full.parquet"
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(full)]) == 0
    out = tmp_path / "o.parquet"
    real_write = Result.write

    def disk_full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(Result, "write", disk_full)
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    state = tmp_path / "o.state.pt"
    assert "No space left on device" in err and "--resume" in err and str(state) in err, err
    assert len(err.splitlines()) == 1 and state.exists()
    monkeypatch.setattr(Result, "write", real_write)
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(out), "--resume"]) == 0
    assert not state.exists()
    got, want = Result.read(out), Result.read(full)
    pd.testing.assert_frame_equal(got.frame, want.frame, check_exact=False, rtol=1e-12)
    assert got.meta["images_used"] == want.meta["images_used"] and got.meta["resolution"] == [64, 64]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_state_and_resume_equals_uninterrupted(photo_folder, tmp_path, sig):
    """Ctrl-C, or the SIGTERM of a cluster's time limit or torchrun, saves the state; exit code 130."""
    data = _many_photos(photo_folder, tmp_path / "many", 120)
    args = [a for a in TINY if a != "--no-progress"] + ["--batch-size", "1", "--checkpoint-every", "1000",
                                                       "--data", str(data)]
    out = tmp_path / "o.parquet"
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # the progress bar (stderr) says when some images are done
        proc = subprocess.Popen([sys.executable, "-m", "attnflow", "stats", *args, "--out", str(out)],
                                stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not re.search(r"\b[1-9]\d*/120\b", log.read_text()):
            time.sleep(0.02)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    text = log.read_text()
    if out.exists():
        pytest.skip("the run finished before the signal")
    assert proc.returncode == 130, text[-2000:]
    assert "interrupted" in text and (tmp_path / "o.state.pt").exists(), text[-2000:]
    assert main(["stats", *args, "--out", str(out), "--resume"]) == 0
    assert main(["stats", *args, "--out", str(tmp_path / "full.parquet")]) == 0
    got, want = Result.read(out), Result.read(tmp_path / "full.parquet")
    assert got.meta["resumed"] and got.meta["images_used"] == want.meta["images_used"] == 120
    pd.testing.assert_frame_equal(got.frame, want.frame, check_exact=False, rtol=1e-10)


def test_name_sets_the_model_column_so_two_datasets_plot_as_two_lines(photo_folder, tmp_path):
    from attnflow.result import Result

    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(a), "--limit", "2"]) == 0
    assert main(["stats", *TINY4, "--data", str(photo_folder), "--out", str(b), "--limit", "3",
                 "--name", "tiny-cub"]) == 0
    assert set(Result.read(b).frame["model"]) == {"tiny-cub"}
    both = Result.concat([Result.read(a), Result.read(b)])  # one model name per run: no clash
    assert set(both.frame["model"]) == {"vit_small_patch16_224", "tiny-cub"}
