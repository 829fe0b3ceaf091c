"""The state file of a resumable run (attnflow.runstate) with attention statistics: what identifies the images,
the precision, atomic writes, unreadable files, and Ctrl-C held back while a batch is counted. The contract
shared by every analysis (resume equals one run, refusals, torchrun) is in test_loop.py."""

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from attnflow.errors import AttnflowError
from attnflow.runstate import RunState
from attnflow.stats import attention_stats
from conftest import tiny_model
from interrupts import fail_at_step

KW = dict(img_size=64, device="cpu", workers=0, progress=False)


def _same(a, b):
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=False, rtol=1e-12)


@pytest.fixture()
def interrupted(photo_folder, tmp_path, monkeypatch):
    """``make(model=None) -> state``: a run of batch 2 interrupted at its third batch."""
    def make(model=None):
        state = tmp_path / "s.state.pt"
        with monkeypatch.context() as patch:
            fail_at_step(patch, 3)
            with pytest.raises(KeyboardInterrupt):
                attention_stats(model or tiny_model(), photo_folder, batch_size=2, state_path=state,
                                checkpoint_every=1, **KW)
        assert state.exists()
        return state
    return make


def test_resume_with_another_batch_size_gives_the_same_numbers(photo_folder, tmp_path, monkeypatch):
    model = tiny_model()
    full = attention_stats(model, photo_folder, batch_size=4, **KW)
    state = tmp_path / "s.state.pt"
    with monkeypatch.context() as patch:
        fail_at_step(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            attention_stats(model, photo_folder, batch_size=2, state_path=state, checkpoint_every=1, **KW)
    resumed = attention_stats(model, photo_folder, batch_size=3, state_path=state, resume=True, **KW)
    assert resumed.meta["images_used"] == full.meta["images_used"] == 7
    _same(resumed, full)


def test_resume_refuses_another_folder_with_other_files(photo_folder, tmp_path, interrupted):
    state = interrupted()
    other = tmp_path / "other"
    other.mkdir()
    for i, f in enumerate(sorted(photo_folder.iterdir())):
        f.rename(other / f"img_{i}.jpg")
    with pytest.raises(AttnflowError, match="the image files"):
        attention_stats(tiny_model(), other, batch_size=2, state_path=state, resume=True, **KW)


def test_resume_from_a_moved_copy_of_the_same_files(photo_folder, tmp_path, interrupted):
    model = tiny_model()
    full = attention_stats(model, photo_folder, batch_size=2, **KW)
    state = interrupted(model)
    moved = photo_folder.rename(tmp_path / "scratch-copy")
    resumed = attention_stats(model, moved, batch_size=2, state_path=state, resume=True, **KW)
    _same(resumed, full)


def test_resume_refuses_another_amp_dtype(photo_folder, tmp_path, interrupted):
    state = interrupted()
    saved = torch.load(state, weights_only=True)
    fingerprint = dict(saved.pop("fingerprint"), amp="bfloat16")  # as a GPU run with --amp bf16 writes it
    RunState(state, fingerprint).save(saved)
    with pytest.raises(AttnflowError, match="amp bfloat16 \\(now float32\\)"):
        attention_stats(tiny_model(), photo_folder, batch_size=2, state_path=state, resume=True, **KW)


@pytest.mark.parametrize("content", [b"x", "truncated"])
def test_unreadable_state_is_one_clear_line(photo_folder, tmp_path, interrupted, content):
    state = interrupted()
    data = state.read_bytes()
    state.write_bytes(content if isinstance(content, bytes) else data[: len(data) // 2])
    with pytest.raises(AttnflowError, match="unreadable") as err:
        attention_stats(tiny_model(), photo_folder, batch_size=2, state_path=state, resume=True, **KW)
    assert f"delete {state}" in str(err.value) and "\n" not in str(err.value)
    assert state.exists()


SIGKILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
import attnflow.runstate as rs
from attnflow.stats import attention_stats

calls = []
real_save = torch.save
def dying_save(obj, f, *a, **k):
    calls.append(1)
    if len(calls) == 3:  # the third state save dies half-way through writing
        f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        f.write(b"PK half a zip")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
rs.torch.save = dying_save
attention_stats(tiny_model(), {data!r}, img_size=64, batch_size=1, device="cpu", workers=0,
                progress=False, state_path={state!r}, checkpoint_every=1)
"""


def test_sigkill_while_writing_the_state_keeps_the_previous_one(photo_folder, tmp_path):
    state = tmp_path / "s.state.pt"
    script = SIGKILL_SCRIPT.format(tests=os.path.dirname(__file__), data=str(photo_folder), state=str(state))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert int(torch.load(state, weights_only=True)["accumulators"]["loop"]["images"]) == 2  # the second save
    model = tiny_model()
    resumed = attention_stats(model, photo_folder, batch_size=1, state_path=state, resume=True, **KW)
    _same(resumed, attention_stats(model, photo_folder, batch_size=1, **KW))
    assert not list(tmp_path.glob("*s.state.pt*")), "neither the state nor its temporary file is left"


def test_resume_refuses_a_folder_whose_images_were_replaced_under_the_same_names(photo_folder, tmp_path, interrupted):
    state = interrupted()
    first, second = sorted(photo_folder.iterdir())[:2]
    a, b = first.read_bytes(), second.read_bytes()
    assert len(a) != len(b)
    first.write_bytes(b)  # another photo under the old name: a resume would mix two datasets
    second.write_bytes(a)
    with pytest.raises(AttnflowError, match="files replaced under the same names"):
        attention_stats(tiny_model(), photo_folder, batch_size=2, state_path=state, resume=True, **KW)


def test_signals_deferred_holds_ctrl_c_until_the_block_ends():
    import os
    import signal
    import threading

    from attnflow.runstate import signals_deferred

    for sender in ("main thread", "another thread"):  # a process's signal may reach any of its threads
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                send = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
                if sender == "main thread":
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    send.start()
                    send.join()
                for _ in range(1000):  # bytecodes at which an unheld signal would have been handled
                    reached.append(1)
        assert len(reached) == 1000, sender
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
