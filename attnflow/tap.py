"""AttentionTap: capture the exact post-softmax attention of every block of an unmodified timm model.

The tap registers a forward *pre*-hook on ``blocks[i].attn.attn_drop`` of each hooked block. timm's
attention modules (ViT/DeiT ``Attention``, BEiT/BEiT-v2 with relative position bias, EVA-02 with rope,
DINOv2 with registers) call ``attn_drop`` on the softmax output ``[B, H, N, N]`` whenever fused attention is
off, so the hook sees exactly the map the model multiplies with ``v``. Fused attention is switched off per
module on entry and restored on exit; no process-wide flag is touched. Every hook must fire exactly once per
forward: a silent empty capture raises :class:`HookNotFiredError`.

Streaming mode has a faster route for plain timm ``Attention`` blocks (ViT, DeiT, DINOv2, MAE, DINO,
MoCo-v3, iBOT): with ``fast_qk=True`` such blocks keep fused (flash) attention for their own output, and the
callback receives the block's normalised queries and keys as a :class:`QueryKey`, from which the exact same
map is ``softmax((q * scale) @ k^T)`` - the very operations timm's non-fused path runs. Other blocks (BEiT's
relative position bias, EVA's rope, ...) always use the ``attn_drop`` route.

Hugging Face ``transformers`` vision models and ``open_clip`` visual towers are tapped unmodified through their
:class:`~attnflow.models.adapter.ModelAdapter` (made on entry when the model itself is given): the adapter's
``attention_capture`` hands over each block's exact post-softmax map (transformers: switched to eager attention
for this model inside the tap; open_clip: ``MultiheadAttention`` asked for its per-head weights), and the same
checks apply (one map per block per forward, shape ``[B, H, N, N]``). They have no ``fast_qk`` route.

Example::

    with AttentionTap(model) as tap:
        model(images)
    last = tap.maps[-1]            # [B, H, N, N]
    tap.layout.num_prefix          # [cls] + registers
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import contextlib

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from .errors import AttnflowError
from .models.adapter import ModelAdapter, adapt_model
from .vit import (BlockIndexError, TokenLayout, UnsupportedModelError, model_blocks, model_has_cls, model_num_prefix,
                  patch_embedding, token_grid, token_stride)

AttentionCallback = Callable[[int, "torch.Tensor | QueryKey"], None]
"""``callback(block_index, attn)`` with ``attn`` of shape ``[B, H, N, N]`` (a :class:`QueryKey` for the blocks of
the ``fast_qk`` route)."""


class HookNotFiredError(AttnflowError, RuntimeError):
    """A hooked block did not report its attention map exactly once during a forward pass."""


@dataclass(frozen=True)
class QueryKey:
    """Queries and keys of one plain timm ``Attention`` block (``fast_qk`` route).

    The block's post-softmax map is exactly ``softmax((q * scale) @ k.transpose(-2, -1))``, with the
    softmax in fp32 under autocast, as in timm's non-fused path
    (see :func:`attnflow.stats.metrics_from_qk`).

    Attributes:
        q: ``[B, H, N, d]`` queries after ``q_norm``.
        k: ``[B, H, N, d]`` keys after ``k_norm``.
        scale: the block's ``scale`` (``d ** -0.5``).
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float


def supports_fast_qk(attn: nn.Module) -> bool:
    """Whether ``attn`` is timm's plain ``Attention`` (no gate, q/k norms as modules), whose map is
    ``softmax(q k^T * scale [+ mask])``; a mask is checked per call."""
    module = type(attn).__module__
    return (type(attn).__name__ == "Attention"
            and module in ("timm.layers.attention", "timm.models.vision_transformer")
            and isinstance(getattr(attn, "q_norm", None), nn.Module)
            and isinstance(getattr(attn, "k_norm", None), nn.Module)
            and isinstance(getattr(attn, "scale", None), float)
            and getattr(attn, "gate", None) is None)


def _attention(block: nn.Module) -> Any:
    """``block.attn``, typed loosely: timm attention classes differ in their attributes (``fused_attn``,
    ``q_norm``, ``attn_drop``), which the callers check."""
    return block.attn


