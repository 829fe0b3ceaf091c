"""load_model: errors, caches, offline behaviour, resolution changes and architecture facts of the presets.

No test touches the network: the ``offline`` fixture points every cache at a temporary folder, sets
``HF_HUB_OFFLINE=1`` and makes any socket connection fail the test.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnflow.cli import main as cli_main

if TYPE_CHECKING:
    import numpy
from attnflow.errors import AttnflowError
from attnflow.models.converters import CheckpointError
from attnflow.models.load import WeightsUnavailableError, load_model, sha256_file, weights_cached
from attnflow.models.registry import UnknownModelError, get_spec, list_specs

from conftest import TINY


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def mae_file(path: Path, img_size: int = 64, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """Write a tiny MAE-format file ``{'model': sd}``; return ``sd``."""
    sd = random_state(load_model("mae-vit-b16", random_init=True, img_size=img_size, **{**TINY, **kw}), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sd}, path)
    return sd


# --------------------------------------------------------------------------------------- bad checkpoints

def test_wrong_keys_name_the_missing_and_unexpected_keys_and_the_preset(tmp_path):
    sd = mae_file(tmp_path / "good.pth")
    sd["blocks.1.attn.qkv_weight"] = sd.pop("blocks.1.attn.qkv.weight")
    sd["decoder_pred.weight"] = torch.zeros(3, 3)  # MAE's converter drops decoder_*: not reported
    sd["fancy_extra.bias"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model("mae-vit-b16", checkpoint=tmp_path / "bad.pth", img_size=64, **TINY)
    msg = str(err.value)
    assert "1 missing key(s): blocks.1.attn.qkv.weight" in msg
    assert "2 unexpected key(s): blocks.1.attn.qkv_weight, fancy_extra.bias" in msg
    assert "mae-vit-b16" in msg and "'mae'" in msg and "bad.pth" in msg


def test_many_missing_keys_show_the_first_few_and_the_count(tmp_path):
    mae_file(tmp_path / "d2.pth")  # depth 2 into a depth-3 model: block 2 is missing
    model3 = load_model("mae-vit-b16", random_init=True, img_size=64, **{**TINY, "depth": 3})
    expected_missing = [k for k in model3.state_dict() if k.startswith("blocks.2.")]
    with pytest.raises(CheckpointError) as err:
        load_model("mae-vit-b16", checkpoint=tmp_path / "d2.pth", img_size=64, **{**TINY, "depth": 3})
    msg = str(err.value)
    assert f"{len(expected_missing)} missing key(s): " in msg
    assert f"({len(expected_missing)} in all)" in msg and expected_missing[0] in msg
    assert "unexpected" not in msg


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    mae_file(tmp_path / "wide.pth", embed_dim=48)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*cls_token \(1, 1, 48\) vs model \(1, 1, 32\)"):
        load_model("mae-vit-b16", checkpoint=tmp_path / "wide.pth", img_size=64, **TINY)


def test_a_file_of_another_format_says_what_was_expected(tmp_path):
    torch.save({"epoch": 3, "state_dict": {"module.base_encoder.cls_token": torch.zeros(1, 1, 32)}},
               tmp_path / "moco.pth.tar")
    with pytest.raises(CheckpointError, match=r"I-JEPA checkpoint .*top-level keys: epoch, state_dict"):
        load_model("ijepa-vit-h14", checkpoint=tmp_path / "moco.pth.tar", img_size=56, **TINY)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model("dino-vit-s16", checkpoint=tmp_path / "notes.pth", img_size=64, **TINY)
    with pytest.raises(CheckpointError, match="not found"):
        load_model("dino-vit-s16", checkpoint=tmp_path / "nope.pth", img_size=64, **TINY)


def test_file_format_is_read_from_the_content_not_the_suffix(tmp_path):
    """safetensors (8-byte little-endian header length, then a JSON object), a torch zip (``PK``) and a legacy
    pickle (``\\x80``) each load whatever their file name says."""
    from safetensors.torch import save_file

    sd = random_state(load_model("dino-vit-s16", random_init=True, img_size=64, **TINY), seed=5)
    save_file(sd, str(tmp_path / "dino.pth"))                      # safetensors behind a torch suffix
    torch.save(sd, tmp_path / "dino.safetensors")                  # torch zip behind a safetensors suffix
    torch.save(sd, tmp_path / "dino_legacy", _use_new_zipfile_serialization=False)  # no suffix at all
    assert (tmp_path / "dino.pth").read_bytes()[8:9] == b"{"
    assert (tmp_path / "dino.safetensors").read_bytes()[:2] == b"PK"
    assert (tmp_path / "dino_legacy").read_bytes()[:1] == b"\x80"
    for name in ("dino.pth", "dino.safetensors", "dino_legacy"):
        model = load_model("dino-vit-s16", checkpoint=tmp_path / name, img_size=64, **TINY)
        for key, value in sd.items():
            assert torch.equal(model.state_dict()[key], value), (name, key)


def test_a_truncated_safetensors_file_is_named_as_such(tmp_path):
    from safetensors.torch import save_file

    save_file({"cls_token": torch.zeros(1, 1, 32)}, str(tmp_path / "weights.bin"))
    data = (tmp_path / "weights.bin").read_bytes()
    (tmp_path / "weights.bin").write_bytes(data[:-16])  # tensor bytes cut off, header intact
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*weights\.bin"):
        load_model("dino-vit-s16", checkpoint=tmp_path / "weights.bin", img_size=64, **TINY)


def test_a_web_page_saved_as_the_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "simmim.pth").write_text("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning")
    with pytest.raises(CheckpointError) as err:
        load_model("simmim-vit-b16", checkpoint=tmp_path / "simmim.pth", img_size=64, **TINY)
    msg = str(err.value)
    assert "cannot read checkpoint" in msg and "not a torch.save or safetensors file" in msg
    assert "HTML page" in msg and "\n" not in msg


def test_a_folder_passed_as_checkpoint_says_so_and_names_the_weight_files_in_it(tmp_path):
    mae_file(tmp_path / "ckpts" / "mae_pretrain_vit_base.pth")
    (tmp_path / "ckpts" / "README.txt").write_text("notes")
    with pytest.raises(CheckpointError) as err:
        load_model("mae-vit-b16", checkpoint=tmp_path / "ckpts", img_size=64, **TINY)
    msg = str(err.value)
    assert "is a folder, not a weights file" in msg and "mae_pretrain_vit_base.pth" in msg
    assert "README.txt" not in msg and "not found" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is a folder.*holds no weight file"):
        load_model("mae-vit-b16", checkpoint=tmp_path / "empty", img_size=64, **TINY)


def test_checkpoint_key_that_is_absent(tmp_path):
    mae_file(tmp_path / "mae.pth")
    with pytest.raises(CheckpointError, match=r"no key 'target_encoder'; top-level keys: model"):
        load_model("mae-vit-b16", checkpoint=tmp_path / "mae.pth", checkpoint_key="target_encoder",
                   img_size=64, **TINY)


# -------------------------------------------------------------------------------------------- names

def test_unknown_preset_suggests_close_presets():
    with pytest.raises(UnknownModelError) as err:
        load_model("mae-vit-b61", random_init=True)
    assert "mae-vit-b16" in str(err.value)
    with pytest.raises(UnknownModelError, match="mocov3-vit-b16"):
        load_model("mocov3-vit-b", random_init=True)


def test_preset_names_are_suggested_whatever_the_case():
    with pytest.raises(UnknownModelError, match="did you mean mae-vit-b16"):
        load_model("MAE-ViT-B16", random_init=True)
    with pytest.raises(UnknownModelError, match="did you mean dinov2-vit-s14"):
        get_spec("DINOv2-ViT-S14")


@pytest.mark.parametrize("random_init", [True, False])
def test_unknown_timm_pretrained_tag_is_an_unknown_model_that_suggests_the_tags(offline, random_init):
    # timm knows the architecture but not the tag: one clear error (timm itself raises a RuntimeError)
    with pytest.raises(UnknownModelError) as err:
        load_model("vit_base_patch16_224.maee", random_init=random_init, img_size=64, **TINY)
    msg = str(err.value)
    assert "no pretrained tag 'maee' for vit_base_patch16_224" in msg and "vit_base_patch16_224.mae" in msg
    assert not weights_cached("vit_base_patch16_224.mae")  # a valid tag is still a known name


@pytest.mark.parametrize(("name", "img_size", "patch"), [
    ("mae-vit-b16", 70, 16), ("dinov2-vit-s14", 230, 14), ("capi-vit-l14", 230, 14),
    ("deit_tiny_patch16_224", 100, 16),
])
def test_img_size_that_is_not_a_multiple_of_the_patch_size_is_refused(name, img_size, patch):
    # timm's patch embedding would floor the grid and silently drop the last img_size % patch pixels
    with pytest.raises(AttnflowError, match=f"img_size {img_size} is not a multiple of the patch size {patch}"):
        load_model(name, random_init=True, img_size=img_size, **TINY)


def test_unknown_timm_name_suggests_close_timm_names():
    with pytest.raises(UnknownModelError, match="vit_base_patch16_224"):
        load_model("vit_bse_patch16_224", random_init=True)


def test_any_timm_architecture_name_works():
    model = load_model("deit_tiny_patch16_224", random_init=True, img_size=64, depth=1)
    assert model.attnflow_info.preset is None and model.attnflow_info.random_init
    assert model.attnflow_info.has_cls and model.attnflow_info.source == "random-init"
    assert not model.training


# ------------------------------------------------------------------------------------- offline, caches

def test_offline_without_weights_names_the_url_and_the_checkpoint_option(offline):
    with pytest.raises(WeightsUnavailableError) as err:
        load_model("mocov3-vit-b16", img_size=64, **TINY)
    msg = str(err.value)
    assert "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar" in msg
    assert "and pass the file as checkpoint" in msg and "offline" in msg
    assert str(offline / "torch" / "hub" / "checkpoints" / "vit-b-300ep.pth.tar") in msg


def test_offline_error_names_the_hub_tag_too(offline):
    with pytest.raises(WeightsUnavailableError) as err:
        load_model("mae-vit-b16", img_size=64, **TINY)
    msg = str(err.value)
    assert "vit_base_patch16_224.mae" in msg and "mae_pretrain_vit_base.pth" in msg
    assert "pass the file as checkpoint" in msg
    assert not weights_cached("mae-vit-b16")


def test_authors_file_in_the_torch_hub_cache_is_used_offline(offline):
    url = get_spec("mae-ft-vit-b16").url
    target = offline / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    sd = random_state(load_model("mae-ft-vit-b16", random_init=True, img_size=64, **TINY))
    target.parent.mkdir(parents=True)
    torch.save({"model": {**sd, "head.weight": torch.randn(1000, 32), "head.bias": torch.randn(1000)}}, target)
    assert weights_cached("mae-ft-vit-b16") and not weights_cached("mae-vit-b16")
    model = load_model("mae-ft-vit-b16", img_size=64, **TINY)
    info = model.attnflow_info
    assert info.source == url and info.checkpoint == str(target) and not info.random_init
    assert info.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    assert torch.equal(model.state_dict()["fc_norm.weight"], sd["fc_norm.weight"])


def test_ibot_presets_do_not_share_a_cache_file():
    names = {get_spec(f"ibot-vit-{s}16").cache_filename for s in "sbl"}
    assert len(names) == 3
    assert get_spec("simmim-vit-b16").cache_filename == "simmim_pretrain__vit_base__img224__800ep.pth"


def write_hf_cache(root: Path, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay out a Hugging Face hub cache entry (refs/main -> snapshots/<rev>/model.safetensors)."""
    from safetensors.torch import save_file

    repo = root / "hf" / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    return snap / "model.safetensors"


