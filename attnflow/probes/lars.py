"""LARS and the per-iteration warm-up + half-cycle cosine learning-rate schedule of the MAE linear probe.

Both follow MAE's ``util/lars.py`` and ``util/lr_sched.adjust_learning_rate`` (github.com/facebookresearch/mae,
identical in the paper's github.com/gmum/beyond_cls):

* LARS: for every parameter with ``ndim > 1`` the update ``g + wd * p`` is scaled by the trust ratio
  ``trust_coefficient * ||p|| / ||g + wd * p||`` (1 when either norm is 0); biases and other ``ndim <= 1``
  parameters get neither trust ratio nor weight decay. Then ``mu = momentum * mu + update``,
  ``p -= lr * mu``. The linear-probe protocol uses ``weight_decay = 0``.
* Schedule: ``lr(e) = base * e / warmup`` for ``e < warmup`` else
  ``min_lr + (base - min_lr) * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2``, evaluated per optimizer
  step at the fractional epoch ``e = epoch + step / steps_per_epoch``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


class LARS(torch.optim.Optimizer):
    """LARS without rate scaling or weight decay for parameters with ``ndim <= 1`` (MAE / MoCo-v3 semantics).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (the schedule overwrites it every step).
        weight_decay: L2 added to the update of ``ndim > 1`` parameters (0 in the linear-probe protocol).
        momentum: momentum of the ``mu`` buffer.
        trust_coefficient: the LARS coefficient eta.
    """

    def __init__(self, params: Iterable, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                update = p.grad
                if update is None:
                    continue
                if p.ndim > 1:  # not a bias or normalisation parameter
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(update)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0,
                                    torch.where(update_norm > 0, group["trust_coefficient"] * param_norm / update_norm,
                                                one),
                                    one)
                    update = update.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def cosine_lr(base_lr: float, epoch: float, *, epochs: int, warmup_epochs: float, min_lr: float = 0.0) -> float:
    """MAE's ``adjust_learning_rate``: linear warm-up, then half-cycle cosine decay to ``min_lr``.

    Args:
        base_lr: the peak (absolute) learning rate.
        epoch: fractional epoch ``epoch + step / steps_per_epoch``.
        epochs: total epochs.
        warmup_epochs: warm-up length in epochs.
        min_lr: floor of the cosine.
    """
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = epochs - warmup_epochs
    progress = (epoch - warmup_epochs) / span if span > 0 else 1.0
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate (honouring a group's ``lr_scale`` as MAE does)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(name: str, params: Iterable, *, lr: float, momentum: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """``"lars"`` -> :class:`LARS`; ``"sgd"`` -> :class:`torch.optim.SGD` (the paper's code passes no
    momentum to SGD, i.e. ``momentum=0`` in the CUB / ImageNet-1% presets)."""
    if name == "lars":
        return LARS(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    from ..errors import AttnflowError

    raise AttnflowError(f"unknown optimizer {name!r}; choose lars or sgd")
