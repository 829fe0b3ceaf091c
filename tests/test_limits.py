"""Option values that size an allocation or an output follow one rule each (attnflow/limits.py), the same in
every command that has the option, in the Python API and in the analysis configs, and are refused before any
work: one line, exit 2. The cases whose regression would allocate without bound run under an address-space
limit (tests/helpers/limited_cli.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from attnflow.cli import main
from attnflow.options import OptionError
from conftest import tiny_model

ARCH = ["--model", "vit_small_patch16_224", "--random-init"]
TINY = [*ARCH, "--model-kw", "depth=2", "--model-kw", "embed_dim=32", "--model-kw", "num_heads=4"]


class ModelBuilt(Exception):
    """Raised by the stubbed ``timm.create_model``: an option was not checked before the model was built."""


@pytest.fixture()
def inputs(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """One small image, a boxes file, a result table, a probe folder task, an analysis config; model building
    stubbed out."""
    import timm

    def built(*args, **kwargs):
        raise ModelBuilt("a model was built before the options were checked")

    monkeypatch.setattr(timm, "create_model", built)
    folder = tmp_path / "images"
    for split in ("", "train/a/", "train/b/", "val/a/", "val/b/"):
        (folder / split).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (120, 30, 200)).save(folder / split / "x.png")
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,x1,y1,x2,y2\nx.png,1,1,20,20\n")
    frame = pd.DataFrame({"model": "m", "block": [0, 1], "head": 0, "metric": "cls_self", "mean": [0.5, 0.4],
                          "std": 0.1, "count": 3})
    from attnflow.result import Result

    result = Result(frame, {"model": "m"}).write(tmp_path / "r.parquet")
    config = tmp_path / "a.toml"
    config.write_text('[data]\nroot = "%s"\n[[models]]\nname = "vit_small_patch16_224"\n' % folder)
    return {"folder": folder, "boxes": boxes, "result": result, "config": config, "out": tmp_path / "out"}


def command(name: str, inputs: dict[str, Path]) -> list[str]:
    """A valid invocation of ``name`` (the option under test is appended)."""
    folder, out = str(inputs["folder"]), inputs["out"]
    return {
        "stats": ["stats", *TINY, "--data", folder, "--out", str(out / "s.parquet")],
        "aggregate": ["aggregate", *TINY, "--data", folder, "--out", str(out / "a")],
        "localize": ["localize", *TINY, "--data", folder, "--boxes", str(inputs["boxes"]), "--out", str(out / "l")],
        "probe": ["probe", *TINY, "--task", "folder", "--data", folder, "--out", str(out / "p")],
        "maps": ["maps", *ARCH, "--images", folder, "--out", str(out / "m.png")],
        "demo": ["demo", "--out", str(out / "d"), "--random-init", "--offline"],
        "plot": ["plot", str(inputs["result"]), "--out", str(out / "p.png")],
        "table": ["table", str(inputs["result"])],
        "run": ["run", str(inputs["config"]), "--dry-run"],
        "data verify": ["data", "verify", "imagenet-val", "--root", folder],
    }[name]


def refused(argv: list[str], capsys) -> str:
    """The one error line of a command that must exit 2 (a usage error or a checked option)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def rule(line: str) -> str:
    """What a refusal says of the rule and the value (the option's own spelling left out)."""
    return line[line.index("must be"):]


OPTIONS = {  # option -> commands that have it, values its rule refuses (each accepted by some command before)
    "--crop-pct": (["stats", "aggregate", "maps", "probe"], ["0.001", "0.1", "0", "5", "-1", "nan"]),
    "--img-size": (["stats", "aggregate", "localize", "probe", "maps", "demo"], ["100000", "4097"]),
    "--dpi": (["plot", "maps"], ["100000", "0", "-5"]),
    "--digits": (["table"], ["-1", "99"]),
    "--workers": (["stats", "aggregate", "localize", "probe", "run", "data verify"], ["-2"]),
    "--warmup-epochs": (["probe"], ["-5", "nan", "inf"]),
}


@pytest.mark.parametrize("option,value", [(o, v) for o, (_, values) in OPTIONS.items() for v in values])
def test_an_option_is_refused_alike_in_every_command_that_has_it(inputs, capsys, option, value):
    commands, _ = OPTIONS[option]
    rules = {}
    for name in commands:
        line = refused([*command(name, inputs), option, value], capsys)
        assert option.lstrip("-").replace("-", "_") in line.replace("-", "_"), (name, line)
        rules[name] = rule(line)
    assert len(set(rules.values())) == 1, rules  # the same rule, in the same words, everywhere
    assert not inputs["out"].exists()  # refused before any output


