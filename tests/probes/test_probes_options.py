"""One vocabulary for the probe's settings: TrainOptions (fit_heads) and ProbeConfig (the probe command) share
their names; overrides are checked by name; workers and amp speak attnflow.options; the size rules hold."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from attnflow.cli import build_parser
from attnflow.errors import AttnflowError
from attnflow.options import default_workers
from attnflow.probes.fit import fit_bank, fit_heads
from attnflow.probes.protocols import DEFAULT_BASE_LRS, ProbeConfig, TrainOptions, resolve_config
from probe_data import one_thread, planted_tokens  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[2]


def probe_dests() -> set[str]:
    """The settings the ``probe`` command's flags set (their argparse destinations)."""
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices["probe"]._actions}


def test_train_options_share_probe_config_and_flag_names():
    train = {f.name for f in dataclasses.fields(TrainOptions)}
    config = {f.name for f in dataclasses.fields(ProbeConfig)}
    assert train - config == {"seed"} and "seeds" in config  # a run lists seeds, one training has one
    assert train - {"seed"} <= probe_dests()
    assert {"workers", "amp", "holdout", "base_lr"} <= probe_dests() and "num_workers" not in probe_dests()


def test_probe_config_gives_each_seed_its_train_options():
    cub = resolve_config("cub", epochs=7, micro_batch=300, seeds=[3, 5])
    options = cub.train_options(5, n_train=5000, world_size=2)
    assert options == TrainOptions(epochs=7, batch_size=1024, accum_steps=2, lr=None, base_lr=(0.1,), holdout=0.0,
                                   optimizer="sgd", momentum=0.0, weight_decay=0.0, warmup_epochs=10.0,
                                   min_lr=0.0, head_init="default", eval_every=1, seed=5)
    assert options.peak_lrs() == [0.1 * 1024 / 256] and not options.selects_lr  # the paper's fixed rule
    folder = resolve_config("folder").train_options(0, n_train=14)
    assert folder.batch_size == 14 and folder.accum_steps == 1 and folder.selects_lr  # min(256, n)
    assert folder.peak_lrs() == [b * 14 / 256 for b in DEFAULT_BASE_LRS]
    assert resolve_config("folder").train_options(0, n_train=1000).batch_size == 256
    # --blr 0.1 and the preset's 0.1 are one setting (a resume compares them)
    assert resolve_config("cub", base_lr=[0.1]).to_dict() == resolve_config("cub").to_dict()


def test_keyword_overrides_equal_an_options_object_and_typos_are_named():
    train, val = planted_tokens(64, seed=0, patches=4, dim=8), planted_tokens(20, seed=1, patches=4, dim=8)
    options = TrainOptions(epochs=2, batch_size=16, lr=0.5, optimizer="sgd", seed=2)
    by_object = fit_heads(train, val, "avg,abmilp", options, device="cpu")
    by_keywords = fit_heads(train, val, "avg,abmilp", epochs=2, batch_size=16, lr=0.5, optimizer="sgd", seed=2,
                            device="cpu")
    assert by_object.equals(by_keywords)
    overridden = fit_heads(train, val, "avg,abmilp", options, lr=0.1, device="cpu")  # keywords win
    assert (overridden["lr"] == 0.1).all()
    with pytest.raises(AttnflowError, match="unknown training setting 'epoch'; did you mean epochs"):
        fit_heads(train, val, "avg", epoch=2)
    with pytest.raises(AttnflowError, match="did you mean warmup_epochs"):
        fit_bank(train, val, "avg", warmup_epoch=1)
    for bad, message in ((dict(holdout=0.7), "holdout"), (dict(lr=[0.1, -1.0]), "positive"),
                         (dict(optimizer="adam"), "unknown optimizer"), (dict(epochs=0), "epochs"),
                         (dict(batch_size=0), "batch_size"), (dict(head_init="xavier"), "head_init")):
        with pytest.raises(AttnflowError, match=message):
            TrainOptions.of(**bad)


