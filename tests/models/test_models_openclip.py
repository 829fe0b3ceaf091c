"""open_clip visual towers, unmodified: the tap and the statistics against maps computed by hand from each
block's own q/k weights, the [cls] token, ``open_clip:`` names from the cache offline and the one-line errors.
Tiny towers built from config values."""

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import attnflow  # noqa: E402
from attnflow.data.transforms import normalization  # noqa: E402
from attnflow.encode import TokenEncoder  # noqa: E402
from attnflow.models.adapter import MissingExtraError  # noqa: E402
from attnflow.models.load import WeightsUnavailableError, cached_weights_path, load_model  # noqa: E402
from attnflow.models.registry import UnknownModelError  # noqa: E402
from attnflow.tap import AttentionTap  # noqa: E402
from brute_force import brute_force_metrics  # noqa: E402

VISION = dict(layers=2, width=32, head_width=8, patch_size=8, mlp_ratio=2.0)
TEXT = dict(layers=1, width=32, heads=4, context_length=8, vocab_size=64)


def _tower():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0,
                             output_dim=16).eval()


def _hand_maps(visual, x: torch.Tensor) -> list[torch.Tensor]:
    """``softmax(q k^T / sqrt(d))`` per block and head, in float64, from the block's ``in_proj`` weights applied
    to the block's normalised input (read with a hook on ``ln_1``)."""
    inputs = []
    handles = [b.ln_1.register_forward_hook(lambda m, a, out: inputs.append(out)) for b in visual.transformer.resblocks]
    with torch.no_grad():
        visual(x)
    for h in handles:
        h.remove()
    maps = []
    for block, tokens in zip(visual.transformer.resblocks, inputs):
        attn = block.attn
        d, heads = attn.embed_dim, attn.num_heads
        w, b = attn.in_proj_weight.detach().double(), attn.in_proj_bias.detach().double()
        q = (tokens.double() @ w[:d].T + b[:d]).unflatten(-1, (heads, -1)).transpose(1, 2)
        k = (tokens.double() @ w[d:2 * d].T + b[d:2 * d]).unflatten(-1, (heads, -1)).transpose(1, 2)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1))
    return maps


def test_tap_equals_hand_maps_and_leaves_the_output():
    visual = _tower()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = _hand_maps(visual, x)
    with torch.no_grad():
        before = visual(x)
    with torch.inference_mode(), AttentionTap(visual) as tap:
        out = visual(x)
    assert tap.layout.num_prefix == 1 and tap.layout.has_cls and tap.layout.grid == (4, 4)
    for got, ref in zip(tap.maps, reference):
        assert got.shape == (2, 4, 17, 17)
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, before, atol=1e-5, rtol=1e-5)
    assert not visual.transformer.resblocks[0].attn._forward_pre_hooks, "hooks must be removed"


def test_attention_stats_equal_metrics_of_hand_maps():
    visual = _tower()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = attnflow.attention_stats(visual, x, device="cpu", progress=False, batch_size=2, compile=False)
    want = torch.stack([brute_force_metrics(m, 1, True, (4, 4), (8, 8)).mean(0) for m in _hand_maps(visual, x)])
    frame = result.frame
    got = np.stack([frame[frame.block == b].pivot(index="head", columns="metric", values="mean")
                    [list(attnflow.metrics.METRICS)].to_numpy() for b in range(2)])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


def test_whole_clip_model_token_encoder_and_normalisation(offline):
    model = load_model("open_clip:ViT-B-16", random_init=True, img_size=32,
                       vision_cfg=VISION, text_cfg=TEXT, embed_dim=16)
    assert type(model).__name__ == "OpenCLIPVisionAdapter" and model.pretrained_cfg["input_size"] == (3, 32, 32)
    assert normalization(model)[0] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    x = torch.randn(2, 3, 32, 32)
    tokens = []
    handle = model.tower.transformer.resblocks[0].register_forward_hook(lambda m, a, out: tokens.append(out))
    encoded = TokenEncoder(model, block=0)(x)
    handle.remove()
    torch.testing.assert_close(encoded, tokens[0])  # [cls] + patches of block 0
    record = attnflow.models.record.model_record(model)
    assert record.arch == "open_clip:ViT-B-16" and record.random_init and record.has_cls
    result = attnflow.attention_stats(model, x, device="cpu", progress=False)
    assert set(result.frame.model) == {"open_clip:ViT-B-16"}


