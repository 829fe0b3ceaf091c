"""Token extraction (block output, LayerNorm, prefix tokens) and the resumable disk cache."""

from __future__ import annotations

import json

import pytest
import torch

from attnflow.data.images import ImageFolderDataset
from attnflow.data.transforms import eval_transform
from attnflow.errors import AttnflowError
from attnflow.probes.cache import TokenCache, extract_tokens
from attnflow.encode import TokenEncoder
from attnflow.probes.imagedata import train_transform
from attnflow.probes.sampler import BatchPlan
from conftest import tiny_model
from probe_data import one_thread  # noqa: F401  (autouse fixture)
from brute_force import blocks_by_hand
from interrupts import interrupt_at_call

INFO = {"model": "tiny", "checkpoint_sha256": None, "dataset": "photos", "split": "train", "transform": "eval",
        "img_size": 32}


@pytest.mark.parametrize("kw,prefix,has_cls", [({}, 1, True), ({"reg_tokens": 2}, 3, True),
                                               ({"class_token": False, "global_pool": "avg"}, 0, False)])
def test_encoder_reads_block_output_and_drops_registers(kw, prefix, has_cls):
    model = tiny_model(img_size=32, **kw)
    images = torch.randn(2, 3, 32, 32)
    enc = TokenEncoder(model, amp="none")
    assert (enc.has_cls, enc.num_prefix, enc.dim) == (has_cls, prefix, 32)
    raw = blocks_by_hand(model, images, upto=1)
    expected = torch.cat([raw[:, :1], raw[:, prefix:]], 1) if has_cls else raw[:, prefix:]
    got = enc(images)
    assert got.shape == (2, int(has_cls) + 4, 32)
    torch.testing.assert_close(got, expected)
    normed = TokenEncoder(model, amp="none", layernorm=True)(images)
    torch.testing.assert_close(normed, model.norm(expected))
    first = TokenEncoder(model, amp="none", block=0)(images)
    raw0 = blocks_by_hand(model, images, upto=0)
    torch.testing.assert_close(first, torch.cat([raw0[:, :1], raw0[:, prefix:]], 1) if has_cls else raw0[:, prefix:])


def test_encoder_rejects_bad_block():
    with pytest.raises(AttnflowError, match="block 5 does not exist: the model has 2 blocks"):
        TokenEncoder(tiny_model(img_size=32), block=5)


