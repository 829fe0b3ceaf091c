"""Heads of several encoder blocks trained together from one frozen forward pass.

The paper's Sec. 6 outlook: "Selective Aggregation acts only on patch representations of the final ViT block ...
similarly aggregating MIM representations within internal ViT blocks could yield further improvements". A
:class:`BlockBank` holds one :class:`~attnflow.probes.bank.HeadBank` per block (every head spec and lr of the
run, for that block) and reads micro-batches of stacked tokens ``[n, L, P + N, D]`` (``tokens[:, i]`` is block
``blocks[i]``, as :class:`~attnflow.encode.BlockTokenEncoder` and a several-block token cache give them), so one
encoder pass per micro-batch feeds every block's heads.

Each block's bank is built exactly as the bank of a run on that block alone (same specs, lrs, options and seed, so
the same initial weights: :func:`~attnflow.probes.bank.head_seed` depends on the run seed and the spec only) and
gets exactly that block's tokens; the banks share no parameters and the loss is a sum, so each block's heads
train as they would in a run on that block alone (tested: bitwise equal). It has the interface of a
:class:`HeadBank` that :func:`~attnflow.probes.loop.train_bank` uses (``entries``, ``losses``, ``schedule``,
``finish_step``, checkpoints); its entries are :class:`BlockEntry` s, named ``block{B}/{head}`` (0-based ``B``),
and the loop's history rows gain their ``block``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence, cast

import torch
import torch.nn as nn

from .bank import BankEntry, HeadBank
from .specs import HeadSpec

if TYPE_CHECKING:
    from .protocols import TrainOptions


def block_entry_name(block: int, name: str) -> str:
    """``"block5/abmilp@lr=0.4"``: the entry ``name`` of block ``block`` (0-based, as the data count blocks)."""
    return f"block{block}/{name}"


@dataclass
class BlockEntry(BankEntry):
    """A :class:`~attnflow.probes.bank.BankEntry` of one block's bank: its head reads block ``block``'s tokens."""

    block: int = -1


class BlockBank(nn.Module):
    """One head bank per encoder block, trained from stacked tokens ``[n, L, P + N, D]``.

    Args:
        banks: block index (0-based) -> that block's bank; the order is the order of the blocks in the tokens
            (``tokens[:, i]`` feeds the ``i``-th bank). All banks must have the same width and classes.

    Attributes:
        blocks: the block indices, in token order.
        banks: the per-block banks.
        entries: every block's entries, block by block (:class:`BlockEntry`).
    """

    def __init__(self, banks: Mapping[int, HeadBank]) -> None:
        super().__init__()
        if not banks:
            raise ValueError("a block bank needs at least one block")
        self.blocks = [int(b) for b in banks]
        self.banks = nn.ModuleList(banks.values())
        first = next(iter(banks.values()))
        if any((b.dim, b.num_classes, b.has_cls) != (first.dim, first.num_classes, first.has_cls)
               for b in banks.values()):
            raise ValueError("the banks of a block bank must have the same width, classes and [cls] layout")
        self.dim, self.num_classes, self.has_cls = first.dim, first.num_classes, first.has_cls
        self.eval_amp, self.optimizer_name = first.eval_amp, first.optimizer_name
        self.entries: list[BlockEntry] = [
            BlockEntry(block_entry_name(block, e.name), e.spec, e.lr, e.head, e.optimizer, block=block)
            for block, bank in banks.items() for e in bank.entries]

    @classmethod
    def from_options(cls, blocks: Sequence[int], specs: Sequence[HeadSpec], lrs: Sequence[float],
                     options: "TrainOptions", *, dim: int, num_classes: int, has_cls: bool,
                     patch_grid: tuple[int, int] | None = None) -> "BlockBank":
        """For every block, the bank :meth:`HeadBank.from_options` builds for a run on that block alone."""
        return cls({int(b): HeadBank.from_options(specs, lrs, options, dim=dim, num_classes=num_classes,
                                                  has_cls=has_cls, patch_grid=patch_grid) for b in blocks})

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @property
    def per_block(self) -> list[HeadBank]:
        """The banks, in block order (:attr:`banks` typed)."""
        return [cast(HeadBank, bank) for bank in self.banks]

    def _split_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """``[n, L, P + N, D]`` -> ``L`` views ``[n, P + N, D]``, one per bank."""
        if tokens.ndim != 4 or tokens.shape[1] != len(self.blocks):
            raise ValueError(f"a block bank of {len(self.blocks)} blocks reads tokens [n, {len(self.blocks)}, "
                             f"tokens, D], got {tuple(tokens.shape)}")
        return list(tokens.unbind(1))

    def forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every entry, block by block: tokens ``[n, L, P + N, D]`` -> list of ``[n, K]``."""
        return [logits for bank, x in zip(self.per_block, self._split_tokens(tokens)) for logits in bank(x)]

    def losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-entry cross-entropy summed over the samples, ``[len(entries)]``: each bank's
        :meth:`HeadBank.losses` on its block's tokens (each block is cast to fp32 on its own)."""
        return torch.cat([bank.losses(x, labels) for bank, x in zip(self.per_block, self._split_tokens(tokens))])

    def schedule(self, epoch: float, *, epochs: int, warmup_epochs: float, min_lr: float = 0.0) -> None:
        """Every bank's :meth:`HeadBank.schedule`."""
        for bank in self.per_block:
            bank.schedule(epoch, epochs=epochs, warmup_epochs=warmup_epochs, min_lr=min_lr)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        for bank in self.per_block:
            bank.zero_grad(set_to_none)

    def finish_step(self, local_count: int, device: torch.device) -> None:
        """Every bank's :meth:`HeadBank.finish_step` (gradients all-reduced and normalised, one optimizer step)."""
        for bank in self.per_block:
            bank.finish_step(local_count, device)

    def training_state(self) -> dict:
        """Every bank's :meth:`HeadBank.training_state` (for checkpoints)."""
        return {"banks": [bank.training_state() for bank in self.per_block], "names": self.names}

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`training_state` (the bank must have been built with the same blocks, specs and lrs)."""
        if state.get("names") != self.names:
            raise ValueError(f"checkpoint heads {state.get('names')} differ from this run's {self.names}")
        for bank, bank_state in zip(self.per_block, state["banks"]):
            bank.load_training_state(bank_state)