@pytest.mark.parametrize("value", ["0", "-5"])
def test_img_size_below_one_is_refused_in_every_command(inputs, capsys, value):
    for name in OPTIONS["--img-size"][0]:
        line = refused([*command(name, inputs), "--img-size", value], capsys)
        assert "--img-size" in line, (name, line)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1000"])
def test_plot_width_is_refused_in_one_line(inputs, capsys, value):
    line = refused([*command("plot", inputs), "--width", value], capsys)
    assert "--width must be a number of inches" in line


def test_cam_curve_interval_is_refused_by_the_command_line_as_by_the_protocol(inputs, capsys):
    from attnflow.localize.protocol import BoxProtocol, LocalizationError

    with pytest.raises(SystemExit):  # a usage error, as any other bad number
        main([*command("localize", inputs), "--cam-curve-interval", "0.0005"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(LocalizationError) as err:
        BoxProtocol(cam_curve_interval=0.0005)
    assert rule(line) == rule(str(err.value))


# ---------------------------------------------------------------------------------------- the Python API

def _api_calls(tmp_path: Path):
    """``(what, call)`` for every Python entry point of each checked option, with a refused value."""
    from attnflow import attention_stats
    from attnflow.aggregation import aggregation_statistics
    from attnflow.data.transforms import eval_transform
    from attnflow.data.verify import verify_dataset
    from attnflow.localize import localize
    from attnflow.localize.boxes import GroundTruth
    from attnflow.localize.data import resize_transform
    from attnflow.maps import model_maps
    from attnflow.models.load import load_model
    from attnflow.plot import plot_heads, plot_metrics
    from attnflow.plot.style import save_figure
    from attnflow.probes.imagedata import train_transform
    from attnflow.probes.protocols import TrainOptions, resolve_config
    from attnflow.probes.summary import write_summary

    model = tiny_model(img_size=32)
    image = [Image.new("RGB", (40, 40))]
    truth = GroundTruth(path=tmp_path / "b.csv", boxes={}, sizes={}, format="csv")
    return [
        ("crop_pct", lambda: eval_transform(model, 32, crop_pct=0.001)),
        ("crop_pct", lambda: attention_stats(model, tmp_path, img_size=32, crop_pct=0.1)),
        ("crop_pct", lambda: aggregation_statistics(model, tmp_path, img_size=32, crop_pct=math.nan)),
        ("crop_pct", lambda: model_maps(model, image, img_size=32, crop_pct=0.001)),
        ("crop_pct", lambda: resolve_config("folder", crop_pct=0.001)),
        ("img_size", lambda: eval_transform(model, 100000)),
        ("img_size", lambda: load_model("vit_small_patch16_224", random_init=True, img_size=100000, depth=1)),
        ("img_size", lambda: resize_transform(model, 100000)),
        ("img_size", lambda: train_transform(model, 100000)),
        ("img_size", lambda: attention_stats(model, tmp_path, img_size=100000)),
        ("img_size", lambda: localize(model, tmp_path, truth, img_size=100000)),
        ("img_size", lambda: resolve_config("folder", img_size=100000)),
        ("warmup_epochs", lambda: TrainOptions(warmup_epochs=-5.0)),
        ("warmup_epochs", lambda: resolve_config("folder", warmup_epochs=math.inf)),
        ("workers", lambda: verify_dataset("imagenet-val", tmp_path, workers=-2)),
        ("dpi", lambda: save_figure(plot_metrics(_frame(), ["cls_self"]), tmp_path / "x.png", dpi=100000)),
        ("width", lambda: plot_metrics(_frame(), ["cls_self"], width=0)),
        ("width", lambda: plot_heads(_frame(), "cls_self", width=-1)),
        ("digits", lambda: write_summary(_summary(), tmp_path / "t.md", digits=-1)),
    ]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"model": "m", "block": [0, 1], "head": 0, "metric": "cls_self", "mean": [0.5, 0.4],
                         "std": 0.1, "count": 3})


def _summary() -> pd.DataFrame:
    return pd.DataFrame({"model": ["m"], "task": ["t"], "head": ["cls"], "lr": [0.1], "mean": [50.0], "std": [1.0],
                         "n_seeds": [2], "random_init": [False]})


def test_the_python_entry_points_refuse_what_the_commands_refuse(tmp_path, photo_folder, monkeypatch):
    import timm

    def built(*args, **kwargs):
        raise ModelBuilt("a model was built before the options were checked")

    calls = _api_calls(photo_folder)
    monkeypatch.setattr(timm, "create_model", built)
    for what, call in calls:
        with pytest.raises(OptionError, match=f"{what} must be"):
            call()


