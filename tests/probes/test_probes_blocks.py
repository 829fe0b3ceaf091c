"""Probes of internal blocks: the tokens of several blocks from one forward pass (checked against timm's own blocks
run by hand) and a block bank that trains each block's heads exactly as a bank trained on that block alone."""

from __future__ import annotations

import pytest
import torch

from attnflow.encode import BlockTokenEncoder, TokenEncoder, resolve_blocks
from attnflow.errors import AttnflowError
from attnflow.probes.bank import HeadBank
from attnflow.probes.blockbank import BlockBank
from attnflow.probes.fit import eval_batches, result_tables, tensor_batches
from attnflow.probes.holdout import holdout_split
from attnflow.probes.loop import Schedule, train_bank
from attnflow.probes.protocols import TrainOptions, parse_blocks, resolve_config
from attnflow.probes.sampler import BatchPlan
from attnflow.probes.specs import parse_head_list
from conftest import tiny_model
from probe_data import one_thread, planted_tokens  # noqa: F401  (autouse fixture)
from brute_force import blocks_by_hand


def count_block_calls(model: torch.nn.Module) -> list[int]:
    """A list whose entry ``b`` counts the forward calls of block ``b`` (forward hooks, never removed)."""
    calls = [0] * len(model.blocks)
    for b, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda *_, b=b: calls.__setitem__(b, calls[b] + 1))
    return calls


@pytest.mark.parametrize("kw,prefix", [({}, 1), ({"reg_tokens": 2}, 3), ({"class_token": False,
                                                                         "global_pool": "avg"}, 0)])
def test_block_encoder_gives_each_blocks_tokens_from_one_forward_that_stops_after_the_deepest(kw, prefix):
    model = tiny_model(img_size=32, depth=4, **kw)
    images = torch.randn(3, 3, 32, 32)
    calls = count_block_calls(model)
    enc = BlockTokenEncoder(model, blocks=[2, 0, -4], amp="none")  # -4 is block 0 again: read once
    assert enc.blocks == [0, 2] and enc.block == 2
    got = enc(images)
    assert got.shape == (3, 2, int(prefix > 0) + 4, 32)
    assert calls == [1, 1, 1, 0]  # one pass; block 3 never ran
    with torch.no_grad():
        for i, b in enumerate([0, 2]):
            raw = blocks_by_hand(model, images, b)
            expected = torch.cat([raw[:, :1], raw[:, prefix:]], 1) if prefix else raw
            torch.testing.assert_close(got[:, i], expected, rtol=0, atol=0)
            normed = BlockTokenEncoder(model, blocks=[0, 2], amp="none", layernorm=True)(images)[:, i]
            torch.testing.assert_close(normed, model.norm(expected), rtol=0, atol=0)
    every = BlockTokenEncoder(model, blocks="all", amp="none")(images)
    with torch.no_grad():
        torch.testing.assert_close(every[:, 3], TokenEncoder(model, amp="none")(images), rtol=0, atol=0)
    assert every.shape[1] == 4  # no image readable yet: [cls] (if any) and one patch, for every block
    assert BlockTokenEncoder(model, blocks="all").empty().shape == (0, 4, int(prefix > 0) + 1, 32)


def test_blocks_are_checked_against_the_model_and_the_options():
    model = tiny_model(img_size=32, depth=3)
    assert resolve_blocks(model, "ALL") == [0, 1, 2] and resolve_blocks(model, [-1, 0]) == [0, 2]
    with pytest.raises(AttnflowError, match="block 3 does not exist: the model has 3 blocks"):
        resolve_blocks(model, [0, 3])
    with pytest.raises(AttnflowError, match="'all'"):
        resolve_blocks(model, "last")
    assert parse_blocks("5, 8,11") == [5, 8, 11] and parse_blocks(7) == [7] and parse_blocks(" all ") == "all"
    for bad in ("6-12", [], [1.5], "x"):
        with pytest.raises(AttnflowError, match="counted from 0"):
            parse_blocks(bad)
    assert resolve_config("cub", blocks="0,2").blocks == [0, 2]
    with pytest.raises(AttnflowError, match="block 1 and blocks"):
        resolve_config("cub", block=1, blocks="all")
    with pytest.raises(AttnflowError, match="use block, not blocks"):
        resolve_config("cub", blocks=[0, 1], aggregation="cls_mean", heads="cls")