def test_tap_on_the_whole_model_called_through_encode_image():
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=32, vision_cfg=VISION | {
        "image_size": 32}, text_cfg=TEXT, embed_dim=16).eval()
    x = torch.randn(1, 3, 32, 32)
    reference = _hand_maps(clip.visual, x)
    with torch.no_grad(), AttentionTap(clip) as tap:
        clip.encode_image(x)
    for got, ref in zip(tap.maps, reference):
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)


def test_open_clip_name_from_the_cache_offline(offline):
    name = "open_clip:ViT-B-16/laion2b_s34b_b88k"
    with pytest.raises(WeightsUnavailableError,
                       match="not cached and offline mode .*hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K .*"
                             "Hugging Face cache"):
        load_model(name, img_size=32, vision_cfg=VISION, text_cfg=TEXT, embed_dim=16)
    source = load_model("open_clip:ViT-B-16", random_init=True, img_size=32, vision_cfg=VISION, text_cfg=TEXT,
                        embed_dim=16, seed_name="source")
    whole = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=32, vision_cfg=VISION | {
        "image_size": 32}, text_cfg=TEXT, embed_dim=16)
    whole.visual.load_state_dict(source.tower.state_dict())
    snapshot = offline / "hf" / "hub" / "models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K" / "snapshots" / "r1"
    snapshot.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, snapshot / "open_clip_model.safetensors")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("r1")
    assert cached_weights_path(name).name == "open_clip_model.safetensors"
    model = load_model(name, img_size=32, vision_cfg=VISION, text_cfg=TEXT, embed_dim=16)
    torch.testing.assert_close(model.tower.state_dict(), source.tower.state_dict())
    record = attnflow.models.record.model_record(model)
    assert record.source.startswith("hf-hub:laion/") and record.sha256 and not record.random_init


def test_unknown_names_and_missing_library(monkeypatch):
    with pytest.raises(UnknownModelError, match="no architecture 'ViT-B-61'.*ViT-B-16"):
        load_model("open_clip:ViT-B-61/openai")
    with pytest.raises(UnknownModelError, match="no pretrained tag 'nope' for ViT-B-16 .*laion2b_s34b_b88k"):
        load_model("open_clip:ViT-B-16/nope")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "open_clip" else real(n, *a))
    with pytest.raises(MissingExtraError, match=r"needs the open_clip library.*pip install attnflow\[open_clip\]$"):
        load_model("open_clip:ViT-B-16/laion2b_s34b_b88k")


def test_tower_on_a_timm_trunk_is_measured_as_that_timm_model():
    from open_clip.timm_model import TimmModel

    from attnflow.models.adapter import adapt_model
    from attnflow.vit import model_num_prefix

    tower = TimmModel("test_vit", embed_dim=16, pool="", proj="none")
    assert adapt_model(tower) is tower.trunk and model_num_prefix(tower) == 1


def test_maps_command_with_an_open_clip_name(offline, photo_folder, capsys):
    from attnflow.cli import main

    out = offline / "maps.png"
    kw = ["--model-kw", f"vision_cfg={VISION}", "--model-kw", f"text_cfg={TEXT}", "--model-kw", "embed_dim=16"]
    code = main(["maps", "--model", "open_clip:ViT-B-16", "--random-init", *kw, "--images", str(photo_folder),
                 "--limit", "1", "--img-size", "32", "--out", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def test_weights_with_nan_are_refused_naming_the_tensor(tmp_path):
    """As for timm checkpoints: a checkpoint with an infinite weight would give NaN statistics with exit code 0."""
    from attnflow.models.converters import CheckpointError

    whole = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=32, vision_cfg=VISION | {
        "image_size": 32}, text_cfg=TEXT, embed_dim=16)
    state = whole.state_dict()
    state["visual.transformer.resblocks.0.mlp.c_fc.weight"].view(-1)[:2] = float("inf")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: tensor .*resblocks\.0\.mlp\.c_fc\.weight .* holds 2 NaN or "):
        load_model("open_clip:ViT-B-16", checkpoint=tmp_path / "bad.pt", img_size=32, vision_cfg=VISION,
                   text_cfg=TEXT, embed_dim=16)