@pytest.mark.parametrize("table,entry,message", [
    ("data", "crop_pct = 0", "crop_pct must be a number in [0.125, 1]"),  # timm would use its default crop
    ("data", "crop_pct = 0.001", "crop_pct must be"),
    ("data", "img_size = 100000", "img_size must be an integer in 1..4096"),
    ("data", "workers = -2", "workers must be an integer >= 0"),
    ("figure", "dpi = 0", "dpi must be an integer in 1..1200"),
    ("figure", "width = 0", "width must be a number of inches"),
])
def test_an_analysis_config_refuses_what_the_commands_refuse(tmp_path, table, entry, message):
    from attnflow.runner import load_config
    from attnflow.runner.config import ConfigError

    data = f"[data]\nroot = \"{tmp_path}\"\n" + (f"{entry}\n" if table == "data" else "")
    figure = "[[figures]]\nname = \"f\"\nkind = \"panel\"\n" + (f"{entry}\n" if table == "figure" else "")
    path = tmp_path / "a.toml"
    path.write_text(data + "[[models]]\nname = \"vit_small_patch16_224\"\n" + figure)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_crop_pct_lower_limit_is_where_a_square_image_reaches_the_resize_bound():
    from attnflow.data.transforms import eval_resize
    from attnflow.limits import MAX_RESIZE_FACTOR, MIN_CROP_PCT

    assert MIN_CROP_PCT == 1 / math.sqrt(MAX_RESIZE_FACTOR) == 0.125
    eval_resize(224, MIN_CROP_PCT).check(500, 500)  # square: exactly at the bound, accepted
    with pytest.raises(OptionError):
        eval_resize(224, MIN_CROP_PCT * 0.99)


# ---------------------------------------------------------------------------------------- bounded memory

def _strip(path: Path, width: int, height: int) -> Path:
    """An image of ``width x height`` px (a few hundred bytes as PNG, far under PIL's decompression-bomb limit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)
    return path


def run_limited(cases: list[list[str]], tmp_path: Path, limit_gib: float = 8.0) -> list[dict]:
    """Run ``attnflow`` argument lists in one subprocess under an address-space limit."""
    file = tmp_path / "cases.json"
    file.write_text(json.dumps(cases))
    helper = Path(__file__).with_name("helpers") / "limited_cli.py"
    proc = subprocess.run([sys.executable, str(helper), str(limit_gib), str(file)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_extreme_aspect_ratio_is_skipped_mid_folder_and_an_absurd_table_is_refused(photo_folder, tmp_path):
    """A 1 x 100,000 px PNG (300 bytes) in the middle of a folder: the eval transform would resize it to
    256 x 25.6 M px (18 GB); it is skipped and counted and the run finishes. A table with block 1e9 would make
    a plot draw a tick per block: refused in one line."""
    _strip(photo_folder / "ILSVRC2012_val_00000003_strip.png", 1, 100_000)
    out = tmp_path / "s.parquet"
    table = tmp_path / "absurd.csv"
    _frame().assign(block=[0, 1_000_000_000]).to_csv(table, index=False)
    stats, plot = run_limited([
        ["stats", *TINY, "--img-size", "224", "--data", str(photo_folder), "--out", str(out), "--workers", "0",
         "--batch-size", "4", "--no-progress", "--no-compile"],
        ["plot", str(table), "--out", str(tmp_path / "p.png")],
    ], tmp_path)
    assert stats["error"] is None and stats["code"] == 0, stats
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["images_skipped"] == 1 and meta["images_used"] == len(list(photo_folder.iterdir())) - 1
    reason = meta["skipped"][0]["reason"]
    assert meta["skipped"][0]["path"].endswith("_strip.png") and "extreme aspect ratio" in reason, reason
    assert "skipped 1 unreadable file(s)" in stats["stdout"]
    assert plot["error"] is None and plot["code"] == 2, plot
    assert plot["stderr"].strip().endswith("block must be a whole number in 0..4095, got 1000000000 (row 2 of 2)")


# ---------------------------------------------------------------------------------------- devices

DEVICES = ["foo", "tpu", "meta", "cuda:7"] + ([] if __import__("torch").cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_this_machine_cannot_use_is_one_line_in_every_command(inputs, capsys, device):
    for name in ("stats", "aggregate", "localize", "probe", "maps", "demo", "run"):
        line = refused([*command(name, inputs), "--device", device], capsys)
        assert repr(device) in line and ("use cpu" in line or "CUDA device" in line), (name, line)
    assert not inputs["out"].exists()  # refused before any output (the demo's photos included)