def _train(bank, train, val, plan, held_rows):
    """``train_bank`` on in-memory tokens: the plan indexes the fitted rows; the held-out rows score lr choices."""
    (xt, yt), (xv, yv) = train, val
    return train_bank(bank, plan=plan, train_batches=tensor_batches(xt, yt, plan, held_rows[0]),
                      val_batches=eval_batches(xv, yv, 16), holdout_batches=eval_batches(xt, yt, 16, held_rows[1]),
                      schedule=Schedule(3, warmup_epochs=1), device=torch.device("cpu"), progress=False)


def test_block_bank_trains_each_blocks_heads_as_a_bank_on_that_blocks_tokens_alone():
    blocks = [3, 7]  # two "blocks": two token sets of the same images, the signal in [cls] or in the patches
    train = [planted_tokens(64, where, patches=6, dim=8, seed=s) for where, s in (("cls", 0), ("patch", 1))]
    val = [planted_tokens(24, where, patches=6, dim=8, seed=s) for where, s in (("cls", 2), ("patch", 3))]
    labels = train[0][1]
    train = [(x, labels) for x, _ in train]
    val = [(x, val[0][1]) for x, _ in val]
    stacked = (torch.stack([x for x, _ in train], 1), labels), (torch.stack([x for x, _ in val], 1), val[0][1])
    options = TrainOptions(optimizer="lars", seed=5, epochs=3)
    specs, lrs = parse_head_list("cls,abmilp"), [0.3, 3.0]
    split = holdout_split(labels, 0.25, seed=5)
    plan = BatchPlan(len(split.fit), 16, accum_steps=2, seed=5)
    rows = (split.fit, split.held)
    kw = dict(dim=8, num_classes=4, has_cls=True)
    together = BlockBank.from_options(blocks, specs, lrs, options, **kw)
    assert together.names[:2] == ["block3/cls@lr=0.3", "block3/cls@lr=3"] and len(together.entries) == 8
    history, table = result_tables(_train(together, *stacked, plan, rows), 5, selects=True)
    assert list(table.columns[:2]) == ["block", "head"] and sorted(set(table["block"])) == blocks
    for i, block in enumerate(blocks):
        alone = HeadBank.from_options(specs, lrs, options, **kw)
        alone_history, alone_table = result_tables(_train(alone, train[i], val[i], plan, rows), 5, selects=True)
        mine = table[table["block"] == block].drop(columns="block").reset_index(drop=True)
        assert mine.equals(alone_table), block  # same accuracies, losses and the same kept lr per head
        assert history[history["block"] == block].drop(columns="block").reset_index(drop=True).equals(alone_history)
        for entry, ref in zip([e for e in together.entries if e.block == block], alone.entries):
            assert entry.name == f"block{block}/{ref.name}"
            for (name, p), q in zip(entry.head.state_dict().items(), ref.head.state_dict().values()):
                assert torch.equal(p, q), f"{entry.name}: {name}"
    with pytest.raises(ValueError, match=r"tokens \[n, 2, tokens, D\]"):
        together.losses(train[0][0], labels)



def test_shipped_probe_blocks_config_resolves():
    from pathlib import Path

    config = resolve_config("cub", Path(__file__).resolve().parents[2] / "analyses" / "probe_blocks_cub.toml")
    assert (config.task, config.heads, config.blocks, config.seeds) == ("cub", "cls,avg,abmilp", "all", [0, 1, 2])
    assert (config.optimizer, config.batch_size, config.block) == ("sgd", 1024, -1)  # the paper's CUB preset
