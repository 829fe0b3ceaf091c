"""Probes of internal blocks: the tokens of several blocks from one forward pass, checked against timm's own blocks
run by hand."""

from __future__ import annotations

import pytest
import torch

from attnflow.encode import BlockTokenEncoder, TokenEncoder
from conftest import tiny_model
from probe_data import one_thread  # noqa: F401  (autouse fixture)


def by_hand(model: torch.nn.Module, images: torch.Tensor, upto: int) -> torch.Tensor:
    """timm's ViT stages run one by one up to block ``upto`` (inclusive), without the final norm."""
    x = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(model.patch_drop(x))
    for blk in model.blocks[:upto + 1]:
        x = blk(x)
    return x


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
            raw = by_hand(model, images, b)
            expected = torch.cat([raw[:, :1], raw[:, prefix:]], 1) if prefix else raw
            torch.testing.assert_close(got[:, i], expected, rtol=0, atol=0)
            normed = BlockTokenEncoder(model, blocks=[0, 2], amp="none", layernorm=True)(images)[:, i]
            torch.testing.assert_close(normed, model.norm(expected), rtol=0, atol=0)
    every = BlockTokenEncoder(model, blocks="all", amp="none")(images)
    with torch.no_grad():
        torch.testing.assert_close(every[:, 3], TokenEncoder(model, amp="none")(images), rtol=0, atol=0)
    assert every.shape[1] == 4  # no image readable yet: [cls] (if any) and one patch, for every block
    assert BlockTokenEncoder(model, blocks="all").empty().shape == (0, 4, int(prefix > 0) + 1, 32)
