"""Test helper: make the n-th call of a method raise KeyboardInterrupt (an interrupted run, at a chosen batch)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from attnflow import loop
from attnflow.probes import train


def interrupt_at_call(monkeypatch: Any, owner: type, method: str, n: int) -> list[int]:
    """Patch ``owner.method`` so that its ``n``-th call (1-based) raises KeyboardInterrupt; ``n = 0`` only counts.

    The method's first argument after ``self`` must be an image batch ``[B, ...]``.

    Returns:
        The batch sizes of the calls seen (the interrupted one included).
    """
    seen: list[int] = []
    real = getattr(owner, method)

    def patched(self: Any, images: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(int(images.shape[0]))
        if len(seen) == n:
            raise KeyboardInterrupt
        return real(self, images, *args, **kwargs)

    monkeypatch.setattr(owner, method, patched)
    return seen


def fail_at_step(monkeypatch: Any, n: int, error: type[BaseException] = KeyboardInterrupt) -> list[int]:
    """The ``n``-th batch step of the loop (1-based) raises ``error``; returns the batch sizes stepped."""
    seen: list[int] = []
    real = loop._batches

    def batches(analysis: loop.Analysis, *args: Any) -> None:
        step = analysis.step

        def failing(batch: Any) -> Any:
            seen.append(int(batch.images.shape[0]))
            if len(seen) == n:
                raise error("stop") if error is not KeyboardInterrupt else KeyboardInterrupt
            return step(batch)
        real(dataclasses.replace(analysis, step=failing), *args)
    monkeypatch.setattr(loop, "_batches", batches)
    return seen


@contextlib.contextmanager
def training_stopped_after(epochs: int) -> Iterator[None]:
    """Inside the block, probe training raises KeyboardInterrupt once ``epochs`` epochs are complete (and saved)."""
    real = train.train_bank

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        def stop(done: int) -> None:
            if done == epochs:
                raise KeyboardInterrupt
        return real(*args, **kwargs, on_epoch_end=stop)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_bank", interrupted)
        yield
