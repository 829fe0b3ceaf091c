"""The head bank trains every (head, lr) exactly as if it ran alone; one encoder pass per micro-batch."""

from __future__ import annotations

import torch

from attnflow.probes.bank import HeadBank, head_seed
from attnflow.probes.fit import fit_bank
from attnflow.probes.specs import parse_head_list
from probe_data import one_thread, planted_tokens  # noqa: F401  (autouse fixture)

SPECS = ["cls", "avg", "abmilp", "abmilp-mlp-relu", "sa-abmilp", "ap2"]


def test_bank_equals_separate_runs_bitwise():
    train, val = planted_tokens(96, seed=0, patches=6, dim=8), planted_tokens(40, seed=1, patches=6, dim=8)
    kw = dict(epochs=3, batch_size=32, accum_steps=2, optimizer="lars", warmup_epochs=1, seed=3, device="cpu")
    lrs = [0.5, 4.0]
    grid = fit_bank(train, val, SPECS, lr=lrs, holdout=0, **kw)  # every lr on all of train, none chosen
    together, bank = grid.table, grid.bank
    assert len(together) == len(SPECS) * len(lrs) and not together["selected"].any()
    for entry in bank.entries:
        single = fit_bank(train, val, [entry.spec.name], lr=entry.lr, **kw)
        alone, ref = single.table, single.bank.entries[0]
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


def test_micro_batches_with_fewer_than_two_readable_images_are_left_out(caplog):
    """A micro-batch of 0 or 1 readable images (the rest corrupt) cannot be batch-normalised: training leaves it
    out, a step without samples does not move the heads, and the rest trains as written out by hand below."""
    import copy
    import logging

    from attnflow.probes.loop import Schedule, train_bank
    from attnflow.probes.sampler import BatchPlan

    tokens, labels = planted_tokens(12, seed=0, patches=4, dim=8)
    a, b, c = (tokens[:4], labels[:4]), (tokens[4:8], labels[4:8]), (tokens[8:], labels[8:])
    single, empty = (tokens[:1], labels[:1]), (tokens[:0], labels[:0])
    # 3 steps of 2 micro-batches: [a, single], [empty, single] (nothing to learn from), [b, c]
    micro = [a, single, empty, single, b, c]
    bank = HeadBank(parse_head_list("cls,abmilp"), [0.5], dim=8, num_classes=int(labels.max()) + 1,
                    has_cls=True, optimizer="sgd", seed=0)
    ref = copy.deepcopy(bank)
    plan = BatchPlan(12, batch_size=4, accum_steps=2)
    assert plan.steps_per_epoch == 3
    with caplog.at_level(logging.WARNING, logger="attnflow.probes.loop"):
        train_bank(bank, plan=plan, train_batches=lambda epoch: iter(micro), val_batches=lambda: [c],
                   schedule=Schedule(epochs=1), device=torch.device("cpu"), progress=False)
    assert "2 readable image(s) left out" in caplog.text

    # the reference, by hand: step 0 learns from a alone, step 1 changes nothing, step 2 learns from b and c
    ref.train()
    for step, batches in ((0, [a]), (2, [b, c])):
        ref.schedule(step / 3, epochs=1, warmup_epochs=0.0)
        ref.zero_grad()
        for x, y in batches:
            ref.losses(x, y).sum().backward()
        ref.finish_step(sum(len(y) for _, y in batches), torch.device("cpu"))
    for p, q in zip(bank.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
