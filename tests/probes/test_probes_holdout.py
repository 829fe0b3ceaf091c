"""The default lr: a base-lr grid trained in one pass, each head's lr chosen on held-out *training* samples.

The planted task: the label sits in 3 of 49 tokens ([cls] + 48 patches) of 1,000 training samples. The paper's
fixed rule (LARS, lr 0.1 x batch / 256), fit_heads' old default, leaves AbMILP near chance there; the grid
with the held-out choice trains it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from attnflow.errors import AttnflowError
from attnflow.probes.fit import fit_bank, fit_heads
from attnflow.probes.holdout import held_count, holdout_split, mark_selected
from attnflow.probes.protocols import DEFAULT_BASE_LRS
from probe_data import one_thread, planted_tokens  # noqa: F401  (autouse fixture)


def test_split_holds_out_a_share_of_every_class_by_seed():
    labels = torch.tensor([0] * 20 + [1] * 9 + [2] * 1 + [3] * 2)[torch.randperm(32, generator=torch.Generator()
                                                                                   .manual_seed(0))]
    split = holdout_split(labels, 0.1, seed=0)
    held_per_class = torch.bincount(labels[split.held], minlength=4).tolist()
    assert held_per_class == [2, 1, 0, 1]  # round(2.0), round(0.9), a class of 1 keeps it, at least 1 of 2
    assert sorted(torch.cat([split.fit, split.held]).tolist()) == list(range(32))  # disjoint, all covered
    assert split.fit.tolist() == sorted(split.fit.tolist())
    again, other = holdout_split(labels, 0.1, seed=0), holdout_split(labels, 0.1, seed=1)
    assert torch.equal(again.held, split.held) and not torch.equal(other.held, split.held)
    assert [held_count(c, 0.5) for c in (1, 2, 3, 10)] == [0, 1, 2, 5]  # none of 1, never all of a class
    assert len(holdout_split(labels, 0.0, seed=0).held) == 0
    with pytest.raises(AttnflowError, match="no class"):
        holdout_split(torch.arange(5), 0.1, seed=0)  # one sample per class: nothing can be held out


def test_choice_is_the_best_held_out_top1_then_loss_then_smaller_lr():
    table = pd.DataFrame({"seed": [0] * 6, "head": ["a"] * 3 + ["b"] * 3, "lr": [0.1, 1.0, 3.0] * 2,
                          "top1": [99.0, 10.0, 10.0, 99.0, 10.0, 10.0],  # val: never consulted
                          "holdout_top1": [50.0, 80.0, 80.0, 60.0, 60.0, 60.0],
                          "holdout_loss": [1.0, 0.5, 0.4, 0.7, 0.7, 0.9]})
    chosen = table[mark_selected(table, selects=True)]
    assert list(zip(chosen["head"], chosen["lr"])) == [("a", 3.0), ("b", 0.1)]
    assert not mark_selected(table, selects=False).any()  # a grid without held-out data: nothing chosen


def planted(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return planted_tokens(n, patches=48, signal_tokens=3, dim=16, seed=seed)


def test_planted_task_old_default_fails_and_held_out_grid_trains_abmilp():
    train, val = planted(1000, seed=0), planted(400, seed=1)
    heads = ["avg", "abmilp"]
    old = fit_heads(train, val, heads, epochs=20, batch_size=256, base_lr=0.1, device="cpu")  # the paper's rule
    old_acc = dict(zip(old["head"], old["top1"]))
    assert old["lr"].tolist() == [0.1, 0.1] and old_acc["abmilp"] < 40, old_acc  # 4 classes: chance 25
    result = fit_bank(train, val, heads, epochs=20, device="cpu")  # the defaults: grid + held-out choice
    new = result.chosen
    assert len(result.table) == len(heads) * len(DEFAULT_BASE_LRS) and len(new) == len(heads)
    new_acc = dict(zip(new["head"], new["top1"]))
    assert new_acc["abmilp"] > 85 and new_acc["abmilp"] > new_acc["avg"] + 20, new_acc
    assert set(new["lr"]) <= {b for b in DEFAULT_BASE_LRS if b > 0.1}  # batch 256: lr = base lr
    assert len(result.holdout) == 100 and result.options.batch_size == 256
    # the returned table reports the chosen lr and its validation accuracy, as fit_bank's grid has it
    grid = result.table.set_index(["head", "lr"])
    for row in new.itertuples():
        assert row.top1 == grid.loc[(row.head, row.lr), "top1"]
        best = grid.loc[row.head]["holdout_top1"].max()
        assert row.holdout_top1 == best


def small() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    return planted_tokens(200, seed=0, patches=6, dim=8), planted_tokens(60, seed=1, patches=6, dim=8)


KW = dict(epochs=3, batch_size=32, lr=[0.3, 3.0, 30.0], optimizer="lars", seed=5, device="cpu")


def test_held_out_scores_by_hand_and_the_choice_ignores_val():
    train, val = small()
    result = fit_bank(train, val, ["cls", "abmilp"], **KW)
    held = result.holdout
    assert len(held) == 20  # 10% of 200, per class
    tokens, labels = train[0][held], train[1][held]
    with torch.no_grad():
        for entry, logits in zip(result.bank.entries, result.bank.eval()(tokens)):  # scored by hand
            row = result.table[(result.table["head"] == entry.spec.name) & (result.table["lr"] == entry.lr)]
            assert row["holdout_top1"].item() == pytest.approx(100 * (logits.argmax(1) == labels).float().mean())
            loss = torch.nn.functional.cross_entropy(logits, labels).item()
            assert row["holdout_loss"].item() == pytest.approx(loss, rel=1e-5)
    # a validation set with scrambled labels changes every val accuracy, and not one choice
    scrambled = (val[0], val[1][torch.randperm(len(val[1]), generator=torch.Generator().manual_seed(0))])
    other = fit_bank(train, scrambled, ["cls", "abmilp"], **KW)
    assert not other.table["top1"].equals(result.table["top1"])
    assert other.table["selected"].equals(result.table["selected"])
    assert other.table["holdout_top1"].equals(result.table["holdout_top1"])


def test_held_out_samples_are_never_trained_on():
    train, val = small()
    result = fit_bank(train, val, ["cls", "abmilp", "ap1"], **KW)
    garbage = train[0].clone()
    garbage[result.holdout] = 1e3 * torch.randn(len(result.holdout), *train[0].shape[1:])
    again = fit_bank((garbage, train[1]), val, ["cls", "abmilp", "ap1"], **KW)
    assert torch.equal(again.holdout, result.holdout)  # the split depends on the labels and the seed only
    for (name, a), b in zip(result.bank.state_dict().items(), again.bank.state_dict().values()):
        assert torch.equal(a, b), name  # the same heads: not one held-out sample reached the training
    assert again.table["train_loss"].equals(result.table["train_loss"])


def test_one_lr_or_no_holdout_trains_on_everything_and_chooses_nothing():
    train, val = small()
    one = fit_bank(train, val, ["abmilp"], **{**KW, "lr": 3.0})
    assert len(one.holdout) == 0 and one.table["selected"].all() and one.table["holdout_top1"].isna().all()
    everything = fit_bank(train, val, ["abmilp"], **{**KW, "holdout": 0})
    assert len(everything.holdout) == 0 and not everything.table["selected"].any()
    assert len(fit_heads(train, val, ["abmilp"], **{**KW, "holdout": 0})) == 3  # every lr, none chosen
    both = fit_bank(train, val, ["abmilp"], **KW)
    assert both.options.selects_lr and len(both.chosen) == 1 and both.chosen["selected"].all()
