"""The head bank trains every (head, lr) exactly as if it ran alone; one encoder pass per micro-batch."""

from __future__ import annotations

import torch

from attnflow.probes.bank import HeadBank, head_seed
from attnflow.probes.fit import fit_heads
from attnflow.probes.specs import parse_head_list
from probe_data import one_thread, planted_tokens  # noqa: F401  (autouse fixture)

SPECS = ["cls", "avg", "abmilp", "abmilp-mlp-relu", "sa-abmilp", "ap2"]


def test_bank_equals_separate_runs_bitwise():
    train, val = planted_tokens(96, seed=0, patches=6, dim=8), planted_tokens(40, seed=1, patches=6, dim=8)
    kw = dict(epochs=3, batch_size=32, accum_steps=2, optimizer="lars", warmup_epochs=1, seed=3, device="cpu")
    lrs = [0.5, 4.0]
    together, bank = fit_heads(train, val, SPECS, lr=lrs, return_bank=True, **kw)
    assert len(together) == len(SPECS) * len(lrs)
    for entry in bank.entries:
        alone, single = fit_heads(train, val, [entry.spec.name], lr=entry.lr, return_bank=True, **kw)
        ref = single.entries[0]
        for (name, p), q in zip(entry.head.state_dict().items(), ref.head.state_dict().values()):
            assert torch.equal(p, q), f"{entry.name}: {name} differs from the separate run"
        for state_a, state_b in zip(entry.optimizer.state.values(), ref.optimizer.state.values()):
            assert torch.equal(state_a["mu"], state_b["mu"])
        row = together[(together["head"] == entry.spec.name) & (together["lr"] == entry.lr)]
        assert row["top1"].item() == alone["top1"].item()
        assert row["train_loss"].item() == alone["train_loss"].item()


def test_bank_entries_have_own_optimizers_and_lrs():
    bank = HeadBank(parse_head_list("cls,abmilp"), [0.1, 1.0], dim=8, num_classes=3, has_cls=True, seed=0)
    assert bank.names == ["cls@lr=0.1", "cls@lr=1", "abmilp@lr=0.1", "abmilp@lr=1"]
    params = [{id(p) for p in e.head.parameters()} for e in bank.entries]
    assert all(not (a & b) for i, a in enumerate(params) for b in params[i + 1:])  # no shared parameters
    assert len({id(e.optimizer) for e in bank.entries}) == 4
    bank.schedule(5.0, epochs=10, warmup_epochs=10)
    assert [e.optimizer.param_groups[0]["lr"] for e in bank.entries] == [0.05, 0.5, 0.05, 0.5]
    # same spec, different lr: same initial weights (the init depends on seed and spec only)
    assert torch.equal(bank.entries[2].head.fc.weight, bank.entries[3].head.fc.weight)
    assert head_seed(0, "abmilp") != head_seed(1, "abmilp") != head_seed(0, "cls")


def test_losses_are_per_entry_cross_entropy_sums():
    torch.manual_seed(0)
    bank = HeadBank(parse_head_list("avg,abmilp"), [1.0], dim=8, num_classes=3, has_cls=True, seed=0)
    x, y = torch.randn(5, 7, 8), torch.tensor([0, 1, 2, 1, 0])
    losses = bank.losses(x, y)
    for loss, entry in zip(losses, bank.entries):
        logits = entry.head(x)
        manual = sum(-torch.log_softmax(logits[i], 0)[y[i]] for i in range(5))
        torch.testing.assert_close(loss, manual)
