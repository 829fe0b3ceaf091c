"""The Python API with the inputs a notebook user passes: tensors, iterables, Datasets, dtypes, layouts, modes.

References are written out by hand: the [cls] self-attention ``a[cls, cls]`` of every block and head is
recomputed from each block's own ``qkv`` projection (``softmax(q k^T * scale)``), without the tap.
"""

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

import attnflow
from attnflow.data.transforms import eval_transform
from attnflow.errors import AttnflowError
from attnflow.result import COLUMNS, Result
from conftest import tiny_model


def _cls_self_by_hand(model, images: torch.Tensor) -> np.ndarray:
    """``[blocks, heads]`` mean over images of ``softmax(q k^T * scale)[cls, cls]``, from each block's input."""
    inputs = []
    handles = [blk.attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for blk in model.blocks]
    try:
        with torch.no_grad():
            model.eval()(images.float())
    finally:
        for h in handles:
            h.remove()
    out = []
    for blk, x in zip(model.blocks, inputs):
        attn = blk.attn
        B, N, C = x.shape
        H = attn.num_heads
        q, k, _ = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        a = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, N, N]
        out.append([float(np.mean([a[b, h, 0, 0].item() for b in range(B)])) for h in range(H)])
    return np.array(out)


def _cls_self(result: Result) -> np.ndarray:
    f = result.frame[result.frame["metric"] == "cls_self"].sort_values(["block", "head"])
    return f["mean"].to_numpy().reshape(f["block"].nunique(), -1)


@pytest.fixture(scope="module")
def model():
    return tiny_model(img_size=64)


@pytest.fixture(scope="module")
def images(model, photos) -> torch.Tensor:
    transform = eval_transform(model, 64)
    return torch.stack([transform(Image.fromarray(p)) for _, p in sorted(photos.items())])  # [n, 3, 64, 64]


def _stats(model, data, **kw) -> Result:
    return attnflow.attention_stats(model, data, progress=False, workers=0, **kw)


def test_a_tensor_is_a_batch_of_images_and_a_single_image_is_one_image(model, images):
    res = _stats(model, images, batch_size=3)
    assert res.meta["images_used"] == len(images)
    np.testing.assert_allclose(_cls_self(res), _cls_self_by_hand(model, images), rtol=1e-5)
    one = _stats(model, images[2])  # [3, H, W]
    assert one.meta["images_used"] == 1
    np.testing.assert_allclose(_cls_self(one), _cls_self_by_hand(model, images[2:3]), rtol=1e-5)


def test_limit_takes_evenly_spaced_items_of_a_dataset_and_the_first_images_of_an_iterable(model, images):
    n = len(images)
    dataset = TensorDataset(images, torch.arange(n))
    res = _stats(model, dataset, limit=3, batch_size=2)
    assert res.meta["images_used"] == 3
    spread = [0, (n - 1) // 2 if (n - 1) % 2 == 0 else round((n - 1) / 2), n - 1]  # linspace(0, n-1, 3)
    np.testing.assert_allclose(_cls_self(res), _cls_self_by_hand(model, images[spread]), rtol=1e-5)
    first = _stats(model, [images[:2], images[2:5], images[5:]], limit=3)
    assert first.meta["images_used"] == 3
    np.testing.assert_allclose(_cls_self(first), _cls_self_by_hand(model, images[:3]), rtol=1e-5)


def test_uint8_images_are_one_line_error_naming_the_transform(model, images):
    raw = (images * 40 + 128).clamp(0, 255).to(torch.uint8)
    with pytest.raises(AttnflowError, match="uint8") as err:
        _stats(model, [raw])
    assert "\n" not in str(err.value) and "eval_transform" in str(err.value)


def test_float64_and_half_images_give_the_float32_numbers(model, images):
    expected = _cls_self_by_hand(model, images)
    np.testing.assert_allclose(_cls_self(_stats(model, [images.double()])), expected, rtol=1e-5)
    np.testing.assert_allclose(_cls_self(_stats(model, [images.half()])), _cls_self_by_hand(model, images.half()),
                               rtol=1e-5)


def test_channels_last_memory_format_works_but_channels_last_layout_is_an_error(model, images):
    cl = images.contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(_cls_self(_stats(model, [cl])), _cls_self_by_hand(model, images), rtol=1e-5)
    with pytest.raises(AttnflowError, match=r"\[B, 3, H, W\].*permute"):
        _stats(model, [images.permute(0, 2, 3, 1).contiguous()])
    with pytest.raises(AttnflowError, match="3 channels"):
        _stats(model, [images[:, :1]])


def test_unnormalised_images_warn_once(model, images, caplog):
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    raw = images * std[:, None, None] + mean[:, None, None]
    with caplog.at_level(logging.WARNING, logger="attnflow"):
        _stats(model, [raw[:3], raw[3:]])  # ToTensor() without Normalize: values in [0, 1]
    warnings = [r.getMessage() for r in caplog.records if "normalis" in r.getMessage()]
    assert len(warnings) == 1 and "eval_transform" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="attnflow"):
        _stats(model, [images])
    assert not [r for r in caplog.records if "normalis" in r.getMessage()]


