"""The contract of the one resumable loop (attnflow.loop), once for every analysis that runs on it: attention
statistics, the Table 5 aggregation statistics and localization.

Each analysis is interrupted or fails at a chosen batch, then resumed; the result must equal an uninterrupted
run's (the reference), the state file must hold whole batches only, a state of another run must be refused and
kept byte for byte, and two gloo processes (each interrupted and resumed) must give one process's numbers.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch

import attnflow.loop as loop
from attnflow.aggregation.analysis import aggregation_statistics
from attnflow.data.images import DataError
from attnflow.localize import BoxProtocol, localize, read_boxes
from attnflow.options import OptionError
from attnflow.probes.heads import ProbeHead
from attnflow.probes.specs import parse_head_spec
from attnflow.runstate import StateFileError, StateMismatchError
from attnflow.stats import attention_stats
from conftest import tiny_model
from localize_data import write_boxes
from interrupts import fail_at_step

KW = dict(img_size=64, device="cpu", workers=0, progress=False)


def _stats(folder: Path, **kw: Any) -> Any:
    return attention_stats(kw.pop("model", None) or tiny_model(), folder, **(KW | kw))


def _aggregate(folder: Path, **kw: Any) -> Any:
    return aggregation_statistics(kw.pop("model", None) or tiny_model(), folder, **(KW | kw))


def _localize(folder: Path, **kw: Any) -> Any:
    boxes = folder.parent / "boxes.csv"
    if not boxes.exists():
        write_boxes(folder, boxes)
    truth = read_boxes(boxes)
    if kw.pop("truth", False):  # other boxes: one image's box moved
        truth.boxes[next(iter(truth.boxes))] = truth.boxes[next(iter(truth.boxes))] + 1
    return localize(kw.pop("model", None) or tiny_model(), folder, truth, **(KW | {"threads": 2} | kw))


def _head() -> Any:
    torch.manual_seed(3)
    return ProbeHead(parse_head_spec("abmilp"), dim=32, num_classes=3, has_cls=True)


ANALYSES: dict[str, Callable[..., Any]] = {"stats": _stats, "aggregate": _aggregate, "localize": _localize}
"""analysis -> run(folder, **options) with a tiny model on a photo folder."""

CHANGES: list[tuple[str, dict[str, Any], str]] = [
    ("stats", dict(crop_pct=0.5), "crop_pct the default (now 0.5)"),
    ("stats", dict(limit=5), "the image files"),
    ("stats", dict(model=tiny_model(seed=1)), "the weights"),
    ("aggregate", dict(sources=["central", "cls_mean"]), "the aggregation sources"),
    ("aggregate", dict(model=tiny_model(depth=3)), "the weights"),
    ("localize", dict(protocol=BoxProtocol(cam_curve_interval=0.05)), "the metric settings"),
    ("localize", dict(img_size=32, model=tiny_model(img_size=32)), "img_size 64 (now 32)"),
    ("localize", dict(head=_head()), "the head's weights differ"),
    ("localize", dict(truth=True), "the ground-truth boxes differ"),
    ("aggregate", dict(reference=tiny_model(seed=2), reference_name="ref", sources=["cls_mean", "reference:ref"]),
     "the reference model's weights differ"),
]
"""(analysis, what a resume changes, what the refusal names)."""


def _same(name: str, a: Any, b: Any) -> None:
    """Equal results: the same table (to float64 rounding of the sums), the same images and skipped files."""
    if name == "localize":
        pd.testing.assert_frame_equal(a.curve, b.curve)  # integer hit counts: exact
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=False, rtol=1e-12)
    for key in ("images_used", "images_skipped", "skipped"):
        assert a.meta[key] == b.meta[key], key


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


@pytest.fixture()
def folder(photo_folder: Path) -> Path:
    write_boxes(photo_folder, photo_folder.parent / "boxes.csv")  # every photo but the third has boxes
    (photo_folder / "ILSVRC2012_val_00000002.JPEG").write_bytes(b"not a jpeg")  # skipped and counted
    return photo_folder


@pytest.mark.parametrize("name", ANALYSES)
def test_interrupted_run_resumes_to_the_uninterrupted_result(name, folder, tmp_path, monkeypatch):
    run, state = ANALYSES[name], tmp_path / "run.state.pt"
    whole = run(folder, batch_size=1)
    with monkeypatch.context() as patch:
        fail_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run(folder, batch_size=1, state_path=state, checkpoint_every=1)
    saved = _state(state)
    # whole batches only, in positions: image, corrupt file, image, image (the fourth step was interrupted);
    # localization still searched the boxes of the two batches before it
    assert saved["done"] == (2 if name == "localize" else 4)
    assert int(saved["accumulators"]["loop"]["images"]) == saved["done"] - 1
    assert [path for path, _ in saved["accumulators"]["loop"]["skipped"]] == [str(folder / "ILSVRC2012_val_00000002.JPEG")]
    with monkeypatch.context() as patch:
        resumed_steps = fail_at_step(patch, 0)  # counts the steps only
        resumed = run(folder, batch_size=1, state_path=state, resume=True)
    assert sum(resumed_steps) == whole.meta["images_used"] - int(saved["accumulators"]["loop"]["images"])
    _same(name, resumed, whole)
    assert resumed.meta["resumed"] is True and whole.meta["resumed"] is False
    assert not state.exists(), "the state file is removed once the run completes"


@pytest.mark.parametrize("name", ANALYSES)
def test_failure_keeps_the_last_whole_batch_and_nothing_before(name, folder, tmp_path, monkeypatch):
    run, state = ANALYSES[name], tmp_path / "run.state.pt"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 1, RuntimeError)
        with pytest.raises(RuntimeError, match="stop"):
            run(folder, batch_size=1, state_path=state, checkpoint_every=1)
    assert not state.exists(), "nothing done: nothing to resume"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 5, RuntimeError)  # no periodic save (every 100 batches): the failure saves it
        with pytest.raises(RuntimeError, match="stop"):
            run(folder, batch_size=1, state_path=state, checkpoint_every=100)
    assert _state(state)["done"] > 0
    _same(name, run(folder, batch_size=1, state_path=state, resume=True), run(folder, batch_size=1))


@pytest.mark.parametrize("name,change,named", CHANGES, ids=[f"{n}-{w.split()[-1]}" for n, _, w in CHANGES])
def test_state_of_another_run_is_refused_and_kept(name, change, named, folder, tmp_path, monkeypatch):
    run, state = ANALYSES[name], tmp_path / "run.state.pt"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            run(folder, batch_size=1, state_path=state, checkpoint_every=1)
    before = state.read_bytes()
    with pytest.raises(StateMismatchError, match="different run") as err:
        run(folder, batch_size=1, state_path=state, resume=True, **change)
    assert named in str(err.value)
    assert state.read_bytes() == before


@pytest.mark.parametrize("name", ANALYSES)
def test_finished_state_resumes_at_once(name, folder, tmp_path, monkeypatch):
    run, state = ANALYSES[name], tmp_path / "run.state.pt"
    first = run(folder, batch_size=3, state_path=state, keep_state=True)
    assert state.exists()
    with monkeypatch.context() as patch:
        stepped = fail_at_step(patch, 1)  # any step would raise
        again = run(folder, batch_size=3, state_path=state, resume=True)
    assert stepped == []
    _same(name, again, first)


@pytest.mark.parametrize("name", ANALYSES)
def test_only_unreadable_files_give_one_error_and_no_state(name, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(b"not a jpeg")
    if name == "localize":
        (tmp_path / "boxes.csv").write_text("path,x1,y1,x2,y2\n" + "".join(
            f"ILSVRC2012_val_{i + 1:08d}.JPEG,1,1,5,5\n" for i in range(3)))
    state = tmp_path / "s.state.pt"
    with pytest.raises(DataError, match=r"no readable image in the data \(3 skipped, e.g. .*val_00000001"):
        ANALYSES[name](bad, batch_size=2, state_path=state, checkpoint_every=1)
    assert not state.exists()


def test_unreadable_or_crafted_state_is_refused_without_running_it(photo_folder, tmp_path):
    state = tmp_path / "s.state.pt"
    state.write_bytes(b"\x80\x04garbage")
    with pytest.raises(StateFileError, match="unreadable"):
        _stats(photo_folder, state_path=state, resume=True)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))
    with open(state, "wb") as f:
        pickle.dump({"format": 2, "fingerprint": {}, "done": 0, "accumulators": Payload()}, f)
    with pytest.raises(StateFileError):
        _stats(photo_folder, state_path=state, resume=True)
    assert not marker.exists(), "loading a state file must not run code"
    torch.save({"done_items": 3, "reducer": {}, "fingerprint": {}}, state)  # format 1 (before the one loop)
    with pytest.raises(StateFileError, match="older attnflow"):
        _stats(photo_folder, state_path=state, resume=True)


def test_loop_options_are_one_vocabulary(photo_folder):
    """The same words and checks for every analysis: a typo gets close names, a bad value one line."""
    for run in ANALYSES.values():
        with pytest.raises(OptionError, match="did you mean workers"):
            run(photo_folder, num_workers=0)
        with pytest.raises(OptionError, match="batch_size must be an integer >= 1"):
            run(photo_folder, batch_size=0)
        with pytest.raises(OptionError, match="amp must be one of auto, bf16, fp16, fp32"):
            run(photo_folder, amp="float64")
    one, alias = (_stats(photo_folder, amp=word, limit=2) for word in ("fp32", "none"))
    pd.testing.assert_frame_equal(one.frame, alias.frame)


# --- two gloo processes, each interrupted and resumed, equal one process -----------------------------------------

def test_two_processes_interrupted_and_resumed_equal_one(folder, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("helpers") / "loop_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(worker), str(folder), str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, run in ANALYSES.items():
        two = pd.read_parquet(tmp_path / f"{name}.parquet")
        one = run(folder, batch_size=1)
        if name == "localize":
            np.testing.assert_array_equal(pd.read_parquet(tmp_path / "localize-curve.parquet")["hits"],
                                          one.curve["hits"])
        assert (two["count"] == one.frame["count"]).all() if "count" in two else True
        numbers = "mean" if "mean" in two else "value"
        np.testing.assert_allclose(two[numbers], one.frame[numbers], rtol=1e-6, atol=1e-9)
        assert not list(tmp_path.glob(f"{name}*.state*.pt")), name


def test_an_interrupt_while_a_batch_is_being_counted_saves_whole_batches(folder, tmp_path, monkeypatch):
    """A real SIGINT lands while the main thread collects the second batch's box searches (after the first of
    them is in): the saved state holds whole batches only, and the resumed run equals an uninterrupted one."""
    import signal
    import threading

    from attnflow.localize.metric import BoxAccuracy

    whole = _localize(folder, batch_size=2, threads=1)
    counting = threading.Event()   # set by the main thread's first addition of the second batch
    real_add, real_hits = BoxAccuracy.add, BoxAccuracy.hits_of
    adds, searches = [], []

    def add(self: Any, hits: Any) -> None:
        adds.append(1)
        if len(adds) == 2:
            counting.set()
        return real_add(self, hits)

    def hits_of(self: Any, scoremap: Any, gt: Any) -> Any:
        searches.append(1)
        if len(searches) == 3:  # the second batch's last search: interrupt once counting has begun (or after 2 s)
            counting.wait(timeout=2)
            os.kill(os.getpid(), signal.SIGINT)
        return real_hits(self, scoremap, gt)

    state = tmp_path / "loc.state.pt"
    with monkeypatch.context() as patch:
        patch.setattr(BoxAccuracy, "add", add)
        patch.setattr(BoxAccuracy, "hits_of", hits_of)
        with pytest.raises(KeyboardInterrupt):
            _localize(folder, batch_size=2, threads=1, state_path=state, checkpoint_every=1)
    saved = _state(state)
    assert saved["done"] == 2 and int(saved["accumulators"]["cls_mean"]["_count"]) == 1  # batch 1: 1 image, 1 bad
    resumed = _localize(folder, batch_size=2, threads=1, state_path=state, resume=True)
    pd.testing.assert_frame_equal(resumed.curve, whole.curve)


# --- a DataLoader worker that dies or hangs: one line, the state kept, no wait forever -------------------------------

class _Faulty(torch.utils.data.Dataset):
    """Photos read by a worker that dies (SIGKILL, as the OOM killer does) or hangs at position ``at``."""

    def __init__(self, folder: Path, fault: str, at: int) -> None:
        from attnflow.data.images import ImageFolderDataset
        from attnflow.data.transforms import eval_transform

        self.images = ImageFolderDataset(folder, eval_transform(tiny_model(), 64))
        self.fault, self.at = fault, at

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        import signal
        import time

        if i == self.at:
            if self.fault == "dies":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        return self.images[i]


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_worker_that_dies_or_hangs_ends_the_run_with_one_line(fault, photo_folder, tmp_path, monkeypatch):
    from attnflow.loop import LoaderError

    monkeypatch.setattr(loop, "LOADER_TIMEOUT", 3.0)
    state = tmp_path / "s.state.pt"
    with pytest.raises(LoaderError, match="the image loader failed: DataLoader") as err:
        attention_stats(tiny_model(), _Faulty(photo_folder, fault, at=4), batch_size=1, device="cpu", workers=1,
                        progress=False, state_path=state, checkpoint_every=100)
    assert "\n" not in str(err.value) and ("died" in str(err.value) or "hung" in str(err.value))
    assert _state(state)["done"] >= 1  # the whole batches before the fault are kept
