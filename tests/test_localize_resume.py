"""`attnflow localize --resume`: an interrupted run continues from its state and ends with exactly the hit counts
of an uninterrupted run; a state of another run (other boxes, head, options) is refused and kept."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import attnflow.localize.evaluate as evaluate
from attnflow.cli import main
from attnflow.localize import localize, read_boxes
from attnflow.localize.metric import LocalizationError
from attnflow.models.load import load_model
from attnflow.runstate import StateMismatchError
from interrupts import interrupt_at_call
from probe_data import one_thread  # noqa: F401  (autouse fixture)
from test_localize_cli import ARCH, KW, MODEL, head_file, write_boxes  # noqa: F401  (head_file: a fixture)


def _interrupt_at_batch(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th forward (1-based) raise KeyboardInterrupt; returns the batch sizes forwarded."""
    return interrupt_at_call(monkeypatch, evaluate.MapCapture, "__call__", n)


def _args(photo_folder: Path, boxes: Path, out: Path, head: Path, *extra: str) -> list[str]:
    return ["localize", *MODEL, "--head", str(head), "--data", str(photo_folder), "--boxes", str(boxes),
            "--out", str(out), "--examples", "0", "--no-progress", "--threads", "2", *extra]


def test_interrupted_run_resumes_to_the_uninterrupted_counts(photo_folder, tmp_path, head_file, monkeypatch,
                                                            capsys):
    (photo_folder / "ILSVRC2012_val_00000099.JPEG").write_bytes(b"not a jpeg")
    boxes = tmp_path / "boxes.csv"
    write_boxes(photo_folder, boxes)
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(_args(photo_folder, boxes, whole, head_file, "--batch-size", "1")) == 0

    with monkeypatch.context() as patch:
        forwards = _interrupt_at_batch(patch, 5)
        assert main(_args(photo_folder, boxes, part, head_file, "--batch-size", "1", "--checkpoint-every", "1")) \
            == 130
    assert len(forwards) == 5
    state = part / "localization.state.pt"
    saved = torch.load(state, weights_only=False)
    # two batches still in the box search when the fifth forward began: the state is that of the first two
    assert saved["done_items"] == 2 and all(acc["count"] == 2 for acc in saved["reducer"].values())
    assert not (part / "localization.parquet").exists()
    capsys.readouterr()

    assert main(_args(photo_folder, boxes, part, head_file, "--batch-size", "1")) == 2
    assert "an interrupted run left" in capsys.readouterr().err and state.exists()

    with monkeypatch.context() as patch:
        forwards = _interrupt_at_batch(patch, 0)  # counts the forwards only
        assert main(_args(photo_folder, boxes, part, head_file, "--batch-size", "3", "--resume")) == 0
    n_files = len(list(photo_folder.glob("*.JPEG")))
    assert sum(forwards) == n_files - 1 - 1 - 2  # no corrupt file, no box-less photo, not the two done
    assert not state.exists()

    for table in ("localization", "curve"):
        a, b = pd.read_parquet(whole / f"{table}.parquet"), pd.read_parquet(part / f"{table}.parquet")
        pd.testing.assert_frame_equal(a, b)
    meta_a, meta_b = (json.loads((d / "localization.json").read_text()) for d in (whole, part))
    for key in ("images_used", "images_skipped", "skipped", "size_differs_from_box_file"):
        assert meta_a[key] == meta_b[key], key
    assert meta_b["resumed"] is True and meta_a["resumed"] is False

    capsys.readouterr()
    assert main(_args(photo_folder, boxes, part, head_file, "--resume")) == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_resume_refuses_other_boxes_and_keeps_the_state(photo_folder, tmp_path, head_file, monkeypatch, capsys):
    boxes = tmp_path / "boxes.csv"
    write_boxes(photo_folder, boxes)
    out = tmp_path / "loc"
    with monkeypatch.context() as patch:
        _interrupt_at_batch(patch, 4)
        assert main(_args(photo_folder, boxes, out, head_file, "--batch-size", "1", "--checkpoint-every", "1")) \
            == 130
    state = out / "localization.state.pt"
    before = state.read_bytes()
    other = tmp_path / "other.csv"
    other.write_text(boxes.read_text().replace(",0,0,", ",1,0,"))
    capsys.readouterr()
    assert main(_args(photo_folder, other, out, head_file, "--batch-size", "1", "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "the ground-truth boxes (--boxes) differ" in err
    assert main(_args(photo_folder, boxes, out, head_file, "--batch-size", "1", "--resume",
                      "--iou-thresholds", "50")) == 2
    assert "--iou-thresholds" in capsys.readouterr().err
    assert main(["localize", *MODEL, "--data", str(photo_folder), "--boxes", str(boxes), "--out", str(out),
                 "--examples", "0", "--no-progress", "--resume"]) == 2
    assert "the head's weights (--head) differ" in capsys.readouterr().err
    assert state.read_bytes() == before


def test_api_keep_state_returns_the_finished_run_at_once(photo_folder, tmp_path, monkeypatch):
    boxes = tmp_path / "boxes.csv"
    write_boxes(photo_folder, boxes)
    truth = read_boxes(boxes)
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    state = tmp_path / "loc.state.pt"
    first = localize(model, photo_folder, truth, img_size=64, batch_size=2, progress=False, state_path=state,
                     keep_state=True)
    assert state.exists()
    with monkeypatch.context() as patch:
        forwards = _interrupt_at_batch(patch, 0)
        again = localize(model, photo_folder, truth, img_size=64, batch_size=2, progress=False, state_path=state,
                         resume=True)
    assert forwards == [] and not state.exists()
    pd.testing.assert_frame_equal(first.curve, again.curve)
    with pytest.raises(LocalizationError, match="checkpoint_every"):
        localize(model, photo_folder, truth, img_size=64, checkpoint_every=0, progress=False)
    localize(model, photo_folder, truth, img_size=64, batch_size=2, progress=False, state_path=state,
             keep_state=True)
    with pytest.raises(StateMismatchError, match="--img-size 64 \\(now 32\\)"):
        localize(load_model(ARCH, random_init=True, img_size=32, **KW), photo_folder, truth, img_size=32,
                 progress=False, state_path=state, resume=True)


def test_an_interrupt_while_a_batch_is_being_counted_saves_whole_batches(photo_folder, tmp_path, monkeypatch):
    """A real SIGINT lands while the main thread collects the second batch's box searches (after the first of
    them is in): the saved state holds whole batches only, and the resumed run equals an uninterrupted one."""
    import os
    import signal
    import threading

    from attnflow.localize.metric import BoxAccuracy

    boxes = tmp_path / "boxes.csv"
    write_boxes(photo_folder, boxes)
    truth = read_boxes(boxes)
    model = load_model(ARCH, random_init=True, img_size=64, **KW)
    whole = localize(model, photo_folder, truth, img_size=64, batch_size=2, progress=False, threads=1)

    counting = threading.Event()   # set by the main thread's first addition of the second batch
    real_add, real_hits = BoxAccuracy.add, BoxAccuracy.hits_of
    adds, searches = [], []

    def add(self, hits):
        adds.append(1)
        if len(adds) == 3:
            counting.set()
        return real_add(self, hits)

    def hits_of(self, scoremap, gt):
        searches.append(1)
        if len(searches) == 4:  # the second batch's last search: interrupt once counting has begun (or after 2 s)
            counting.wait(timeout=2)
            os.kill(os.getpid(), signal.SIGINT)
        return real_hits(self, scoremap, gt)

    state = tmp_path / "loc.state.pt"
    with monkeypatch.context() as patch:
        patch.setattr(BoxAccuracy, "add", add)
        patch.setattr(BoxAccuracy, "hits_of", hits_of)
        with pytest.raises(KeyboardInterrupt):
            localize(model, photo_folder, truth, img_size=64, batch_size=2, progress=False, threads=1,
                     state_path=state, checkpoint_every=1)
    saved = torch.load(state, weights_only=False)
    assert saved["done_items"] == 2 and saved["reducer"]["cls_mean"]["count"] == 2
    resumed = localize(model, photo_folder, truth, img_size=64, batch_size=2, progress=False, state_path=state,
                       resume=True)
    pd.testing.assert_frame_equal(resumed.curve, whole.curve)
