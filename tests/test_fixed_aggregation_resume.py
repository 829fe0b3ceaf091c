"""`attnflow aggregate --resume`: an interrupted run continues from its state and ends with the statistics of an
uninterrupted run; a state of another run (other reference, head, sources, images) is refused and kept."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from attnflow.cli import main
from attnflow.models.load import load_model
from attnflow.probes import fixed_encode
from attnflow.probes.fixed import AggregationError
from attnflow.probes.fixed_loop import aggregation_statistics
from attnflow.runstate import StateMismatchError
from interrupts import interrupt_at_call
from probe_data import one_thread  # noqa: F401  (autouse fixture)
from test_fixed_aggregation_cli import KW, MAIN, REF, head_file  # noqa: F401  (head_file: a fixture)


def _interrupt_at_batch(monkeypatch, n: int) -> list[int]:
    """Make the ``n``-th forward (1-based) raise KeyboardInterrupt; returns the batch sizes forwarded."""
    return interrupt_at_call(monkeypatch, fixed_encode.AggregationCapture, "capture", n)


def test_interrupted_run_resumes_to_the_uninterrupted_statistics(photo_folder, tmp_path, head_file, monkeypatch,
                                                                capsys):
    (photo_folder / "ILSVRC2012_val_00000002.JPEG").write_bytes(b"not a jpeg")
    args = ["aggregate", *MAIN, *REF, "--head", str(head_file), "--data", str(photo_folder), "--no-progress"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main([*args, "--out", str(whole), "--batch-size", "2"]) == 0

    with monkeypatch.context() as patch:
        forwards = _interrupt_at_batch(patch, 3)
        assert main([*args, "--out", str(part), "--batch-size", "2", "--checkpoint-every", "1"]) == 130
    state = part / "aggregation.state.pt"
    saved = torch.load(state, weights_only=False)
    assert forwards == [1, 2, 2] and saved["done_items"] == 4  # the corrupt file is one of the four
    assert saved["skipped"][0][0].endswith("ILSVRC2012_val_00000002.JPEG") and int(saved["reducer"]["count"]) == 3
    capsys.readouterr()
    assert main([*args, "--out", str(part), "--batch-size", "2"]) == 2
    assert "an interrupted run left" in capsys.readouterr().err

    with monkeypatch.context() as patch:
        forwards = _interrupt_at_batch(patch, 0)  # counts the forwards only
        # the same batches as the whole run (a float32 forward of another batch size differs in the last bits,
        # and a KL divergence of nearly uniform random-init maps is a small difference of such numbers)
        assert main([*args, "--out", str(part), "--batch-size", "2", "--resume"]) == 0
    n_files = len(list(photo_folder.glob("*.JPEG")))
    assert sum(forwards) == n_files - 4 and not state.exists()

    a, b = pd.read_parquet(whole / "aggregation.parquet"), pd.read_parquet(part / "aggregation.parquet")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12)
    meta_a, meta_b = (json.loads((d / "aggregation.json").read_text()) for d in (whole, part))
    for key in ("images_used", "images_skipped", "skipped", "grid", "n_patches"):
        assert meta_a[key] == meta_b[key], key
    assert meta_b["resumed"] is True and meta_a["resumed"] is False
    assert (part / "kld.pdf").exists()

    capsys.readouterr()
    assert main([*args, "--out", str(part), "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_resume_refuses_another_reference_or_sources_and_keeps_the_state(photo_folder, tmp_path, head_file,
                                                                        monkeypatch, capsys):
    args = ["aggregate", *MAIN, *REF, "--head", str(head_file), "--data", str(photo_folder), "--no-progress",
            "--out", str(tmp_path / "agg"), "--batch-size", "2"]
    with monkeypatch.context() as patch:
        _interrupt_at_batch(patch, 3)
        assert main(args) == 130
    state = tmp_path / "agg" / "aggregation.state.pt"
    before = state.read_bytes()
    capsys.readouterr()
    other_ref = [a.replace("depth=1", "depth=2") for a in args]
    assert main([*other_ref, "--resume"]) == 2
    assert "the reference model's weights (--reference) differ" in capsys.readouterr().err
    assert main([*args, "--resume", "--sources", "cls_mean,central"]) == 2
    err = capsys.readouterr().err
    assert "the aggregation sources (--sources)" in err and "(now cls_mean,central)" in err
    assert main([*args, "--resume", "--limit", "5"]) == 2
    assert "the image files" in capsys.readouterr().err
    assert state.read_bytes() == before


def test_api_keep_state_and_checks(photo_folder, tmp_path, monkeypatch):
    model = load_model("vit_small_patch16_224.dino", random_init=True, img_size=64, **KW)
    state = tmp_path / "agg.state.pt"
    first = aggregation_statistics(model, photo_folder, img_size=64, batch_size=4, progress=False,
                                   state_path=state, keep_state=True)
    assert state.exists()
    with monkeypatch.context() as patch:
        forwards = _interrupt_at_batch(patch, 0)
        again = aggregation_statistics(model, photo_folder, img_size=64, batch_size=4, progress=False,
                                       state_path=state, resume=True)
    assert forwards == [] and not state.exists()
    pd.testing.assert_frame_equal(first.frame, again.frame)
    with pytest.raises(AggregationError, match="checkpoint_every"):
        aggregation_statistics(model, photo_folder, img_size=64, checkpoint_every=0, progress=False)
    aggregation_statistics(model, photo_folder, img_size=64, batch_size=4, progress=False, state_path=state,
                           keep_state=True)
    with pytest.raises(StateMismatchError, match="--crop-pct the default \\(now 0.5\\)"):
        aggregation_statistics(model, photo_folder, img_size=64, crop_pct=0.5, progress=False, state_path=state,
                               resume=True)
