"""One options vocabulary on the command line: an option shared by several commands reads the same in each
(help, default, choices), and the resumable commands' loop options default to LoopOptions' own defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from attnflow.cli import build_parser
from attnflow.options import DECODES, PRECISION_ALIASES, PRECISIONS, LoopOptions

SHARED = ("--device", "--amp", "--workers", "--no-progress", "--resume", "--checkpoint-every", "--name",
          "--img-size", "--checkpoint-key", "--decode")
"""Options that mean the same in every command that has them."""

RESUMABLE = ("stats", "aggregate", "localize")


def _options() -> dict[str, dict[str, argparse.Action]]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found: dict[str, dict[str, argparse.Action]] = {}
    for command, parser in sub.choices.items():
        for action in parser._actions:
            for option in action.option_strings:
                found.setdefault(option, {})[command] = action
    return found


@pytest.mark.parametrize("option", SHARED)
def test_a_shared_option_reads_the_same_in_every_command(option):
    per_command = _options()[option]
    assert len(per_command) >= 2, f"{option} is no longer shared"
    helps = {command: (action.help, tuple(action.choices or ())) for command, action in per_command.items()}
    assert len(set(helps.values())) == 1, helps


def test_resumable_commands_default_to_the_loop_options():
    options, defaults = _options(), LoopOptions()
    for field in dataclasses.fields(LoopOptions):
        flag = "--" + field.name.replace("_", "-")
        for command in RESUMABLE:
            if flag in options and command in options[flag] and field.name != "device":
                assert options[flag][command].default == getattr(defaults, field.name), (command, flag)
    for command in RESUMABLE:
        assert tuple(options["--amp"][command].choices) == (*PRECISIONS, *PRECISION_ALIASES), command
        assert options["--workers"][command].default is None  # min(8, CPUs), as LoopOptions
        assert tuple(options["--decode"][command].choices) == ("auto", "pil", "fast", "gpu") == DECODES, command
    assert set(options["--decode"]) == {*RESUMABLE, "run"}  # every command that runs the loop over a folder


# --- SIGTERM to the whole process group (Slurm, timeout, systemd) while DataLoader workers run -------------------

GROUP_SIGTERM = """
import sys, time
from pathlib import Path
import attnflow.data.images as images

real, marker = images.read_sample, Path({marker!r})
def slow(*args, **kwargs):  # in the workers: a slow disk; the first read says the loop has begun
    marker.touch()
    time.sleep(0.05)
    return real(*args, **kwargs)
images.read_sample = slow
from attnflow.cli import main
sys.exit(main(["stats", "--model", "vit_small_patch16_224", "--random-init", "--model-kw", "depth=2",
               "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4", "--img-size", "64", "--no-compile",
               "--workers", "2", "--batch-size", "2", "--checkpoint-every", "1000", "--no-progress",
               "--data", {data!r}, "--out", {out!r}]))
"""


@pytest.mark.parametrize("delay", [0.0, 0.25, 0.6])
def test_group_sigterm_with_workers_keeps_a_loadable_state_and_exits_cleanly(photo_folder, tmp_path, delay):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    for i, photo in enumerate(sorted(photo_folder.iterdir())):  # 28 images: long enough to be interrupted
        for k in range(3):
            (photo_folder / f"copy{k}_{i}.jpg").write_bytes(photo.read_bytes())
    marker, out = tmp_path / "reading", tmp_path / "o.parquet"
    script = GROUP_SIGTERM.format(marker=str(marker), data=str(photo_folder), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "attnflow stats: interrupted", err[-3000:]
    state = tmp_path / "o.state.pt"
    if state.exists():  # progress was made: the state is whole and loadable
        saved = torch.load(state, weights_only=True)
        assert saved["format"] == 2 and saved["done"] >= 1
