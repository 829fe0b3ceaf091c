"""Hugging Face transformers vision models, unmodified: the tap and the statistics against the maps the models
return themselves (``output_attentions=True`` with eager attention), the prefix tokens, ViT-MAE without masking,
the ``hf:`` names from the cache offline, and the one-line errors. Tiny models built from config objects."""

import json
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnflow  # noqa: E402
from attnflow.data.transforms import eval_transform, normalization  # noqa: E402
from attnflow.encode import TokenEncoder  # noqa: E402
from attnflow.models.adapter import MissingExtraError, adapt_model  # noqa: E402
from attnflow.models.load import WeightsUnavailableError, cached_weights_path, load_model  # noqa: E402
from attnflow.tap import AttentionTap  # noqa: E402
from brute_force import brute_force_metrics  # noqa: E402

T = transformers
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
            patch_size=8)

FAMILIES = {  # name: (model class, config class, extra config, prefix tokens, has [cls])
    "vit": ("ViTModel", "ViTConfig", {}, 1, True),
    "vit_mae": ("ViTMAEModel", "ViTMAEConfig", {}, 1, True),  # mask_ratio 0.75 by default
    "dinov2": ("Dinov2Model", "Dinov2Config", {}, 1, True),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 4}, 5, True),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", {}, 1, True),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", {}, 0, False),
    "beit": ("BeitModel", "BeitConfig", {"use_relative_position_bias": True}, 1, True),
}


def _build(family: str, attn: str = "sdpa", **overrides):
    model_cls, config_cls, extra, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(T, config_cls)(**{**TINY, **extra, **overrides}, attn_implementation=attn)
    return getattr(T, model_cls)(config).eval()


def _library_maps(family: str, model, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """The model's own maps: an eager twin with the same weights, ``output_attentions=True`` (ViT-MAE unmasked:
    mask_ratio 0 and the noise whose argsort is the identity)."""
    twin = _build(family, "eager", **({"mask_ratio": 0.0} if family == "vit_mae" else {}))
    twin.load_state_dict(model.state_dict())
    if family == "vit_mae":
        n = (x.shape[-2] // 8) * (x.shape[-1] // 8)
        kwargs["noise"] = torch.arange(n, dtype=torch.float32).expand(x.shape[0], n)
    with torch.no_grad():
        return list(twin(x, output_attentions=True, **kwargs).attentions)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


def test_tap_equals_output_attentions_under_sdpa(family):
    model = _build(family)  # SDPA, as transformers loads it by default
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference = _library_maps(family, model, x)
    with torch.no_grad():
        before = model(x).last_hidden_state if family != "vit_mae" else None
        with AttentionTap(model) as tap:
            assert model.config._attn_implementation == "eager"
            out = model(x)
    assert model.config._attn_implementation == "sdpa", "the attention implementation must be restored"
    _, _, _, n_prefix, has_cls = FAMILIES[family]
    assert tap.layout.num_prefix == n_prefix and tap.layout.has_cls == has_cls and tap.layout.grid == (4, 4)
    assert len(tap.maps) == 2
    for got, ref in zip(tap.maps, reference):
        assert got.shape == (2, 4, n_prefix + 16, n_prefix + 16)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    if family == "vit_mae":
        assert model.config.mask_ratio == 0.75, "the mask ratio must be restored"
        assert out.last_hidden_state.shape[1] == 17  # every patch, in order (checked by the maps above)
    else:
        torch.testing.assert_close(out.last_hidden_state, before, atol=1e-5, rtol=1e-5)


def test_attention_stats_equal_metrics_of_library_maps(family):
    model = _build(family)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = attnflow.attention_stats(model, x, device="cpu", progress=False, batch_size=2, compile=False)
    _, _, _, n_prefix, has_cls = FAMILIES[family]
    reference = [brute_force_metrics(m, n_prefix, has_cls, (4, 4), (8, 8)).mean(0)
                 for m in _library_maps(family, model, x)]  # per block: [H, M] means over images
    frame = result.frame
    got = np.stack([frame[frame.block == b].pivot(index="head", columns="metric", values="mean")
                    [list(attnflow.metrics.METRICS)].to_numpy() for b in range(2)])
    want = torch.stack(reference).numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want))  # SigLIP: no [cls] metrics, missing (not zero)
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-5, rtol=0)
    assert result.meta["num_prefix_tokens"] == n_prefix and result.meta["has_cls"] == has_cls


def test_other_resolution_interpolates_like_the_model():
    model = adapt_model(_build("vit"))  # built at 32 px, run at 48 px
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad(), AttentionTap(model) as tap:
        model(x)
    reference = _library_maps("vit", model.wrapped, x, interpolate_pos_encoding=True)
    assert tap.layout.grid == (6, 6)
    for got, ref in zip(tap.maps, reference):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_token_encoder_reads_the_block_output_without_registers():
    model = _build("dinov2_reg")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    for block in (0, -1):
        tokens = TokenEncoder(model, block=block)(x)
        want = hidden[block + 1 if block >= 0 else block]
        torch.testing.assert_close(tokens, torch.cat([want[:, :1], want[:, 5:]], 1))
    normed = TokenEncoder(model, layernorm=True)(x)
    with torch.no_grad():
        last = model(x).last_hidden_state
    torch.testing.assert_close(normed, torch.cat([last[:, :1], last[:, 5:]], 1))


def test_normalisation_of_each_family():
    assert normalization(_build("clip"))[0] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert normalization(_build("siglip")) == ((0.5,) * 3, (0.5,) * 3)
    assert normalization(_build("dinov2"))[1] == pytest.approx((0.229, 0.224, 0.225))
    assert eval_transform(_build("siglip"), img_size=32).transforms[-1].mean.tolist() == [0.5] * 3


