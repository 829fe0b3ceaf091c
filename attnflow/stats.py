"""attention_stats: per-(block, head) attention statistics of a model over a dataset, on the one loop.

The analysis gives :mod:`attnflow.loop` a step (one tapped forward: the metrics of every block's map, or of its
queries and keys on the ``fast_qk`` route) and a :class:`~attnflow.reducers.StatsReducer`; the loop shards,
resumes and all-reduces. Device autodetection, bf16/fp16 autocast on GPU (the softmax stays fp32),
``inference_mode``, DataLoader workers and the progress bar come from :class:`~attnflow.options.LoopOptions`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .data.decode import decode_of
from .data.sources import image_source
from .data.transforms import eval_transform
from .kernels.route import QKRoute
from .loop import Analysis, LayoutRecord, Ready, run_loop
from .metrics import METRICS, attention_metrics, attention_metrics_from_logits, patch_distances, valid_metrics
from .limits import check_crop_pct, check_img_size
from .options import LoopOptions, autocast_dtype, dtype_name
from .provenance import run_name
from .provenance import run_provenance
from .reducers import StatsReducer
from .result import Result
from .runstate import model_fingerprint
from .tap import AttentionTap, QueryKey
from .vit import InputCheck, InputShapeError, TokenLayout, model_blocks, model_has_cls, model_num_heads

log = logging.getLogger(__name__)


def attention_stats(model: nn.Module, data: Dataset | DataLoader | Iterable | str | Path,
                    options: LoopOptions | None = None, *, img_size: int = 224, crop_pct: float | None = None,
                    model_name: str | None = None, compile: bool | None = None, fast_qk: bool | None = None,
                    qk_kernel: str = "auto", meta: dict[str, Any] | None = None, **loop: Any) -> Result:
    """Per-(block, head) attention statistics of ``model`` over ``data``.

    Args:
        model: a timm ViT-family model (see :class:`~attnflow.tap.AttentionTap`); used unmodified.
        data: a folder of images (path), a ``Dataset`` (items ``(image, label[, index])`` or ``BadImage``),
            a ``DataLoader``, any iterable of image tensors ``[B, 3, H, W]`` (or ``[3, H, W]``) or
            ``(images, labels)`` tuples, or one tensor ``[B, 3, H, W]`` (split into batches) or ``[3, H, W]``.
            Tensors must be float and normalised as the model expects (e.g. by
            :func:`~attnflow.data.transforms.eval_transform`); other float dtypes are cast to the model's.
        options: the loop's options (:class:`~attnflow.options.LoopOptions`: batch size, device, amp, workers,
            limit, progress, state file, resume); ``**loop`` overrides them by name, e.g. ``batch_size=16``.
        img_size: crop size for folder input (the model must be built at this resolution).
        crop_pct: center-crop fraction for folder input (default: the model's own).
        model_name: value of the ``model`` column; default the preset or timm architecture name.
        compile: ``torch.compile`` the statistics function; default: on for CUDA, off on the CPU, where it saves a
            few percent per batch but costs every process seconds of compiling (docs/performance.md).
        fast_qk: let plain timm ``Attention`` blocks keep fused attention and rebuild the identical map from
            their queries and keys inside the (compiled) statistics; other blocks are unaffected. Default: on
            for CUDA, where flash attention is far cheaper than a materialised map; off on CPU.
        qk_kernel: how ``fast_qk`` blocks turn queries and keys into metrics: ``auto`` (the Triton kernel of
            :mod:`attnflow.kernels.qk_metrics` on CUDA, checked against torch on each new shape, with a
            warning and the torch route if it fails or disagrees), ``triton`` or ``torch``.
        meta: extra provenance merged into ``Result.meta``.

    Returns:
        :class:`~attnflow.result.Result` with ``mean``/``std`` over images per (block, head, metric).

    The model is measured in eval mode (no dropout) and moved to the device; each module's train/eval mode is
    restored afterwards. A first batch without negative values, for a model trained on mean-subtracted images,
    logs a warning (images not normalised?). A resumed run must have had the same model, weights, images,
    resolution, crop, autocast dtype and decode path (the batch size may differ). A folder's images are read by
    the ``decode`` loop option's path (:mod:`attnflow.data.decode`; ``auto``: ``fast``), recorded as
    ``meta["decode"]``.

    Raises:
        OptionError: an unknown or invalid option.
        DataError: empty folder, non-image path, no readable image at all.
        StateFileError, StateMismatchError: with ``resume``, an unreadable state or one of another run.
        InputShapeError: images that do not fit the model's resolution, whose channels are not dimension 1,
            or that are not floating point (e.g. uint8 pixels).
    """
    options = LoopOptions.of(options, **loop)
    check_crop_pct(crop_pct)
    check_img_size(img_size)
    device = options.torch_device()
    amp = autocast_dtype(options.amp, device)
    name = run_name(model, model_name)
    model = model.to(device)
    folder = isinstance(data, (str, Path))
    source = image_source(data, transform=eval_transform(model, img_size, crop_pct) if folder else None,
                          limit=options.limit, batch_size=options.batch_size, decode=options.decode, device=device)
    decode = decode_of(getattr(source.dataset, "transform", None)) if folder else None
    step = StatsStep(model, device, fast_qk=device.type == "cuda" if fast_qk is None else fast_qk,
                     compile=compile if compile is not None else device.type == "cuda",
                     qk_kernel=qk_kernel)
    analysis = Analysis(f"attention stats {name}", step, {"stats": step.reducer, "layout": step.layouts},
                        model_fingerprint(model, name, amp, img_size=img_size if folder else None,
                                          crop_pct=crop_pct if folder else None, decode=decode))
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
    with measuring(model), step.tap, torch.inference_mode(), autocast:
        run = run_loop(analysis, source, options)
    layout = step.layouts.layout
    run_meta = run_provenance(model, name) | run.meta() | _layout_meta(layout) | {
        "dataset_root": str(data) if folder else None, "has_cls": step.has_cls, "dtype": dtype_name(amp),
        "device": str(device), "batch_size": options.batch_size if source.is_dataset else None,
        "limit": options.limit, "crop_pct": crop_pct, "decode": decode, **step.route_meta()} | (meta or {})
    return Result(step.reducer.to_frame(name), run_meta)


class StatsStep:
    """One tapped forward per batch: the ``[B, H, M]`` metrics of every hooked block, added to
    :attr:`reducer` when the loop commits the batch.

    Args:
        model: the model, on ``device``.
        device: where the forward and the sums run.
        fast_qk, compile, qk_kernel: see :func:`attention_stats`.
    """

    def __init__(self, model: nn.Module, device: torch.device, *, fast_qk: bool, compile: bool,
                 qk_kernel: str) -> None:
        self.model, self.device = model, device
        self.has_cls = model_has_cls(model)
        self.reducer = StatsReducer(len(model_blocks(model)), model_num_heads(model), METRICS,
                                    valid=valid_metrics(self.has_cls), device=device)
        self.layouts = LayoutRecord()
        self.metric_fn: Callable[..., torch.Tensor] = attention_metrics
        qk_torch_fn: Callable[..., torch.Tensor] = metrics_from_qk
        if compile:
            self.metric_fn, qk_torch_fn = CompiledOrEager(attention_metrics), CompiledOrEager(metrics_from_qk)
        self.qk_route = QKRoute(qk_kernel, device, qk_torch_fn, metrics_from_qk) if fast_qk else None
        self.tap = AttentionTap(model, callback=self._on_attention, fast_qk=fast_qk)
        self.check = InputCheck(model, device)
        self.pending: list[tuple[int, torch.Tensor]] = []  # this batch's [B, H, M] values, per block

    def __call__(self, batch: Any) -> Ready:
        self.pending.clear()
        images = self.check(batch.images)
        try:
            self.model(images)
        except AssertionError as err:  # timm's PatchEmbed asserts the input size
            raise InputShapeError(f"images of shape {tuple(images.shape[1:])} do not fit the model: {err} "
                                  "Build the model at the data's resolution (img_size).") from err
        blocks, values = [b for b, _ in self.pending], torch.stack([v for _, v in self.pending])
        layout = self.tap.layout
        assert layout is not None  # the forward ran under the tap

        def commit() -> None:
            self.reducer.update_blocks(blocks, values)
            self.layouts.add(layout)
        return Ready(commit)

    def _on_attention(self, block: int, attn: torch.Tensor | QueryKey) -> None:
        layout = self.tap.layout
        n_tokens = attn.q.shape[-2] if isinstance(attn, QueryKey) else attn.shape[-1]
        device = attn.q.device if isinstance(attn, QueryKey) else attn.device
        if layout is None or layout.n_tokens != n_tokens:
            raise InputShapeError(f"block {block}: {n_tokens} tokens do not match the token layout {layout} of "
                                  "this model")
        distances = _patch_distances(layout.grid, layout.patch_size, str(device))
        if isinstance(attn, QueryKey):
            assert self.qk_route is not None  # the tap hands over queries and keys only with fast_qk
            values = self.qk_route(attn.q, attn.k, attn.scale, layout.num_prefix, layout.has_cls, distances)
        else:
            values = self.metric_fn(attn, layout.num_prefix, layout.has_cls, distances)
        self.pending.append((block, values))

    def route_meta(self) -> dict[str, Any]:
        """Provenance of the fast q/k route."""
        route = self.qk_route
        return {"fast_qk_blocks": len(self.tap.fast_blocks),
                "qk_kernel": route.name if route and self.tap.fast_blocks else None,
                "qk_kernel_fallback": route.fallback_reason if route else None}


class CompiledOrEager:
    """``torch.compile(fn)``, falling back to ``fn`` itself, once and with a warning, when compiling fails (a compile
    cache left broken by a killed run, a missing C compiler): the numbers are the same either way, only slower.
    An error of ``fn`` itself is raised by the eager call."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.compiled = fn, torch.compile(fn)
        self.failed = False

    def __call__(self, *args: Any) -> torch.Tensor:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure; the eager call below decides
                self.failed = True
                log.warning("torch.compile failed (%s: %s); computing the statistics without compiling",
                            type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return self.fn(*args)


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) inside the block; each module's train/eval mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _layout_meta(layout: TokenLayout | None) -> dict[str, Any]:
    return {"resolution": [layout.grid[i] * layout.patch_size[i] for i in range(2)] if layout else None,
            "grid": list(layout.grid) if layout else None, "n_patches": layout.n_patches if layout else None,
            "num_prefix_tokens": layout.num_prefix if layout else None}


@functools.lru_cache(maxsize=16)
def _patch_distances(grid: tuple[int, int], patch_size: tuple[int, int], device: str) -> torch.Tensor:
    """:func:`~attnflow.metrics.patch_distances`, one tensor per layout and device in this process (read
    only), so the kernel's per-tensor caches (grid geometry, padded copy) carry over from run to run."""
    return patch_distances(grid, patch_size, device)


def metrics_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, has_cls: bool,
                    distances: torch.Tensor) -> torch.Tensor:
    """Metrics ``[B, H, M]`` of the map ``softmax((q * scale) @ k^T)`` of a plain timm ``Attention`` block.

    The logits are computed with timm's own operations (so bf16 under autocast, as in its non-fused path);
    compiled, the softmax and every row reduction fuse into passes over the logits
    (:func:`~attnflow.metrics.attention_metrics_from_logits`).
    """
    return attention_metrics_from_logits((q * scale) @ k.transpose(-2, -1), num_prefix, has_cls, distances)