def test_a_model_in_train_mode_is_measured_in_eval_mode_and_given_back_in_train_mode(images):
    model = tiny_model(img_size=64, drop_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5).train()
    expected = _cls_self_by_hand(model, images)
    model.train()
    res = _stats(model, [images])
    np.testing.assert_allclose(_cls_self(res), expected, rtol=1e-5)
    assert model.training and all(m.training for m in model.modules())


def test_tap_without_a_forward_says_so(model):
    with attnflow.AttentionTap(model) as tap:
        pass
    with pytest.raises(AttnflowError, match="no forward"):
        tap.maps


def test_tap_block_out_of_range_is_an_attnflow_error(model):
    with pytest.raises(AttnflowError, match="out of range"):
        attnflow.AttentionTap(model, blocks=[0, 5])


def _result(model: str, blocks: int, metrics: list[str]) -> Result:
    rows = [(model, b, h, m, float(10 * b + h), 0.1, 5) for b in range(blocks) for h in range(2) for m in metrics]
    return Result(pd.DataFrame(rows, columns=COLUMNS), {"model": model})


def test_per_block_of_an_unknown_metric_names_close_ones():
    res = Result.concat([_result("a", 2, ["cls_self", "patch_self"]), _result("b", 3, ["patch_self"])])
    with pytest.raises(AttnflowError, match="cls_slef.*cls_self"):
        res.per_block("cls_slef")
    # runs with different blocks and metrics: each model keeps its own blocks, a missing metric has no rows
    per = res.per_block("patch_self")
    assert per[per.model == "a"]["value"].tolist() == [0.5, 10.5]
    assert per[per.model == "b"]["value"].tolist() == [0.5, 10.5, 20.5]
    assert res.per_block("cls_self")["model"].tolist() == ["a", "a"]


def test_concat_refuses_the_same_model_twice():
    with pytest.raises(AttnflowError, match="'a'.*model_name"):
        Result.concat([_result("a", 2, ["cls_self"]), _result("a", 2, ["cls_self"])])


def test_aggregation_maps_of_one_image_and_load_head_of_a_foreign_file(model, images, tmp_path):
    from attnflow.maps import aggregation_maps
    from attnflow.probes import load_head, save_head
    from attnflow.probes.heads import ProbeHead
    from attnflow.probes.specs import parse_head_spec

    torch.manual_seed(0)
    head = ProbeHead(parse_head_spec("abmilp"), 32, 3, True)
    head = load_head(save_head(tmp_path / "abmilp.pt", head, {"block": -1, "layernorm": False}))
    batch = aggregation_maps(model, head, images[:2])  # [2, 4, 4]
    single = aggregation_maps(model, head, images[1])  # [3, H, W] -> [4, 4]
    assert batch.shape == (2, 4, 4) and single.shape == (4, 4)
    torch.testing.assert_close(single, batch[1], rtol=1e-5, atol=1e-7)
    (tmp_path / "notes.pt").write_text("not a head")
    with pytest.raises(AttnflowError, match="not a saved attnflow probe head"):
        load_head(tmp_path / "notes.pt")


def test_limit_with_a_distributed_sampler_loader_is_refused():
    """Each process would cut its own shard (and batches would be sharded twice): one clear line instead."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    data = TensorDataset(torch.randn(6, 3, 32, 32), torch.zeros(6, dtype=torch.long))
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.raises(AttnflowError, match="DistributedSampler"):
        attnflow.attention_stats(tiny_model(img_size=32), loader, limit=2, progress=False, device="cpu")
