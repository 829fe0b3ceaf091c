"""Frozen-encoder token extraction: images -> one block's tokens ``[B, P + N, D]`` for probe heads and fixed
aggregations.

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
from typing import Any

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

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens of one batch (in the autocast dtype; the heads cast them to fp32)."""
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            if not self.last:
                raise _Stop

        model: Any = self.model  # a timm ViT: blocks, forward_features and norm (checked in __init__)
        handle = model.blocks[self.block].register_forward_hook(hook)
        try:
            with self._autocast():
                try:
                    model.forward_features(images.to(self.device, non_blocking=True))
                except _Stop:
                    pass
                if not captured:
                    raise AttnflowError(f"block {self.block} did not run in the model's forward_features")
                x = captured[0]
                if self.layernorm:
                    x = model.norm(x)
        finally:
            handle.remove()
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim == 4 else x  # NHWC models -> tokens
        if self.has_cls:
            return torch.cat([x[:, :1], x[:, self.num_prefix:]], dim=1)
        return x[:, self.num_prefix:]