def test_timm_hub_weights_in_the_hf_cache_are_used_offline(offline):
    sd = random_state(load_model("dino-vit-s16", random_init=True, img_size=64, **TINY), seed=3)
    path = write_hf_cache(offline, "timm/vit_small_patch16_224.dino", sd)
    assert weights_cached("dino-vit-s16")
    model = load_model("dino-vit-s16", img_size=64, **TINY)
    assert model.attnflow_info.source == "hf-hub:timm/vit_small_patch16_224.dino"
    assert model.attnflow_info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_bare_timm_name_with_cached_hub_weights_uses_timms_loader(offline):
    from conftest import tiny_model

    sd = random_state(tiny_model("vit_small_patch16_224", img_size=64), seed=4)
    write_hf_cache(offline, "timm/vit_small_patch16_224.augreg_in21k", sd)
    model = load_model("vit_small_patch16_224.augreg_in21k", img_size=64, **TINY)
    assert model.attnflow_info.source == "hf-hub:timm/vit_small_patch16_224.augreg_in21k"
    assert torch.equal(model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


def test_timm_url_given_as_a_url_and_file_name_pair_is_looked_up_under_that_name(offline, monkeypatch):
    """timm's pretrained configs may give ``url`` as ``(url, cache file name)``; the file is that name."""
    import timm.models
    from timm.models import PretrainedCfg

    from attnflow.models.load import cached_weights_path

    cfg = PretrainedCfg(url=("https://example.org/get?id=7", "vit_pair_weights.pth"))
    monkeypatch.setattr(timm.models, "get_pretrained_cfg", lambda *args, **kwargs: cfg)
    assert cached_weights_path("vit_small_patch16_224") is None
    path = offline / "torch" / "hub" / "checkpoints" / "vit_pair_weights.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    assert cached_weights_path("vit_small_patch16_224") == path


@pytest.fixture()
def fake_network(monkeypatch):
    """A fresh probe cache and sockets that record their ``connect`` calls instead of connecting."""
    import socket

    from attnflow.models import files

    monkeypatch.setattr(files, "_REACHABLE", {})
    calls: list[tuple[object, float | None]] = []

    def connect(self, address):
        calls.append((address, self.gettimeout()))

    monkeypatch.setattr(socket.socket, "connect", connect)
    return calls


def test_network_probe_gives_up_within_its_timeout_when_dns_hangs(monkeypatch, fake_network):
    import socket
    import time

    from attnflow.models import files

    def slow_dns(*args, **kwargs):
        time.sleep(10)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    start = time.monotonic()
    assert files.reachable("https://slow-dns.example/file.pth", timeout=0.5) is False
    assert time.monotonic() - start < 1.5
    assert fake_network == []  # never got as far as connecting


def test_network_probe_connects_to_the_resolved_address_within_what_is_left(monkeypatch, fake_network):
    import socket
    import time

    from attnflow.models import files

    def dns(host, port, *args, **kwargs):
        assert (host, port) == ("weights.example", 443)
        time.sleep(0.2)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.7", 443))]

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    assert files.reachable("https://weights.example/ckpt.pth", timeout=1.0) is True
    (address, timeout), = fake_network
    assert address == ("192.0.2.7", 443) and 0 < timeout <= 0.8 + 1e-6


def test_network_probe_says_offline_when_dns_fails(monkeypatch, fake_network):
    import socket

    from attnflow.models import files

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert files.reachable("http://weights.example/ckpt.pth", timeout=1.0) is False and fake_network == []


def test_sha256_file(tmp_path):
    (tmp_path / "f").write_bytes(b"attnflow" * 1000)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(b"attnflow" * 1000).hexdigest()


# ------------------------------------------------------------------------------------------ resolution

def test_pos_embed_is_resampled_from_224_to_448(tmp_path):
    sd = mae_file(tmp_path / "mae224.pth", img_size=224)
    model = load_model("mae-vit-b16", checkpoint=tmp_path / "mae224.pth", img_size=448, **TINY)
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 28 * 28, 32)
    assert torch.equal(pos[:, 0], sd["pos_embed"][:, 0])  # the [cls] row is not interpolated
    grid = sd["pos_embed"][:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)  # row-major patch grid
    # timm's resampling of pretrained position tables: bicubic with antialias, prefix rows kept as they are
    ref = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(pos[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 784, 32), rtol=0, atol=1e-5)
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 448, 448))
    assert out.shape == (1, 785, 32) and torch.isfinite(out).all()
    assert model.attnflow_info.img_size == 448