class AttentionTap:
    """Context manager that hooks every (or selected) block's post-softmax attention.

    Args:
        model: an unmodified timm ViT-family model, Hugging Face ``transformers`` vision model or ``open_clip``
            visual tower (see :mod:`attnflow.models.adapter`).
        callback: if given, called as ``callback(block_index, attn)`` for every hooked block and forward;
            nothing is stored (streaming mode). Otherwise the maps of the last forward are kept in
            :attr:`maps`.
        blocks: indices of the blocks to hook (negative indices count from the end); all when ``None``.
        fast_qk: streaming mode only: plain timm ``Attention`` blocks keep fused attention and pass a
            :class:`QueryKey` to the callback instead of the map.

    Attributes:
        maps: in storing mode, ``[B, H, N, N]`` tensors of the last forward, one per hooked block.
        block_indices: the hooked block indices (non-negative), in order.
        layout: the :class:`TokenLayout` of the last forward (``None`` before the first).
    """

    def __init__(self, model: nn.Module, callback: AttentionCallback | None = None,
                 blocks: Iterable[int] | None = None, fast_qk: bool = False) -> None:
        self.model = model
        adapted = adapt_model(model)  # once: the introspection below is handed the adapted model
        self.adapter = adapted if isinstance(adapted, ModelAdapter) else None  # None for timm models
        self._root = self.adapter.tower if self.adapter is not None else adapted  # what a forward runs
        all_blocks = model_blocks(adapted)
        n = len(all_blocks)
        idx = list(range(n)) if blocks is None else [b + n if b < 0 else b for b in blocks]
        bad = [b for b in idx if not 0 <= b < n]
        if bad:
            raise BlockIndexError(f"block indices {bad} out of range for a model with {n} blocks "
                                  f"(0..{n - 1}, or -{n}..-1 from the end)")
        self.block_indices: list[int] = sorted(set(idx))
        self._blocks = all_blocks
        self.callback = callback
        self.fast_blocks: set[int] = {b for b in self.block_indices if fast_qk and callback is not None
                                      and self.adapter is None and supports_fast_qk(_attention(all_blocks[b]))}
        self._pending_q: dict[int, torch.Tensor] = {}
        self.num_prefix = model_num_prefix(adapted)
        self.has_cls = model_has_cls(adapted)
        self._embed = patch_embedding(adapted)
        self.patch_size = token_stride(self._embed)  # input pixels per token (hybrid: times the CNN's stride)
        self.layout: TokenLayout | None = None
        self._tokens: dict[int, int] = {}  # tokens entering each hooked block's attention, this forward
        self._maps: dict[int, torch.Tensor] = {}
        self._fired: dict[int, int] = {}
        self._handles: list[RemovableHandle] = []
        self._saved_fused: list[tuple[Any, bool]] = []
        self._capture = contextlib.ExitStack()
        self._active = False

    # ------------------------------------------------------------------ hooks
    def _on_patch_embed(self, module: nn.Module, args: tuple) -> None:
        """Start of a forward: reset the per-forward bookkeeping and read the patch grid from the input."""
        x = args[0]  # [B, 3, H, W]
        grid = token_grid(self._embed, (int(x.shape[-2]), int(x.shape[-1])))
        self.layout = TokenLayout(self.num_prefix, self.has_cls, grid, self.patch_size)
        self._fired = {b: 0 for b in self.block_indices}
        self._maps = {}

    def _make_token_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("x")
            if isinstance(x, torch.Tensor) and x.dim() == 3:
                self._tokens[index] = x.shape[1]  # x: [B, N, C]
            else:
                self._tokens.pop(index, None)
        return hook

    def _make_attn_hook(self, index: int, heads: int | None) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            attn = args[0]  # [B, H, N, N], post-softmax
            tokens = self._tokens.get(index, attn.shape[-1])
            if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2] or attn.shape[-1] != tokens \
                    or (heads is not None and attn.shape[1] != heads):
                raise UnsupportedModelError(
                    f"block {index}: attn_drop received shape {tuple(attn.shape)}, not one post-softmax map "
                    f"per head [B, {heads}, {tokens}, {tokens}] (e.g. differential, cross-covariance or "
                    "windowed attention); attnflow cannot measure this model")
            self._fired[index] = self._fired.get(index, 0) + 1
            if self.callback is not None:
                self.callback(index, attn)
            else:
                self._maps[index] = attn.detach()
        return hook

    def _make_q_hook(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._pending_q[index] = output  # [B, H, N, d]
        return hook

    def _make_k_hook(self, index: int, attn: Any) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            q = self._pending_q.pop(index)
            self._fired[index] = self._fired.get(index, 0) + 1
            assert self.callback is not None  # fast blocks exist only with a callback
            self.callback(index, QueryKey(q, output, float(attn.scale)))
        return hook

    def _make_mask_check(self, index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or len(args) > 1:
                raise UnsupportedModelError(
                    f"block {index} passes an attention mask; use fast_qk=False for this model")
        return hook

    def _on_model_start(self, module: nn.Module, args: tuple) -> None:
        self._fired = {b: 0 for b in self.block_indices}
        self._maps = {}

    def _on_model_end(self, module: nn.Module, args: tuple, output: object) -> None:
        self.verify()

    # ------------------------------------------------------------- lifecycle
    def __enter__(self) -> "AttentionTap":
        if self._active:
            raise RuntimeError("AttentionTap is already active")
        try:
            if self.adapter is not None:
                self._enter_adapter(self.adapter)
            for i in (self.block_indices if self.adapter is None else []):
                attn = _attention(self._blocks[i])
                if i in self.fast_blocks:  # keeps its fused attention; the map is rebuilt from q and k
                    self._handles.append(attn.q_norm.register_forward_hook(self._make_q_hook(i)))
                    self._handles.append(attn.k_norm.register_forward_hook(self._make_k_hook(i, attn)))
                    self._handles.append(attn.register_forward_pre_hook(self._make_mask_check(i),
                                                                        with_kwargs=True))
                    continue
                self._saved_fused.append((attn, attn.fused_attn))
                attn.fused_attn = False
                self._handles.append(attn.register_forward_pre_hook(self._make_token_hook(i), with_kwargs=True))
                heads = getattr(attn, "num_heads", None)
                self._handles.append(attn.attn_drop.register_forward_pre_hook(
                    self._make_attn_hook(i, int(heads) if isinstance(heads, int) else None)))
            self._handles.append(self._embed.register_forward_pre_hook(self._on_patch_embed))
            self._handles.append(self._root.register_forward_pre_hook(self._on_model_start))
            self._handles.append(self._root.register_forward_hook(self._on_model_end))
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def _enter_adapter(self, adapter: Any) -> None:
        """Each hooked block's map from the adapter's capture (through the same checks as ``attn_drop``)."""
        hooks = {i: self._make_attn_hook(i, adapter.num_heads) for i in self.block_indices}
        self._capture.enter_context(adapter.attention_capture(self.block_indices,
                                                              lambda i, attn: hooks[i](None, (attn,))))

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        self._capture.close()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attn, fused in self._saved_fused:
            attn.fused_attn = fused
        self._saved_fused.clear()
        self._active = False

    # --------------------------------------------------------------- results
    def verify(self) -> None:
        """Check that every hooked block fired exactly once in the last forward.

        Raises:
            HookNotFiredError: naming the blocks that did not fire (or fired more than once), or saying that
                no forward pass ran under the tap.
        """
        if self.layout is None:
            raise HookNotFiredError("no forward pass has run under this tap: call the model inside "
                                    "`with AttentionTap(model) as tap:`")
        silent = [b for b in self.block_indices if self._fired.get(b, 0) == 0]
        repeated = [b for b in self.block_indices if self._fired.get(b, 0) > 1]
        if silent:
            raise HookNotFiredError(
                f"attention hooks of blocks {silent} did not fire: the model bypassed `attn_drop` "
                "(fused attention forced elsewhere, or a custom attention forward)" if self.adapter is None else
                f"attention hooks of blocks {silent} did not fire: the blocks did not run in this forward")
        if repeated:
            raise HookNotFiredError(f"attention hooks of blocks {repeated} fired more than once in one forward")

    @property
    def maps(self) -> list[torch.Tensor]:
        """Post-softmax maps ``[B, H, N, N]`` of the last forward, one per hooked block (storing mode)."""
        if self.callback is not None:
            raise RuntimeError("maps are not stored when the tap has a callback")
        self.verify()
        return [self._maps[b] for b in self.block_indices]