def test_workers_and_amp_speak_the_options_vocabulary(tmp_path):
    folder = resolve_config("folder")
    assert folder.workers is None and ProbeConfig().workers is None  # None: min(8, CPUs), as every command
    assert resolve_config("cub", workers=3).workers == 3
    assert resolve_config("cub", amp="none").amp == "fp32" and resolve_config("cub", amp="FP16").amp == "fp16"
    with pytest.raises(AttnflowError, match="did you mean fp32"):
        resolve_config("cub", amp="fp33")
    old = tmp_path / "old.toml"
    old.write_text("[probe]\nnum_workers = 4\n")
    with pytest.raises(AttnflowError, match="'num_workers' is now called 'workers'; did you mean workers"):
        resolve_config("cub", old)
    (tmp_path / "new.toml").write_text("workers = 4\namp = \"none\"\n")
    config = resolve_config("cub", tmp_path / "new.toml")
    assert (config.workers, config.amp) == (4, "fp32")
    with pytest.raises(AttnflowError, match="workers must be an integer >= 0"):
        resolve_config("cub", workers=-1)
    args = build_parser().parse_args(["probe", "--model", "m", "--data", "d", "--out", "o", "--workers", "0",
                                      "--amp", "fp32", "--blr", "0.1,1", "--holdout", "0.2"])
    assert (args.workers, args.amp, args.base_lr, args.holdout) == (0, "fp32", [0.1, 1.0], 0.2)
    assert default_workers() == min(8, __import__("os").cpu_count() or 1)


def test_library_errors_name_settings_not_flags():
    """A library error names the setting (``eval_every``), never a command-line flag (``--eval-every``)."""
    failures = [lambda: resolve_config("cub", eval_every=0), lambda: resolve_config("cub", seeds=[]),
                lambda: resolve_config("cub", split_file="x"), lambda: resolve_config("cub", heads=""),
                lambda: resolve_config("cub", aggregation="cls_mean", heads="avg"),
                lambda: fit_heads(*[planted_tokens(8, patches=2, dim=4)] * 2, "avg", batch_size=64)]
    for fail in failures:
        with pytest.raises(AttnflowError) as err:
            fail()
        assert "--" not in str(err.value), err.value


def test_folder_help_matches_the_default_grid():
    from attnflow.cli.probe_cmd import FOLDER_BLRS

    assert FOLDER_BLRS == ",".join(f"{b:g}" for b in DEFAULT_BASE_LRS)


PROBE_MODULES = [*(ROOT / "attnflow" / "probes" / f"{name}.py" for name in (
    "fit", "loop", "train", "cache", "protocols", "tasks", "summary", "outputs", "bank", "heads", "specs", "sampler",
    "imagedata", "lars", "norm", "holdout")), ROOT / "attnflow" / "cli" / "probe_cmd.py",
    ROOT / "attnflow" / "cli" / "table_cmd.py"]


@pytest.mark.parametrize("path", PROBE_MODULES, ids=lambda p: p.name)
def test_no_function_over_80_lines_or_12_parameters(path):
    too_big = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else []),
                      *([a.kwarg] if a.kwarg else [])]
            count = len([p for p in params if p.arg not in ("self", "cls")])
            lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if lines > 80 or count > 12:
                too_big.append(f"{node.name}: {lines} lines, {count} parameters")
    assert not too_big, too_big


def test_options_are_checked_before_any_tensor_work():
    with pytest.raises(AttnflowError, match="did you mean epochs"):
        fit_heads((torch.zeros(2, 3), torch.zeros(2)), (torch.zeros(2, 3), torch.zeros(2)), "avg", epoch=1)


def test_a_probe_config_that_is_not_utf8_text_is_one_line(tmp_path, capsys):
    from attnflow.cli import main

    config = tmp_path / "latin1.toml"
    config.write_bytes('heads = "cls"  # tête\n'.encode("latin-1"))
    code = main(["probe", "--model", "vit_small_patch16_224", "--random-init", "--task", "folder", "--data",
                 str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(config)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"attnflow probe: error: config file {config} is not UTF-8 text (byte 0xea at "
                                 "offset 18); a TOML config is UTF-8 text")