def test_dinov2_registers_file_at_another_resolution(tmp_path):
    """no_embed_class: the position table has no prefix rows, all of it is a patch grid."""
    sd = random_state(load_model("dinov2-reg4-vit-s14", random_init=True, img_size=56, **TINY))
    official = {k: v for k, v in sd.items() if k != "reg_token"}
    official.update(register_tokens=sd["reg_token"], mask_token=torch.zeros(1, 32),
                    pos_embed=torch.cat([torch.zeros(1, 1, 32), sd["pos_embed"]], 1))
    torch.save(official, tmp_path / "d.pth")
    model = load_model("dinov2-reg4-vit-s14", checkpoint=tmp_path / "d.pth", img_size=112, **TINY)
    grid = sd["pos_embed"].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(model.pos_embed.detach(), ref.permute(0, 2, 3, 1).reshape(1, 64, 32),
                               rtol=0, atol=1e-5)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 112, 112)).shape == (1, 1 + 4 + 64, 32)


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm-internal indexing warnings of its table resize
def test_beitv2_shared_relative_position_table_is_resized(tmp_path):
    sd = random_state(load_model("beitv2-vit-b16", random_init=True, img_size=64, **TINY))
    torch.save({"model": sd}, tmp_path / "b.pth")
    model = load_model("beitv2-vit-b16", checkpoint=tmp_path / "b.pth", img_size=128, **TINY)
    table = model.rel_pos_bias.relative_position_bias_table.detach()
    assert table.shape == ((2 * 8 - 1) ** 2 + 3, 4)
    old = sd["rel_pos_bias.relative_position_bias_table"]
    assert torch.equal(table[-3:], old[-3:])  # the [cls]-to-token / token-to-[cls] / [cls]-[cls] biases
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 128, 128)).shape == (1, 65, 32)


