"""Choosing between the Triton kernel and the torch route for the ``fast_qk`` statistics."""
from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import AttnflowError
from . import QK_KERNELS
from .qk_metrics import qk_metrics_triton, triton_supported

log = logging.getLogger(__name__)

QKMetricFn = Callable[[torch.Tensor, torch.Tensor, float, int, bool, torch.Tensor], torch.Tensor]
"""``(q, k, scale, num_prefix, has_cls, distances) -> [B, H, M]``."""

CHECK_IMAGES = 8
"""Images of the first batch (per token count, head size and dtype) that ``auto`` recomputes with torch."""

_CHECKED: dict[tuple, str | None] = {}
"""Outcome of each check in this process, by (shape, dtype, prefix count, device): ``None`` when the kernel
agreed, else why it did not. A later run in the same process (another model, a benchmark's repeats) reuses
it instead of recomputing: the kernel is deterministic for a given shape."""


class QKRoute:
    """Computes the metrics of a :class:`~attnflow.tap.QueryKey` with the Triton kernel or with torch.

    ``kernel``:

    - ``"auto"``: the Triton kernel on CUDA, checked on the first batch of every new shape (once per process)
      against the eager torch route (:data:`CHECK_IMAGES` images). If the kernel fails to compile or disagrees, a warning
      says why and the run continues on the torch route, so a run never depends on an unverified kernel.
      On CPU: torch.
    - ``"triton"``: always the kernel, never checked (benchmarks, tests; CPU only with ``TRITON_INTERPRET=1``).
    - ``"torch"``: always ``torch_fn``.

    Args:
        kernel: one of :data:`QK_KERNELS`.
        device: where the statistics run.
        torch_fn: the torch route (possibly compiled), used when the kernel is not.
        reference_fn: the eager torch route for the check.
    """

    def __init__(self, kernel: str, device: torch.device, torch_fn: QKMetricFn, reference_fn: QKMetricFn):
        if kernel not in QK_KERNELS:
            raise AttnflowError(f"unknown qk kernel {kernel!r}; choose one of {', '.join(QK_KERNELS)}")
        if kernel == "triton" and not triton_supported(device):
            raise AttnflowError(f"the Triton kernel needs a CUDA device and Triton (got {device}); "
                                "set qk_kernel to torch")
        self.kernel = kernel
        self.use_triton = kernel == "triton" or (kernel == "auto" and device.type == "cuda"
                                                 and triton_supported(device))
        self.torch_fn = torch_fn
        self.reference_fn = reference_fn
        self.fallback_reason: str | None = None

    @property
    def name(self) -> str:
        """``"triton"`` or ``"torch"``: the route the last batch used."""
        return "triton" if self.use_triton else "torch"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix: int, has_cls: bool,
                 distances: torch.Tensor) -> torch.Tensor:
        """``[B, H, M]`` metrics of ``softmax((q * scale) @ k^T)``, as :func:`attnflow.stats.metrics_from_qk`."""
        args = (scale, num_prefix, has_cls, distances)
        if not self.use_triton:
            return self.torch_fn(q, k, *args)
        if self.kernel == "triton":
            return qk_metrics_triton(q, k, *args)
        try:
            values = qk_metrics_triton(q, k, *args)
        except Exception as err:  # noqa: BLE001 - a kernel that cannot build on this GPU must not end the run
            return self._fall_back(f"the Triton kernel failed ({type(err).__name__}: {err})", q, k, args)
        key = (q.shape[-2], q.shape[-1], q.dtype, num_prefix, has_cls, str(q.device))
        if key not in _CHECKED:
            n = min(CHECK_IMAGES, q.shape[0])
            reference = self.reference_fn(q[:n], k[:n], *args)
            problem = disagreement(values[:n], reference)
            _CHECKED[key] = f"the Triton kernel disagrees with torch ({problem})" if problem else None
        failure = _CHECKED[key]
        if failure is not None:
            return self._fall_back(failure, q, k, args)
        return values

    def _fall_back(self, reason: str, q: torch.Tensor, k: torch.Tensor, args: tuple) -> torch.Tensor:
        log.warning("%s; continuing with the torch route (qk_kernel torch)", reason)
        self.use_triton = False
        self.fallback_reason = reason
        return self.torch_fn(q, k, *args)


def disagreement(values: torch.Tensor, reference: torch.Tensor, *, rtol: float = 1e-3,
                 max_fraction: float = 0.02) -> str | None:
    """Why two ``[B, H, M]`` metric tensors differ, or ``None`` when they agree.

    Logits rounded to bf16 may land one ulp apart when two dot products sum in different orders, which moves
    single values by up to a few percent; so the test is that NaNs match and at most ``max_fraction`` of the
    values differ by more than ``rtol`` (relative, with a 1e-3 floor). Any real defect (a wrong mask, index
    or column) moves most values of a metric.
    """
    if values.shape != reference.shape:
        return f"shapes {tuple(values.shape)} vs {tuple(reference.shape)}"
    values, reference = values.float(), reference.float()
    nan_v, nan_r = values.isnan(), reference.isnan()
    if not torch.equal(nan_v, nan_r):
        return f"{int((nan_v ^ nan_r).sum())} values NaN in one route only"
    ok = ~nan_r
    rel = (values[ok] - reference[ok]).abs() / reference[ok].abs().clamp_min(1e-3)
    frac = (rel > rtol).float().mean().item() if rel.numel() else 0.0
    if frac > max_fraction:
        return f"{frac:.1%} of values differ by more than {rtol:g} relative, up to {rel.max().item():.3g}"
    return None
