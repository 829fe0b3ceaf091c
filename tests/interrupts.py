"""Test helper: make the n-th call of a method raise KeyboardInterrupt (an interrupted run, at a chosen batch)."""

from __future__ import annotations

from typing import Any


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