# ------------------------------------------------------------------------------------ preset facts

def test_mocov3_vit_s_has_12_heads_of_width_32():
    model = load_model("mocov3-vit-s16", random_init=True, depth=1)
    assert model.blocks[0].attn.num_heads == 12 and model.blocks[0].attn.head_dim == 32
    assert load_model("dino-vit-s16", random_init=True, depth=1).blocks[0].attn.num_heads == 6


def test_presets_without_cls_build_without_cls():
    for name, prefix in (("ijepa-vit-h14", 0), ("capi-vit-l14", 16)):
        model = load_model(name, random_init=True, img_size=56, **TINY)
        assert model.has_class_token is False and model.cls_token is None
        assert model.num_prefix_tokens == prefix and model.attnflow_info.has_cls is False
        with torch.no_grad():
            assert model.forward_features(torch.randn(1, 3, 56, 56)).shape == (1, prefix + 16, 32)


def test_every_preset_builds_and_matches_its_spec():
    names = [s.name for s in list_specs()]
    assert len(names) == len(set(names)) == 22
    for spec in list_specs():
        img = 56 if spec.patch_size == 14 else 64
        model = load_model(spec.name, random_init=True, img_size=img, **TINY)
        assert model.attnflow_info.has_cls == spec.has_cls, spec.name
        assert tuple(model.patch_embed.patch_size) == (spec.patch_size, spec.patch_size), spec.name
        assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406), spec.name
        assert spec.url or spec.hub_tag, spec.name


