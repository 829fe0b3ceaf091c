"""The head bank: one frozen-encoder pass feeds every head of a run, and optionally a grid of learning rates.

Each (head spec, learning rate) entry owns its parameters, its BatchNorm statistics and its own optimizer
(own momentum buffers, own LARS trust ratios, own schedule peak), and its initial weights depend only on
``(seed, spec)`` (``abmilp-k1`` starts from ``abmilp``'s: :attr:`~attnflow.probes.specs.HeadSpec.init_name`).
The bank's loss is the sum of the entries' losses; since the entries share no parameters and the tokens are
constants, every entry gets exactly the gradient it would get alone, so a bank trains each entry as if it ran
by itself (tested: bitwise equal to separate runs).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..dist import all_reduce_grads
from .heads import ProbeHead, build_head
from .lars import cosine_lr, make_optimizer, set_lr
from .specs import HeadSpec

if TYPE_CHECKING:
    from .protocols import TrainOptions


def head_seed(seed: int, spec_name: str) -> int:
    """Initialisation seed of a head: a function of the run seed and the spec only (not of the lr or of the
    other heads in the bank)."""
    return zlib.crc32(f"{seed}:{spec_name}".encode()) & 0x7FFFFFFF


def entry_name(spec_name: str, lr: float, grid: bool) -> str:
    """``"abmilp"``, or ``"abmilp@lr=0.4"`` when the bank sweeps learning rates."""
    return f"{spec_name}@lr={lr:g}" if grid else spec_name


@dataclass
class BankEntry:
    """One trained head of the bank: its spec, peak learning rate, module and optimizer."""

    name: str
    spec: HeadSpec
    lr: float
    head: ProbeHead
    optimizer: torch.optim.Optimizer


class HeadBank(nn.Module):
    """Several probe heads trained together on the same tokens.

    Args:
        specs: head specs (see :func:`attnflow.probes.specs.parse_head_list`).
        lrs: absolute peak learning rates; every spec is trained once per lr.
        dim: token width D.
        num_classes: classes K.
        has_cls: whether ``tokens[:, 0]`` is a [cls] token.
        optimizer: ``"lars"`` or ``"sgd"``.
        momentum: optimizer momentum.
        weight_decay: optimizer weight decay.
        seed: run seed (head initialisation).
        head_init: classifier initialisation (see :data:`attnflow.probes.heads.HEAD_INITS`).
        patch_grid: the patch grid of ``-pe`` AbMILP heads (``None``: square, inferred from the tokens).
        eval_amp: autocast of the heads at evaluation, ``"fp32"`` (none), ``"fp16"`` (the official code's
            ``evaluate``) or ``"bf16"`` (see :func:`attnflow.probes.loop.evaluate_bank`).
    """

    def __init__(self, specs: Sequence[HeadSpec], lrs: Sequence[float], *, dim: int, num_classes: int,
                 has_cls: bool, optimizer: str = "lars", momentum: float = 0.9, weight_decay: float = 0.0,
                 seed: int = 0, head_init: str = "default", patch_grid: tuple[int, int] | None = None,
                 eval_amp: str = "fp32") -> None:
        super().__init__()
        self.heads = nn.ModuleList()
        self.entries: list[BankEntry] = []
        grid = len(lrs) > 1
        for spec in specs:
            for lr in lrs:
                head = build_head(spec, dim, num_classes, has_cls, seed=head_seed(seed, spec.init_name),
                                  init=head_init, grid=patch_grid)
                opt = make_optimizer(optimizer, head.parameters(), lr=lr, momentum=momentum,
                                     weight_decay=weight_decay)
                self.heads.append(head)
                self.entries.append(BankEntry(entry_name(spec.name, lr, grid), spec, float(lr), head, opt))
        self.optimizer_name = optimizer
        self.dim, self.num_classes, self.has_cls = dim, num_classes, has_cls
        self.eval_amp = eval_amp

    @classmethod
    def from_options(cls, specs: Sequence[HeadSpec], lrs: Sequence[float], options: "TrainOptions", *, dim: int,
                     num_classes: int, has_cls: bool, patch_grid: tuple[int, int] | None = None) -> "HeadBank":
        """A bank of ``specs`` x ``lrs`` with the optimizer, momentum, weight decay, head init, seed and evaluation
        autocast of ``options``."""
        return cls(specs, lrs, dim=dim, num_classes=num_classes, has_cls=has_cls, optimizer=options.optimizer,
                   momentum=options.momentum, weight_decay=options.weight_decay, seed=options.seed,
                   head_init=options.head_init, patch_grid=patch_grid, eval_amp=options.eval_amp)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every entry: tokens ``[n, P + N, D]`` -> list of ``[n, K]``."""
        return [e.head(tokens) for e in self.entries]

    def losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-entry cross-entropy *summed* over the samples: ``[len(entries)]`` (see :meth:`finish_step`).

        Back-propagate ``losses(...).sum()``: entries share no parameters, so each gets its own gradient.
        """
        tokens = tokens.float()
        return torch.stack([F.cross_entropy(logits, labels, reduction="sum") for logits in self(tokens)])

    def schedule(self, epoch: float, *, epochs: int, warmup_epochs: float, min_lr: float = 0.0) -> None:
        """Set every entry's learning rate for the fractional ``epoch`` (MAE warm-up + cosine)."""
        for e in self.entries:
            set_lr(e.optimizer, cosine_lr(e.lr, epoch, epochs=epochs, warmup_epochs=warmup_epochs, min_lr=min_lr))

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        for e in self.entries:
            e.optimizer.zero_grad(set_to_none=set_to_none)

    def finish_step(self, local_count: int, device: torch.device) -> None:
        """All-reduce and normalise the accumulated gradients (global mean loss), then step every optimizer."""
        all_reduce_grads([p for p in self.parameters() if p.requires_grad], local_count, device)
        for e in self.entries:
            e.optimizer.step()

    def training_state(self) -> dict:
        """Heads, BatchNorm statistics and every optimizer's state (for checkpoints)."""
        return {"heads": self.state_dict(), "optimizers": [e.optimizer.state_dict() for e in self.entries],
                "names": self.names}

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`training_state` (the bank must have been built with the same specs and lrs)."""
        if state["names"] != self.names:
            raise ValueError(f"checkpoint heads {state['names']} differ from this run's {self.names}")
        self.load_state_dict(state["heads"])
        for e, opt_state in zip(self.entries, state["optimizers"]):
            e.optimizer.load_state_dict(opt_state)