@pytest.fixture()
def dataset(photo_folder):
    """The photos in two class folders, plus one unreadable file."""
    for k, path in enumerate(sorted(photo_folder.iterdir())):
        (photo_folder / f"class{k % 2}").mkdir(exist_ok=True)
        path.rename(photo_folder / f"class{k % 2}" / path.name)
    (photo_folder / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    model = tiny_model(img_size=32)
    return model, ImageFolderDataset(photo_folder, eval_transform(model, img_size=32))


def test_cache_holds_bf16_tokens_and_skips_bad_images(dataset, tmp_path):
    model, ds = dataset
    enc = TokenEncoder(model, amp="none")
    cache = extract_tokens(enc, ds, tmp_path / "c", info=INFO, batch_size=3, progress=False)
    assert cache.tokens.shape == (1, len(ds), 5, 32) and cache.tokens.dtype == torch.bfloat16
    bad = [i for i, p in enumerate(ds.paths) if p.name == "broken.jpg"]
    assert not cache.readable[bad].any() and len(cache.valid) == len(ds) - 1
    assert torch.equal(cache.labels[cache.valid], torch.tensor(ds.labels)[cache.valid])
    assert set(ds.labels) == {0, 1}
    for i in cache.valid.tolist():
        expected = enc(ds[i][0][None])[0]
        torch.testing.assert_close(cache.tokens[0, i].float(), expected.bfloat16().float())
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["unreadable"] == 1 and manifest["dtype"] == "bf16"
    reopened = extract_tokens(enc, ds, tmp_path / "c", info=INFO, batch_size=3, progress=False)  # reused
    assert torch.equal(reopened.tokens.view(torch.int16), cache.tokens.view(torch.int16))
    with pytest.raises(AttnflowError, match="differs in dtype"):
        extract_tokens(enc, ds, tmp_path / "c", info=INFO, dtype="fp16", progress=False)
    assert manifest["amp"] == "float32"
    bf16 = TokenEncoder(model, amp="fp32")
    bf16.amp_dtype = torch.bfloat16  # as a CUDA bf16 encoder records it (CPU autocast bf16 is refused)
    with pytest.raises(AttnflowError, match="differs in amp"):  # tokens of a bf16-autocast encoder differ
        extract_tokens(bf16, ds, tmp_path / "c", info=INFO, progress=False)


def test_interrupted_extraction_resumes_to_identical_cache(dataset, tmp_path, monkeypatch):
    model, ds = dataset
    ds.transform = train_transform(model, 32)  # random crops: each view must be re-drawn identically
    enc = TokenEncoder(model, amp="none")
    whole = extract_tokens(enc, ds, tmp_path / "whole", info=INFO, views=2, batch_size=2, progress=False)
    assert not torch.equal(whole.tokens[0], whole.tokens[1])  # two different augmented views

    calls = interrupt_at_call(monkeypatch, TokenEncoder, "__call__", 4)
    with pytest.raises(KeyboardInterrupt):
        extract_tokens(enc, ds, tmp_path / "part", info=INFO, views=2, batch_size=2, progress=False)
    with pytest.raises(AttnflowError, match="not a complete"):
        TokenCache.open(tmp_path / "part")
    # the loop's state of view 0 holds three whole batches (six images); view 1 has not begun
    assert torch.load(tmp_path / "part" / "view0.state.pt", weights_only=True)["done"] == 6
    assert not (tmp_path / "part" / "view1.state.pt").exists()
    resumed = extract_tokens(enc, ds, tmp_path / "part", info=INFO, views=2, batch_size=2, progress=False)
    assert len(calls) == 4 + (2 * len(range(0, len(ds), 2)) - 3)  # only the missing batches were encoded
    assert torch.equal(resumed.tokens.view(torch.int16), whole.tokens.view(torch.int16))
    assert torch.equal(resumed.labels, whole.labels)
    assert not list((tmp_path / "part").glob("*.state.pt")), "a complete cache keeps no state"


def test_cache_batches_follow_the_plan(dataset, tmp_path):
    model, ds = dataset
    cache = extract_tokens(TokenEncoder(model, amp="none"), ds, tmp_path / "c", info=INFO, views=1,
                           batch_size=4, progress=False)
    plan = BatchPlan(len(cache.valid), batch_size=4, accum_steps=2, seed=0)
    batches = list(cache.train_batches(plan, seed=0)(0))
    assert len(batches) == plan.steps_per_epoch * 2
    rows = cache.valid
    for (tokens, labels), idx in zip(batches, [i for step in plan.epoch(0) for i in step]):
        assert torch.equal(tokens, cache.tokens[0, rows[idx]].float())
        assert torch.equal(labels, cache.labels[rows[idx]])
    evaluated = torch.cat([y for _, y in cache.eval_batches(3)()])
    assert torch.equal(evaluated, cache.labels[rows])


def test_aggregation_maps_of_a_saved_head(tmp_path):
    from attnflow.probes.heads import build_head
    from attnflow.maps import aggregation_maps
    from attnflow.probes.outputs import load_head, save_head
    from attnflow.probes.specs import parse_head_spec

    model = tiny_model(img_size=32)
    head = build_head(parse_head_spec("abmilp+cls"), 32, 3, True, seed=0)
    save_head(tmp_path / "h.pt", head, meta={"block": -1, "layernorm": False})
    loaded = load_head(tmp_path / "h.pt")
    images = torch.randn(2, 3, 32, 32)
    maps = aggregation_maps(model, loaded, images)
    assert maps.shape == (2, 2, 2)
    tokens = blocks_by_hand(model, images, upto=1)
    logits = tokens @ head.pool.scorer.weight[0].detach() + head.pool.scorer.bias.detach()  # [2, 1 + 4]
    weights = torch.softmax(logits, dim=1)[:, 1:]
    # row-major patch grid; the [cls] share left out and the patches' renormalised to a distribution
    torch.testing.assert_close(maps, (weights / weights.sum(dim=1, keepdim=True)).reshape(2, 2, 2))
    with pytest.raises(AttnflowError, match="width"):
        aggregation_maps(tiny_model(img_size=32, embed_dim=64), loaded, images)


def test_aggregation_maps_of_a_hybrid_vit_lie_on_the_cnn_stems_grid():
    """A ResNet stem with stride 32 then 1-pixel patches: a 64 px image gives a 2x2 token grid, not 64x64."""
    from attnflow.probes.heads import build_head
    from attnflow.maps import aggregation_maps
    from attnflow.probes.specs import parse_head_spec

    model = tiny_model("vit_small_r26_s32_224", img_size=64)
    head = build_head(parse_head_spec("abmilp"), 32, 3, True, seed=0)
    maps = aggregation_maps(model, head, torch.randn(2, 3, 64, 64), block=-1, layernorm=False)
    assert maps.shape == (2, 2, 2)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(2))