def test_dinov2_is_built_at_the_run_resolution_not_518():
    model = load_model("dinov2-vit-b14", random_init=True, **TINY)
    assert tuple(model.patch_embed.grid_size) == (16, 16) and model.pos_embed.shape[1] == 1 + 256


# ------------------------------------------------------------------------------------------------ CLI

def test_models_command_table_and_json(offline, capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "family", "arch", "cls?", "source", "cached?"]
    ijepa = next(line for line in lines if line.startswith("ijepa-vit-h14"))
    assert ijepa.split()[1:4] == ["MIM", "vit_huge_patch14_gap_224", "no"] and ijepa.split()[-1] == "no"
    assert cli_main(["models", "--json", "--family", "JEA"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {s.name for s in list_specs() if s.family == "JEA"}
    moco = next(r for r in rows if r["name"] == "mocov3-vit-s16")
    assert moco["arch_kwargs"] == {"num_heads": 12} and moco["cached"] is False


def test_models_name_shows_where_to_get_the_file_and_where_to_put_it(offline, capsys):
    """What a user needs to fetch weights on a machine with internet and copy them to an offline one."""
    assert cli_main(["models", "mocov3-vit-s16"]) == 0
    out = capsys.readouterr().out
    url = "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar"
    target = offline / "torch" / "hub" / "checkpoints" / "vit-s-300ep.pth.tar"  # $TORCH_HOME/hub/checkpoints
    assert url in out and str(target) in out
    part = f"{target}.part"
    assert f"download:  mkdir -p {target.parent} && curl -fL -o {part} {url} && mv {part} {target}\n" in out
    assert "not cached" in out and "--checkpoint" in out
    assert "12 heads" in out  # the preset's notes
    assert "vit_small_patch16_224" in out and "mocov3" in out


def download_line(out: str) -> str:
    """The shell command of the ``download:`` line of ``attnflow models NAME``."""
    return next(line for line in out.splitlines() if line.strip().startswith("download:")).split("download:", 1)[1]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_models_download_hint_works_on_a_fresh_machine(offline, monkeypatch, capsys):
    """The printed command, run as printed (only the URL pointed at a local file), creates the missing cache
    folder and leaves the file where attnflow finds it, under a path that needs shell quoting."""
    home = offline / "fresh machine" / "torch"  # no such folder yet, and a space in the path
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert cli_main(["models", "mocov3-vit-s16"]) == 0
    command = download_line(capsys.readouterr().out).strip()
    url = "https://dl.fbaipublicfiles.com/moco-v3/vit-s-300ep/vit-s-300ep.pth.tar"
    assert command.count(url) == 1 and command.startswith("mkdir -p ") and not home.exists()
    source = offline / "vit-s-300ep.pth.tar"
    source.write_bytes(b"weights")
    done = subprocess.run(["bash", "-c", command.replace(url, source.as_uri())], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    target = home / "hub" / "checkpoints" / "vit-s-300ep.pth.tar"
    assert target.read_bytes() == b"weights" and sorted(p.name for p in target.parent.iterdir()) == [target.name]
    assert weights_cached("mocov3-vit-s16")
    # a failed download leaves nothing where attnflow looks
    target.unlink()
    failed = subprocess.run(["bash", "-c", command.replace(url, (offline / "missing").as_uri())], capture_output=True)
    assert failed.returncode != 0 and not target.exists() and not weights_cached("mocov3-vit-s16")


def test_models_name_uses_the_presets_own_cache_name_and_says_when_cached(offline, capsys):
    # iBOT's URL ends in checkpoint_teacher.pth for every size: the cache name is the preset's own
    target = offline / "torch" / "hub" / "checkpoints" / "ibot_vitb_16_checkpoint_teacher.pth"
    assert cli_main(["models", "ibot-vit-b16", "ibot-vit-s16"]) == 0
    out = capsys.readouterr().out
    assert f"curl -fL -o {target}.part https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot/" \
           f"vitb_16/checkpoint_teacher.pth && mv {target}.part {target}" in out
    assert "ibot_vits_16_checkpoint_teacher.pth" in out
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, target)
    assert cli_main(["models", "ibot-vit-b16"]) == 0
    out = capsys.readouterr().out
    assert f"cached: {target}" in out and "curl" not in out


def test_models_name_for_a_file_without_a_direct_link_and_for_timm_hosted_weights(offline, capsys):
    assert cli_main(["models", "simmim-vit-b16"]) == 0
    out = capsys.readouterr().out
    assert "https://drive.google.com/file/d/1dJn6GYkwMIcoP3zqOEyW1_iQfpBi8UOw" in out and "curl" not in out
    assert str(offline / "torch" / "hub" / "checkpoints" / "simmim_pretrain__vit_base__img224__800ep.pth") in out
    assert cli_main(["models", "dino-vit-b16"]) == 0
    out = capsys.readouterr().out
    assert "hf-hub:timm/vit_base_patch16_224.dino" in out  # timm's copy, the alternative to the authors' file
    assert "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth" in out


def test_models_name_unknown_is_one_line_with_suggestions(offline, capsys):
    assert cli_main(["models", "mocov3-vit-b"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mocov3-vit-b16" in err


def test_models_json_has_the_cache_path(offline, capsys):
    assert cli_main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["mae-vit-b16"]["cache_path"] == str(offline / "torch" / "hub" / "checkpoints" /
                                                     "mae_pretrain_vit_base.pth")
    assert rows["mae-vit-b16"]["cached_path"] is None
    assert cli_main(["models", "--json", "capi-vit-l14"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "capi-vit-l14" and row["cache_path"].endswith("/hub/checkpoints/capi_vitl14_in1k.pth")


def _bicubic_by_hand(table: "numpy.ndarray", out_side: int, scale: float) -> "numpy.ndarray":
    """Reference for ``F.interpolate(bicubic, scale_factor=scale, align_corners=False, antialias=False)``
    on a ``[M, M, D]`` table, one output cell at a time: source ``(i + 0.5) / scale - 0.5``, Keys' cubic
    kernel with ``A = -0.75``, indices clamped at the border."""
    import numpy as np

    def weight(x: float, a: float = -0.75) -> float:
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

    side = table.shape[0]

    def taps(i: int) -> list[tuple[int, float]]:
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        return [(min(max(base + o, 0), side - 1), weight(src - (base + o))) for o in (-1, 0, 1, 2)]

    out = np.zeros((out_side, out_side, table.shape[2]))
    for r in range(out_side):
        for c in range(out_side):
            for (sr, wr) in taps(r):
                for (sc, wc) in taps(c):
                    out[r, c] += wr * wc * table[sr, sc]
    return out


def test_dinov2_file_is_resampled_by_dinov2s_own_rule(tmp_path):
    """DINOv2 without registers interpolates its 37x37 table at run time with scale (16 + 0.1) / 37 and no
    antialias (dinov2 ``interpolate_pos_encoding``); the preset's table at 224 px is exactly that one."""
    sd = random_state(load_model("dinov2-vit-s14", random_init=True, img_size=518, **TINY))
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 32)
    torch.save({**sd, "mask_token": torch.zeros(1, 32)}, tmp_path / "d.pth")  # the official flat layout
    model = load_model("dinov2-vit-s14", checkpoint=tmp_path / "d.pth", img_size=224, **TINY)
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 16 * 16, 32)
    torch.testing.assert_close(pos[:, 0], sd["pos_embed"][:, 0], rtol=0, atol=0)  # the [cls] row is kept
    table = sd["pos_embed"][0, 1:].reshape(37, 37, 32).double().numpy()
    ref = torch.from_numpy(_bicubic_by_hand(table, 16, (16 + 0.1) / 37)).float().reshape(1, 256, 32)
    torch.testing.assert_close(pos[:, 1:], ref, rtol=0, atol=1e-4)
    # timm's own resampling (antialiased, to a size) gives a visibly different table
    timm_ref = F.interpolate(sd["pos_embed"][:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2), size=(16, 16),
                             mode="bicubic", align_corners=False, antialias=True)
    assert (pos[:, 1:] - timm_ref.permute(0, 2, 3, 1).reshape(1, 256, 32)).abs().max() > 0.1


def test_provenance_records_the_architecture_overrides_and_checkpoint_key():
    """Two runs of one preset with other --model-kw are other models: the sidecar must say which one ran."""
    import json

    import torch.nn as nn

    from attnflow.stats import attention_stats
    from attnflow.provenance import run_provenance

    model = load_model("mae-vit-b16", random_init=True, img_size=64, depth=2, embed_dim=32, num_heads=4,
                       act_layer=nn.GELU)
    prov = run_provenance(model, "mae-vit-b16")
    assert prov["model_kw"] == {"depth": 2, "embed_dim": 32, "num_heads": 4, "act_layer": repr(nn.GELU)}
    assert prov["checkpoint_key"] is None
    json.dumps(prov)  # a class given as an override is stored by its repr
    images = torch.randn(2, 3, 64, 64)
    result = attention_stats(model, images, device="cpu", progress=False)
    assert result.meta["model_kw"]["depth"] == 2


# --------------------------------------------------------------------------------------- weights that cannot work

def test_weights_with_nan_are_refused_naming_the_tensor(tmp_path):
    """A diverged run's checkpoint would give all-NaN statistics with exit code 0."""
    sd = mae_file(tmp_path / "good.pth")
    sd["blocks.1.mlp.fc1.weight"][3, :5] = float("nan")
    sd["blocks.1.mlp.fc1.weight"][4, 0] = float("inf")
    torch.save({"model": sd}, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"nan\.pth: tensor blocks\.1\.mlp\.fc1\.weight \(64, 32\) holds 6 NaN "
                                              r"or infinite value\(s\) of 2048"):
        load_model("mae-vit-b16", checkpoint=tmp_path / "nan.pth", img_size=64, **TINY)


def test_model_kw_the_architecture_cannot_take_is_one_line_naming_it(tmp_path, capsys):
    code = cli_main(["stats", "--model", "vit_small_patch16_224", "--random-init", "--model-kw", "embed_dim=32",
                     "--model-kw", "num_heads=5", "--img-size", "32", "--data", str(tmp_path), "--out",
                     str(tmp_path / "o.parquet")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot build vit_small_patch16_224 with model_kw embed_dim=32, num_heads=5: dim should be divisible " \
           "by num_heads" in err


def test_a_checkpoint_of_another_layout_at_another_resolution_names_the_keys(tmp_path):
    """A file without [cls] (4 position rows at 32 px) loaded at 64 px into a model with [cls]: the keys that
    differ are named, not a position table that cannot be resampled."""
    mae_file(tmp_path / "no_cls.pth", img_size=32, class_token=False, global_pool="avg")
    with pytest.raises(CheckpointError) as err:
        load_model("mae-vit-b16", checkpoint=tmp_path / "no_cls.pth", img_size=64, **TINY)
    assert "missing key(s): cls_token" in str(err.value) and "pos_embed" not in str(err.value)
