"""Per-image maps: planted peaks land where planted, entropies and head choice match brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.image import AxesImage
from PIL import Image

from attnflow.aggregation.sources import AggregationError
from attnflow.maps import MapError, capture_maps, model_maps, patch_maps
from attnflow.metrics import row_entropy
from attnflow.plot import PlotError, draw_map, plot_attention_maps, plot_head_maps, upsample
from attnflow.vit import BlockIndexError, PatchSizeError
from conftest import tiny_model
from planted_maps import GRID, layout, planted_attention
from brute_force import brute_entropy, block_attention_by_hand

def test_planted_cls_peak_and_lowest_entropy_head():
    attn = planted_attention(cls_peak=(3, 1, 4))
    maps = patch_maps(attn, layout())
    assert maps.grid == GRID and maps.cls_heads.shape == (5, 4, 6)
    assert np.unravel_index(maps.cls_heads[3].argmax(), GRID) == (1, 4)
    assert np.unravel_index(maps.cls_min_entropy.argmax(), GRID) == (1, 4)
    # brute force: entropy of each head's [cls] row over the patch keys 3..26, renormalised
    ent = [brute_entropy(attn[h, 0, 3:].tolist()) for h in range(5)]
    np.testing.assert_allclose(maps.cls_entropy, ent, rtol=0, atol=1e-12)
    assert maps.min_entropy_head == min(range(5), key=lambda h: ent[h]) == 3
    # mean over heads of the raw [cls] row, renormalised over patches, laid out row-major
    for r in range(4):
        for c in range(6):
            raw = [attn[h, 0, 3 + r * 6 + c].item() for h in range(5)]
            total = sum(attn[h, 0, 3 + k].item() for h in range(5) for k in range(24))
            assert maps.cls_mean[r, c] == pytest.approx(sum(raw) / total, abs=1e-12)
            assert maps.cls_heads[2, r, c] == pytest.approx(attn[2, 0, 3 + r * 6 + c].item()
                                                             / attn[2, 0, 3:].sum().item(), abs=1e-12)


def test_central_patch_map():
    attn = planted_attention(central_peak=(3, 0))
    maps = patch_maps(attn, layout())
    assert maps.central_patch == (1, 2)  # ((4 - 1) // 2, (6 - 1) // 2): the official ca1's rule
    assert np.unravel_index(maps.central.argmax(), GRID) == (3, 0)
    query = 3 + 1 * 6 + 2
    row = [sum(attn[h, query, 3 + k].item() for h in range(5)) for k in range(24)]
    np.testing.assert_allclose(maps.central.ravel(), np.array(row) / sum(row), atol=1e-12)


def test_model_without_cls_has_only_the_central_map():
    attn = planted_attention(num_prefix=0, central_peak=(0, 5))
    maps = patch_maps(attn, layout(num_prefix=0, has_cls=False))
    assert not maps.has_cls and maps.cls_mean is None and maps.cls_min_entropy is None
    assert maps.get("cls_mean") is None and maps.get("cls_head:0") is None
    assert np.unravel_index(maps.central.argmax(), GRID) == (0, 5)


def test_shape_mismatch_and_unknown_kind_are_clear_errors():
    with pytest.raises(AggregationError, match="does not match the token layout"):
        patch_maps(planted_attention(num_prefix=1), layout(num_prefix=3))
    maps = patch_maps(planted_attention(), layout())
    with pytest.raises(MapError, match="unknown map kind"):
        maps.get("cls_max")
    with pytest.raises(MapError, match="out of range"):
        maps.get("cls_head:5")


def test_entropy_matches_loop_and_handles_zeros():
    p = np.array([[0.0, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    np.testing.assert_allclose(row_entropy(torch.as_tensor(p)), [brute_entropy(p[0]), math.log(4)], atol=1e-15)


def test_upsampled_peak_lies_in_the_planted_patch():
    grid = np.full(GRID, 0.01)
    grid[1, 4] = 1.0
    up = upsample(grid, (64, 96))  # 16 x 16 pixels per patch
    r, c = np.unravel_index(up.argmax(), up.shape)
    assert 16 <= r < 32 and 64 <= c < 80
    assert up[16:32, 64:80].mean() > up.mean() * 3


def test_overlay_draws_upsampled_map_over_the_image(photos):
    image = np.asarray(Image.fromarray(photos["chelsea"]).resize((96, 64)))
    maps = patch_maps(planted_attention(cls_peak=(0, 2, 1)), layout())
    ax = draw_map(image, maps.cls_heads[0], mark=maps.central_patch)
    drawn = [im for im in ax.get_children() if isinstance(im, AxesImage)][-1].get_array()
    assert drawn.shape == (64, 96)
    r, c = np.unravel_index(np.argmax(drawn), drawn.shape)
    assert 32 <= r < 48 and 16 <= c < 32
    assert [t.get_text() for t in ax.texts] == [f"H={maps.cls_entropy[0]:.2f}"]


def test_figure_of_several_models_and_images(photos):
    images = [np.asarray(Image.fromarray(photos[k]).resize((96, 64))) for k in ("chelsea", "coffee")]
    with_cls = [patch_maps(planted_attention(seed=s), layout()) for s in (0, 1)]
    without = [patch_maps(planted_attention(num_prefix=0, seed=s), layout(0, False)) for s in (0, 1)]
    fig = plot_attention_maps(images, {"A": with_cls, "B": without}, labels={"A": "Model A"})
    assert len(fig.axes) == 2 * (1 + 2 * 3)
    first_row = fig.axes[:7]
    assert first_row[0].get_title() == "input"
    no_cls = [ax for ax in fig.axes if any(t.get_text() == "no [cls]" for t in ax.texts)]
    assert len(no_cls) == 2 * 2  # B's two [cls] kinds on both images
    headers = {t.get_text() for t in fig.texts}
    assert {"Model A", "B"} <= headers
    heads = [t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().startswith("head ")]
    assert heads == [f"head {with_cls[i].min_entropy_head + 1}" for i in (0, 1)]
    fig_t = plot_attention_maps(images, {"A": with_cls}, rows="models", overlay=False)
    assert len(fig_t.axes) == (1 + 3) * 2
    with pytest.raises(PlotError, match="1 maps for 2 images"):
        plot_attention_maps(images, {"A": with_cls[:1]})


def test_head_maps_frame_the_lowest_entropy_head(photos):
    maps = patch_maps(planted_attention(cls_peak=(4, 0, 0)), layout())
    fig = plot_head_maps(photos["coffee"], maps, ncols=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["head 1", "head 2", "head 3", "head 4", "head 5 (lowest H)"]
    with pytest.raises(PlotError, match="\\[cls\\]"):
        plot_head_maps(photos["coffee"], patch_maps(planted_attention(num_prefix=0), layout(0, False)))


def test_capture_maps_on_a_tiny_timm_model(photos):
    model = tiny_model("vit_small_patch16_224", img_size=64, reg_tokens=2)  # [cls] + 2 registers
    images = [Image.fromarray(photos[k]) for k in ("chelsea", "astronaut", "coffee")]
    crops, maps = model_maps(model, images, img_size=64, batch_size=2)
    assert len(crops) == len(maps) == 3 and crops[0].shape == (64, 64, 3) and crops[0].dtype == np.uint8
    from attnflow.data.transforms import eval_transform

    x = torch.stack([eval_transform(model, 64, crop_pct=0.875)(img) for img in images])
    ref = block_attention_by_hand(model, x)
    for i in range(3):
        expect = patch_maps(ref[i], layout(num_prefix=3, grid=(4, 4)))
        assert maps[i].grid == (4, 4)
        np.testing.assert_allclose(maps[i].cls_mean, expect.cls_mean, atol=1e-5)
        np.testing.assert_allclose(maps[i].central, expect.central, atol=1e-5)
        assert maps[i].min_entropy_head == expect.min_entropy_head
    first = capture_maps(model, x, block=0)
    assert len(first) == 3 and not np.allclose(first[0].cls_mean, maps[0].cls_mean)


def test_block_out_of_range_is_a_clear_error_not_another_block(photos):
    """A model with 2 blocks: blocks 0, 1, -1, -2 exist; 2 and -3 do not (and must not wrap to 0 or 1)."""
    model = tiny_model("vit_small_patch16_224", img_size=64)
    from attnflow.data.transforms import eval_transform

    x = eval_transform(model, 64, crop_pct=0.875)(Image.fromarray(photos["coffee"]))[None]
    last = capture_maps(model, x)[0]
    np.testing.assert_allclose(capture_maps(model, x, block=-1)[0].cls_mean, last.cls_mean)
    np.testing.assert_allclose(capture_maps(model, x, block=1)[0].cls_mean, last.cls_mean)
    np.testing.assert_allclose(capture_maps(model, x, block=-2)[0].cls_mean, capture_maps(model, x, block=0)[0].cls_mean)
    for block in (2, 5, -3):
        with pytest.raises(BlockIndexError, match=f"block {block} .*2 blocks"):
            capture_maps(model, x, block=block)


def test_input_that_does_not_split_into_patches_is_a_clear_error(photos):
    """At 72 px a /16 model sees a 4x4 grid covering 64 px: the maps would not align with the 72 px crop."""
    model = tiny_model("vit_small_patch16_224", img_size=72)
    with pytest.raises(PatchSizeError, match="multiple of 16"):
        model_maps(model, [Image.fromarray(photos["coffee"])], img_size=72)


def _drawn_text_boxes(fig):
    """``(text, window bbox)`` of every non-empty text the figure draws (titles, headers, corner notes)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = {t for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in axis.get_major_ticks() + axis.get_minor_ticks() for t in (tick.label1, tick.label2)}
    return [(t.get_text(), t.get_window_extent(renderer)) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t not in ticks]


