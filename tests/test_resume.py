"""Long-run robustness of attention_stats: which state file a failed run keeps, what a resume may change,
atomic state writes, unreadable state files. Each resumed result is compared with an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from attnflow.collect import attention_stats
from attnflow.data.images import DataError
from attnflow.errors import AttnflowError
from attnflow.runstate import RunState
from conftest import tiny_model

KW = dict(img_size=64, device="cpu", num_workers=0, progress=False)


def _stop_at(n_stop, error=KeyboardInterrupt):
    def after_batch(n):
        if n == n_stop:
            raise error("stop") if error is not KeyboardInterrupt else KeyboardInterrupt
    return after_batch


def _same(a, b):
    pd.testing.assert_frame_equal(a.frame, b.frame, check_exact=False, rtol=1e-12)


def test_only_unreadable_files_leave_no_state(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(b"not a jpeg")
    state = tmp_path / "s.state.pt"
    with pytest.raises(DataError, match="no readable image"):
        attention_stats(tiny_model(), bad, batch_size=1, state_path=state, checkpoint_every=1, **KW)
    assert not state.exists(), "nothing worth resuming: no state file"


def test_failure_before_any_batch_leaves_no_state(tmp_path):
    state = tmp_path / "s.state.pt"
    with pytest.raises(AttnflowError, match="--img-size"):  # 96 px images for a 64 px model
        attention_stats(tiny_model(), [torch.randn(2, 3, 96, 96)], state_path=state, checkpoint_every=1, **KW)
    assert not state.exists()

    def interrupted_at_once():
        raise KeyboardInterrupt
        yield  # noqa: unreachable: a generator
    with pytest.raises(KeyboardInterrupt):
        attention_stats(tiny_model(), interrupted_at_once(), state_path=state, **KW)
    assert not state.exists()


def test_failure_after_progress_keeps_resumable_state(photo_folder, tmp_path):
    model = tiny_model()
    full = attention_stats(model, photo_folder, batch_size=2, **KW)
    state = tmp_path / "s.state.pt"
    # no periodic save yet (every 100 batches): the state is saved by the failure itself, at the last full batch
    with pytest.raises(RuntimeError, match="stop"):
        attention_stats(model, photo_folder, batch_size=2, state_path=state, checkpoint_every=100,
                        _after_batch=_stop_at(2, RuntimeError), **KW)
    assert state.exists()
    assert torch.load(state, weights_only=False)["n_images"] == 4
    resumed = attention_stats(model, photo_folder, batch_size=2, state_path=state, resume=True, **KW)
    assert resumed.meta["resumed"] and resumed.meta["images_used"] == full.meta["images_used"]
    _same(resumed, full)
    assert not state.exists()


def test_resume_with_another_batch_size_gives_the_same_numbers(photo_folder, tmp_path):
    model = tiny_model()
    full = attention_stats(model, photo_folder, batch_size=4, **KW)
    state = tmp_path / "s.state.pt"
    with pytest.raises(KeyboardInterrupt):
        attention_stats(model, photo_folder, batch_size=2, state_path=state, checkpoint_every=1,
                        _after_batch=_stop_at(2), **KW)
    resumed = attention_stats(model, photo_folder, batch_size=3, state_path=state, resume=True, **KW)
    assert resumed.meta["images_used"] == full.meta["images_used"] == 7
    _same(resumed, full)


def _interrupted_state(photo_folder, tmp_path, model=None, **kw):
    state = tmp_path / "s.state.pt"
    with pytest.raises(KeyboardInterrupt):
        attention_stats(model or tiny_model(), photo_folder, batch_size=2, state_path=state, checkpoint_every=1,
                        _after_batch=_stop_at(2), **(KW | kw))
    assert state.exists()
    return state


@pytest.mark.parametrize("change,option", [
    (dict(crop_pct=0.5), "--crop-pct the default (now 0.5)"),
    (dict(limit=5), "--data, --limit"),
    (dict(model=tiny_model(seed=1)), "weights"),              # same architecture, other weights
    (dict(model=tiny_model(depth=3)), "weights"),             # another --model-kw
    (dict(model=tiny_model(img_size=32), img_size=32), "--img-size"),
])
def test_resume_refuses_other_options_and_keeps_the_state(photo_folder, tmp_path, change, option):
    state = _interrupted_state(photo_folder, tmp_path)
    before = state.read_bytes()
    change = dict(change)
    model = change.pop("model", None) or tiny_model()
    with pytest.raises(AttnflowError, match="different run") as err:
        attention_stats(model, photo_folder, batch_size=2, state_path=state, resume=True, **(KW | change))
    message = str(err.value)
    assert option in message and f"delete {state}" in message and "\n" not in message, message
    assert state.read_bytes() == before, "a refused resume leaves the state untouched"


def test_resume_refuses_another_folder_with_other_files(photo_folder, tmp_path):
    state = _interrupted_state(photo_folder, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for i, f in enumerate(sorted(photo_folder.iterdir())):
        f.rename(other / f"img_{i}.jpg")
    with pytest.raises(AttnflowError, match="--data"):
        attention_stats(tiny_model(), other, batch_size=2, state_path=state, resume=True, **KW)


def test_resume_from_a_moved_copy_of_the_same_files(photo_folder, tmp_path):
    model = tiny_model()
    full = attention_stats(model, photo_folder, batch_size=2, **KW)
    state = _interrupted_state(photo_folder, tmp_path, model)
    moved = photo_folder.rename(tmp_path / "scratch-copy")
    resumed = attention_stats(model, moved, batch_size=2, state_path=state, resume=True, **KW)
    _same(resumed, full)


def test_resume_refuses_another_amp_dtype(photo_folder, tmp_path):
    state = _interrupted_state(photo_folder, tmp_path)
    saved = torch.load(state, weights_only=False)
    fingerprint = dict(saved.pop("fingerprint"), amp="bfloat16")  # as a GPU run with --amp bf16 writes it
    RunState(state, fingerprint).save(saved)
    with pytest.raises(AttnflowError, match="--amp bfloat16"):
        attention_stats(tiny_model(), photo_folder, batch_size=2, state_path=state, resume=True, **KW)


@pytest.mark.parametrize("content", [b"x", "truncated"])
def test_unreadable_state_is_one_clear_line(photo_folder, tmp_path, content):
    state = _interrupted_state(photo_folder, tmp_path)
    data = state.read_bytes()
    state.write_bytes(content if isinstance(content, bytes) else data[: len(data) // 2])
    with pytest.raises(AttnflowError, match="unreadable") as err:
        attention_stats(tiny_model(), photo_folder, batch_size=2, state_path=state, resume=True, **KW)
    assert f"delete {state}" in str(err.value) and "\n" not in str(err.value)
    assert state.exists()


def test_keep_state_lets_a_finished_run_be_written_later(photo_folder, tmp_path):
    """The CLI keeps the state of a finished run until its outputs are written (a full disk loses nothing)."""
    model = tiny_model()
    full = attention_stats(model, photo_folder, batch_size=2, **KW)
    state = tmp_path / "s.state.pt"
    first = attention_stats(model, photo_folder, batch_size=2, state_path=state, keep_state=True, **KW)
    _same(first, full)
    assert state.exists()
    again = attention_stats(model, photo_folder, batch_size=2, state_path=state, resume=True, **KW)
    _same(again, full)
    assert again.meta["images_used"] == 7 and again.meta["resolution"] == [64, 64]
    assert again.meta["n_patches"] == 16 and not state.exists()


SIGKILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
import attnflow.runstate as rs
from attnflow.collect import attention_stats

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
attention_stats(tiny_model(), {data!r}, img_size=64, batch_size=1, device="cpu", num_workers=0,
                progress=False, state_path={state!r}, checkpoint_every=1)
"""


def test_sigkill_while_writing_the_state_keeps_the_previous_one(photo_folder, tmp_path):
    state = tmp_path / "s.state.pt"
    script = SIGKILL_SCRIPT.format(tests=os.path.dirname(__file__), data=str(photo_folder), state=str(state))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(state, weights_only=False)["n_images"] == 2  # the second save, intact
    model = tiny_model()
    resumed = attention_stats(model, photo_folder, batch_size=1, state_path=state, resume=True, **KW)
    _same(resumed, attention_stats(model, photo_folder, batch_size=1, **KW))
    assert not list(tmp_path.glob("s.state.pt*")), "neither the state nor its temporary file is left"


def test_resume_refuses_a_folder_whose_images_were_replaced_under_the_same_names(photo_folder, tmp_path):
    state = _interrupted_state(photo_folder, tmp_path)
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