def test_cache_of_another_model_with_the_same_name_is_refused(dataset, tmp_path):
    model, ds = dataset
    extract_tokens(TokenEncoder(model, amp="none"), ds, tmp_path / "c", info=INFO, batch_size=4, progress=False)
    other = tiny_model(img_size=32)  # same name and info (e.g. another --checkpoint-key or --model-kw)
    with torch.no_grad():
        other.load_state_dict(model.state_dict())
        other.blocks[1].mlp.fc2.bias.add_(1.0)
    with pytest.raises(AttnflowError, match="differs in encoder"):
        extract_tokens(TokenEncoder(other, amp="none"), ds, tmp_path / "c", info=INFO, batch_size=4,
                       progress=False)
    wider = tiny_model(img_size=32, embed_dim=64)
    with pytest.raises(AttnflowError, match="differs in encoder"):
        extract_tokens(TokenEncoder(wider, amp="none"), ds, tmp_path / "c", info=INFO, batch_size=4,
                       progress=False)
    same = tiny_model(img_size=32)
    same.load_state_dict(model.state_dict())  # another instance with the same weights reuses the cache
    extract_tokens(TokenEncoder(same, amp="none"), ds, tmp_path / "c", info=INFO, batch_size=4, progress=False)


def test_cache_of_several_blocks_writes_one_file_per_block_batch_by_batch_and_resumes(dataset, tmp_path,
                                                                                       monkeypatch):
    import numpy as np

    from attnflow.encode import BlockTokenEncoder

    model, ds = dataset
    enc = BlockTokenEncoder(model, blocks="all", amp="none")
    calls = interrupt_at_call(monkeypatch, BlockTokenEncoder, "__call__", 3)
    with pytest.raises(KeyboardInterrupt):
        extract_tokens(enc, ds, tmp_path / "c", info=INFO, batch_size=2, progress=False)
    readable = [i for i in range(4) if ds.paths[i].name != "broken.jpg"]
    images = torch.stack([ds[i][0] for i in readable])
    for b in (0, 1):  # the two committed batches are on disk already, in their block's file (numpy reads it)
        on_disk = torch.from_numpy(np.load(tmp_path / "c" / f"tokens_b{b}.npy")).view(torch.bfloat16)
        assert on_disk.shape == (1, len(ds), 5, 32)
        with torch.no_grad():
            torch.testing.assert_close(on_disk[0, readable].float(), blocks_by_hand(model, images, b).bfloat16().float())
    assert not (tmp_path / "c" / "tokens.npy").exists()
    cache = extract_tokens(enc, ds, tmp_path / "c", info=INFO, batch_size=2, progress=False)  # resumed
    assert len(calls) == 3 + len(range(0, len(ds), 2)) - 2  # only the missing batches were encoded
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["blocks"] == [0, 1] and manifest["files"] == ["tokens_b0.npy", "tokens_b1.npy"]
    assert cache.blocks == [0, 1] and manifest["shape"] == [1, len(ds), 5, 32]
    rows = cache.valid
    every = torch.stack([ds[i][0] for i in rows.tolist()])
    with torch.no_grad():
        for b in (0, 1):
            torch.testing.assert_close(cache.block_tokens(b)[0, rows].float(),
                                       blocks_by_hand(model, every, b).bfloat16().float())
    with pytest.raises(AttnflowError, match="block_tokens"):
        cache.tokens
    plan = BatchPlan(len(rows), batch_size=4, accum_steps=2, seed=0)
    for (tokens, _), idx in zip(cache.train_batches(plan, seed=0)(0), [i for s in plan.epoch(0) for i in s]):
        assert tokens.shape == (len(idx), 2, 5, 32)  # [m, L, T, D]: block b's rows from its own file
        assert all(torch.equal(tokens[:, b], cache.block_tokens(b)[0, rows[idx]].float()) for b in (0, 1))
    with pytest.raises(AttnflowError, match="differs in block, blocks"):  # a cache of other blocks is not reused
        extract_tokens(BlockTokenEncoder(model, blocks=[0], amp="none"), ds, tmp_path / "c", info=INFO,
                       progress=False)