@pytest.mark.parametrize("rows", ["images", "models"])
def test_headers_of_a_paper_width_figure_do_not_overlap(rows):
    """Five models x three map kinds at two-column width (16 narrow columns): no two texts may overlap, and
    the figure with every text stays two columns wide."""
    from attnflow.plot import DOUBLE_COLUMN

    images = [np.full((64, 96, 3), 120, np.uint8)] * 2
    maps = {name: [patch_maps(planted_attention(seed=s), layout()) for s in (0, 1)]
            for name in ("mae", "dino", "ijepa", "dinov2", "mocov3")}
    labels = {"mae": "MAE ViT-B/16 (random)", "dino": "DINO ViT-B/16 (random)", "ijepa": "I-JEPA ViT-H/14 (random)",
              "dinov2": "DINOv2+reg4 ViT-S/14 (random)", "mocov3": "MoCo-v3 ViT-B/16 (random)"}
    title = "RANDOM-INIT WEIGHTS - numbers are meaningless (mae-vit-b16, dino-vit-b16, ijepa-vit-h14, dinov2-reg4-vit-s14)"
    fig = plot_attention_maps(images, maps, labels=labels, rows=rows, title=title)
    assert fig.get_figwidth() <= DOUBLE_COLUMN + 1e-9
    boxes = _drawn_text_boxes(fig)
    assert {"input", "MoCo-v3 ViT-B/16 (random)"} <= {t for t, _ in boxes}
    left = min([fig.bbox.x0] + [box.x0 for _, box in boxes])
    right = max([fig.bbox.x1] + [box.x1 for _, box in boxes])
    assert (right - left) / fig.dpi <= DOUBLE_COLUMN + 0.02  # what a tight bounding box saves
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            assert not box_a.overlaps(box_b), (a, b)
