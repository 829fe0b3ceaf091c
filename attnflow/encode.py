"""Frozen-encoder token extraction: images -> one block's tokens ``[B, P + N, D]`` for probe heads and fixed
aggregations (:class:`TokenEncoder`), or several blocks' tokens ``[B, L, P + N, D]`` from one forward pass
(:class:`BlockTokenEncoder`, the probes of internal blocks).

The tokens are the output of one transformer block (the last by default; SimMIM's authors recommend the 8th,
``block=7`` counted from 0, paper footnote 6), read by a forward hook, so any timm ViT-family model works
unmodified. Register and distillation tokens are dropped: the result is ``[cls] + patches`` (``P = 1``) or only
patches (``P = 0``).

Final LayerNorm: the paper's numbers use the tokens *without* the encoder's final norm: the beyond_cls
``forward_features`` runs the blocks and returns the raw last-block output (``self.norm`` is never applied),
for [cls], average pooling and AbMILP alike. ``layernorm=True`` applies the model's own ``model.norm``
instead (what MAE's original linear probe does for [cls]); note that timm models built for average pooling
(``fc_norm``) have an identity ``norm``.

Hugging Face ``transformers`` vision models and ``open_clip`` towers are read through their
:class:`~attnflow.models.adapter.ModelAdapter` (made here when the model itself is given): the hooked block is the
model's own layer, ``forward_features`` runs the model's own forward, and ``norm`` is its final norm.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn as nn

from .errors import AttnflowError
from .models.adapter import adapt_model
from .options import autocast_dtype
from .provenance import weights_fingerprint
from .vit import model_has_cls, model_num_prefix, resolve_block


class _Stop(Exception):
    """Raised by the hook to skip the blocks after the one we read."""


class TokenEncoder:
    """Callable ``images [B, 3, H, W] -> tokens [B, P + N, D]`` of a frozen timm ViT.

    Args:
        model: a timm ViT-family model (``blocks``, ``num_prefix_tokens``, ``cls_token``), or a transformers /
            open_clip vision model (wrapped in its adapter).
        block: index of the block to read (negative counts from the end; default the last).
        layernorm: apply the model's final ``norm`` to the tokens.
        amp: autocast precision (:data:`attnflow.options.PRECISIONS`; auto: bf16 on CUDA, fp32 on the CPU).
        device: where the encoder runs.

    Attributes:
        has_cls: whether the tokens start with a [cls] token.
        dim: token width D.
    """

    def __init__(self, model: nn.Module, *, block: int = -1, layernorm: bool = False, amp: str = "auto",
                 device: torch.device | str = "cpu") -> None:
        model = adapt_model(model)
        if not hasattr(model, "forward_features"):
            raise AttnflowError(f"{type(model).__name__} is not a timm ViT-family model (no forward_features)")
        self.block = resolve_block(model, block)
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.last = self.block == len(getattr(model, "blocks")) - 1
        self.layernorm = layernorm
        self.num_prefix = model_num_prefix(model)
        self.has_cls = model_has_cls(model)
        self.dim = int(getattr(model, "embed_dim", getattr(model, "num_features", 0)))
        self.amp_dtype = autocast_dtype(amp, self.device)

    @property
    def fingerprint(self) -> str:
        """:func:`weights_fingerprint` of the model (what token caches and probe checkpoints are tied to)."""
        return weights_fingerprint(self.model)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _block_outputs(self, images: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
        """Tokens ``[B, P + N, D]`` of each of ``blocks`` (resolved, ascending, the last being :attr:`block`), from
        one forward that stops after :attr:`block` unless :attr:`last` is set (it is when :attr:`block` is the
        model's last block; a caller that needs the rest of the forward sets it)."""
        captured: dict[int, torch.Tensor] = {}
        deepest = blocks[-1]
        stop = not self.last

        def hook_of(index: int):
            def hook(_module, _inputs, output):
                captured[index] = output[0] if isinstance(output, tuple) else output
                if stop and index == deepest:
                    raise _Stop
            return hook

        model: Any = self.model  # a timm ViT: blocks, forward_features and norm (checked in __init__)
        handles = [model.blocks[b].register_forward_hook(hook_of(b)) for b in blocks]
        try:
            with self._autocast():
                try:
                    model.forward_features(images.to(self.device, non_blocking=True))
                except _Stop:
                    pass
                missing = [b for b in blocks if b not in captured]
                if missing:
                    raise AttnflowError(f"block {missing[0]} did not run in the model's forward_features")
                outputs = [model.norm(captured[b]) if self.layernorm else captured[b] for b in blocks]
        finally:
            for handle in handles:
                handle.remove()
        return [self._drop_registers(x) for x in outputs]

    def _drop_registers(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, prefix + N, D]`` (or NHWC ``[B, h, w, D]``) -> ``[B, P + N, D]``: [cls] (if any) and patches."""
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim == 4 else x  # NHWC models -> tokens
        if self.has_cls:
            return torch.cat([x[:, :1], x[:, self.num_prefix:]], dim=1)
        return x[:, self.num_prefix:]

    def empty(self) -> torch.Tensor:
        """A batch of no images, ``[0, P + 1, D]``: what stands in for an all-unreadable batch before any token
        shape is known (one patch token: pooling needs one, and no head's parameters depend on the count)."""
        return torch.zeros(0, int(self.has_cls) + 1, self.dim)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens of one batch (in the autocast dtype; the heads cast them to fp32)."""
        return self._block_outputs(images, [self.block])[0]


def resolve_blocks(model: nn.Module, blocks: Sequence[int] | str) -> list[int]:
    """The non-negative indices of ``blocks``, ascending and without repeats; ``"all"`` is every block.

    Blocks are counted from 0, as everywhere in attnflow's data (a figure shows block ``b`` as ``b + 1``); negative
    indices count from the end (``-1``: the last).

    Raises:
        BlockIndexError: a block the model does not have.
        AttnflowError: no block, or a word other than ``"all"``.
    """
    model = adapt_model(model)
    if isinstance(blocks, str):
        if blocks.strip().lower() != "all":
            raise AttnflowError(f"blocks must be block indices or 'all', got {blocks!r}")
        return list(range(len(getattr(model, "blocks"))))
    resolved = sorted({resolve_block(model, int(b)) for b in blocks})
    if not resolved:
        raise AttnflowError("no block to read: blocks is empty")
    return resolved


class BlockTokenEncoder(TokenEncoder):
    """Callable ``images [B, 3, H, W] -> tokens [B, L, P + N, D]``: the tokens of ``L`` blocks of a frozen ViT,
    all from one forward pass.

    A forward hook on each requested block reads its output; the forward stops after the deepest of them (blocks
    after it never run). ``tokens[:, i]`` equals what :class:`TokenEncoder` with ``block=blocks[i]`` returns
    (registers dropped, ``layernorm`` applying the model's final norm to each block's tokens).

    Args:
        model: as :class:`TokenEncoder`.
        blocks: block indices (0-based, negative from the end) or ``"all"``; read in ascending order.
        layernorm, amp, device: as :class:`TokenEncoder`.

    Attributes:
        blocks: the resolved block indices, ascending (``tokens[:, i]`` is block ``blocks[i]``).
        block: the deepest of them (where the forward stops).
    """

    def __init__(self, model: nn.Module, *, blocks: Sequence[int] | str, layernorm: bool = False,
                 amp: str = "auto", device: torch.device | str = "cpu") -> None:
        model = adapt_model(model)  # once: a transformers / open_clip model's adapter walks every module
        resolved = resolve_blocks(model, blocks)
        super().__init__(model, block=resolved[-1], layernorm=layernorm, amp=amp, device=device)
        self.blocks = resolved

    def empty(self) -> torch.Tensor:
        """A batch of no images, ``[0, L, P + 1, D]`` (see :meth:`TokenEncoder.empty`)."""
        return torch.zeros(0, len(self.blocks), int(self.has_cls) + 1, self.dim)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens of every block of one batch, ``[B, L, P + N, D]`` (in the autocast dtype)."""
        return torch.stack(self._block_outputs(images, self.blocks), dim=1)