def test_two_tower_and_classifier_models_expose_the_vision_tower():
    clip = T.CLIPModel(T.CLIPConfig(text_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                 "num_attention_heads": 4, "intermediate_size": 64},
                                    vision_config={**TINY}, projection_dim=16)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), AttentionTap(clip) as tap:
        clip.get_image_features(pixel_values=x)
    assert tap.layout.num_prefix == 1 and len(tap.maps) == 2
    classifier = T.ViTForImageClassification(T.ViTConfig(**TINY, num_labels=3)).eval()
    with torch.no_grad(), AttentionTap(classifier) as tap:
        classifier(x)
    assert tap.maps[0].shape == (1, 4, 17, 17)


# ------------------------------------------------------------------------------------------------ names

TINY_KW = dict(model_type="dinov2", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, patch_size=8)


def test_random_init_from_a_config_in_model_kw(offline):
    model = load_model("hf:facebook/dinov2-small", random_init=True, img_size=32, **TINY_KW)
    record = attnflow.models.record.model_record(model)
    assert record.arch == "hf:facebook/dinov2-small" and record.random_init and record.has_cls
    again = load_model("hf:facebook/dinov2-small", random_init=True, img_size=32, **TINY_KW)
    other = load_model("hf:facebook/dinov2-small", random_init=True, img_size=32, seed_name="other", **TINY_KW)
    first = next(iter(model.state_dict().values()))
    assert torch.equal(first, next(iter(again.state_dict().values())))
    assert not torch.equal(model.state_dict()["wrapped.embeddings.cls_token"],
                           other.state_dict()["wrapped.embeddings.cls_token"])
    result = attnflow.attention_stats(model, torch.randn(2, 3, 32, 32), device="cpu", progress=False)
    assert set(result.frame.model) == {"hf:facebook/dinov2-small"}


def _fill_cache(root, repo: str, folder) -> None:
    """The Hugging Face cache layout (``models--org--name/snapshots/<rev>/...`` and ``refs/main``) of ``repo``."""
    base = root / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        shutil.copy(path, snapshot / path.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0123abc")


def test_hf_name_from_the_cache_offline(offline, tmp_path):
    source = _build("clip")
    folder = tmp_path / "saved"
    source.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "resample": 2, "do_center_crop": True,
         "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}))
    repo = "someone/tiny-clip"
    with pytest.raises(WeightsUnavailableError, match=f"hf:{repo}.*not in the Hugging Face cache .*offline"):
        load_model(f"hf:{repo}", img_size=32)
    _fill_cache(offline, repo, folder)
    assert cached_weights_path(f"hf:{repo}").name == "model.safetensors"
    model = load_model(f"hf:{repo}", img_size=32)
    torch.testing.assert_close(model.wrapped.state_dict(), source.state_dict())
    assert model.pretrained_cfg["mean"] == (0.1, 0.2, 0.3) and model.pretrained_cfg["crop_pct"] == 0.8
    assert model.pretrained_cfg["interpolation"] == "bilinear"
    record = attnflow.models.record.model_record(model)
    assert record.source == f"hf-hub:{repo}" and record.sha256 and not record.random_init
    random = load_model(f"hf:{repo}", random_init=True, img_size=48)  # the cached config.json, at 48 px
    assert random.tower.config.image_size == 48 and random.tower.config.hidden_size == 32
    assert attnflow.models.record.model_record(random).source == "random-init"
    folder_model = load_model("hf:any/name", checkpoint=folder, img_size=32)
    torch.testing.assert_close(folder_model.wrapped.state_dict(), source.state_dict())


def test_random_init_without_a_config_says_what_to_do(offline):
    with pytest.raises(WeightsUnavailableError, match="config.json .*model_type"):
        load_model("hf:facebook/dinov2-small", random_init=True)
    with pytest.raises(attnflow.errors.AttnflowError, match="multiple of the patch size 8"):
        load_model("hf:x/y", random_init=True, img_size=36, **TINY_KW)


def test_without_transformers_one_line_says_what_to_install(monkeypatch, offline, photo_folder, capsys):
    import importlib.util

    from attnflow.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else
                        real(name, *a))
    with pytest.raises(MissingExtraError, match=r"pip install attnflow\[hf\]$"):
        load_model("hf:facebook/dinov2-small")
    code = main(["stats", "--model", "hf:facebook/dinov2-small", "--data", str(photo_folder),
                 "--out", str(offline / "t.csv"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].endswith("pip install attnflow[hf]")


def test_stats_command_with_an_hf_name(offline, photo_folder, capsys):
    from attnflow.cli import main

    out = offline / "hf.csv"
    kw = [arg for k, v in TINY_KW.items() for arg in ("--model-kw", f"{k}={v}")]
    code = main(["stats", "--model", "hf:facebook/dinov2-small", "--random-init", *kw,
                 "--data", str(photo_folder), "--out", str(out), "--img-size", "32", "--limit", "2",
                 "--device", "cpu", "--no-progress", "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    import pandas as pd

    frame = pd.read_csv(out)
    assert set(frame.model) == {"hf:facebook/dinov2-small"} and frame["count"].max() == 2


def test_weights_with_nan_are_refused_naming_the_tensor(tmp_path):
    """As for timm checkpoints: a saved model with a NaN weight would give all-NaN statistics with exit code 0."""
    from attnflow.models.converters import CheckpointError

    source = _build("clip")
    with torch.no_grad():
        next(p for n, p in source.named_parameters() if n.endswith("fc1.weight")).view(-1)[:3] = float("nan")
    source.save_pretrained(tmp_path / "saved")
    with pytest.raises(CheckpointError, match=r"saved: tensor .*fc1\.weight .* holds 3 NaN or infinite value"):
        load_model("hf:any/name", checkpoint=tmp_path / "saved", img_size=32)
