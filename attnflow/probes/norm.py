"""The probe's BatchNorm: ``BatchNorm1d(affine=False, eps=1e-6)`` of the MAE linear-probe protocol, whose
training statistics span every process of a ``torch.distributed`` run.

With one process it computes the same thing as :class:`torch.nn.BatchNorm1d` (two-pass mean and biased
variance over the batch for normalisation, unbiased variance for the running estimate). Under
``torch.distributed`` the sums and the count are all-reduced with the differentiable
:func:`torch.distributed.nn.functional.all_reduce`, so N processes with N shards of a batch give the same
outputs and gradients as one process with the whole batch (a CPU/gloo-capable stand-in for
:class:`torch.nn.SyncBatchNorm`, which runs on GPUs only). The paper's code normalises over each GPU's own
micro-batch instead; at its per-GPU batch of 2,048 the two differ negligibly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over processes, differentiable (identity without a multi-process group)."""
    if _distributed():
        import warnings

        from torch.distributed.nn.functional import all_reduce

        with warnings.catch_warnings():  # deprecated in favour of a private module; still the public autograd op
            warnings.simplefilter("ignore", FutureWarning)
            return all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ProbeBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d(dim, eps=1e-6, affine=False)`` with batch statistics over all processes.

    Shape:
        ``[n, D] -> [n, D]``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, momentum: float = 0.1) -> None:
        super().__init__(dim, eps=eps, momentum=momentum, affine=False, track_running_stats=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        count = _world_sum(x.new_tensor([float(x.shape[0])]))
        mean = _world_sum(x.sum(dim=0)) / count  # [D]
        centred = x - mean
        var = _world_sum((centred * centred).sum(dim=0)) / count  # biased, [D]
        if x.shape[0] < 2 and count.numel() and not _distributed():
            raise ValueError("batch normalisation needs at least 2 samples per training batch")
        running_mean, running_var, tracked = self.running_mean, self.running_var, self.num_batches_tracked
        assert running_mean is not None and running_var is not None and tracked is not None  # track_running_stats
        momentum = float(self.momentum if self.momentum is not None else 0.1)
        with torch.no_grad():  # no host sync: the unbiased factor n / (n - 1) stays on the device
            tracked.add_(1)
            unbiased = var.detach() * (count / (count - 1).clamp_min(1))
            running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        return centred * torch.rsqrt(var + self.eps)
