"""fit_heads on synthetic tokens: selective heads find planted patch signals, resume == uninterrupted."""

from __future__ import annotations

import pytest
import torch

from attnflow.errors import AttnflowError
from attnflow.probes.fit import RESULT_COLUMNS, fit_bank, fit_heads
from probe_data import one_thread, planted_tokens  # noqa: F401  (autouse fixture)

FAST = dict(epochs=10, batch_size=128, lr=8.0, optimizer="lars", warmup_epochs=1, seed=0, device="cpu")


def accuracies(where: str) -> dict[str, float]:
    train, val = planted_tokens(1024, where, seed=0), planted_tokens(384, where, seed=1)
    frame = fit_heads(train, val, ["cls", "avg", "abmilp", "ap1", "ap4"], **FAST)
    assert list(frame.columns) == list(RESULT_COLUMNS)
    return dict(zip(frame["head"], frame["top1"]))


def test_planted_patch_signal_selective_heads_win():
    acc = accuracies("patch")
    assert acc["cls"] < 40  # 4 classes: chance is 25 %
    for selective in ("abmilp", "ap1", "ap4"):
        assert acc[selective] > acc["avg"] + 20, acc
        assert acc[selective] > acc["cls"] + 30, acc


def test_planted_cls_signal_cls_head_wins():
    acc = accuracies("cls")
    assert acc["cls"] > 90, acc
    for other in ("avg", "abmilp", "ap1", "ap4"):  # they read only the patches
        assert acc["cls"] > acc[other] + 40, acc


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    train, val = planted_tokens(96, seed=0, patches=6, dim=8), planted_tokens(40, seed=1, patches=6, dim=8)
    # a grid: each head's lr is chosen on held-out training samples, which the resumed run must hold out again
    kw = dict(epochs=4, batch_size=32, accum_steps=2, lr=[1.0, 3.0], warmup_epochs=1, seed=1, device="cpu")
    heads = ["cls", "abmilp", "ap2"]
    first = fit_bank(train, val, heads, **kw)
    whole, bank_whole = first.history, first.bank
    assert len(first.holdout) > 0 and first.table["selected"].sum() == len(heads)

    def stop_after_two(done: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_heads(train, val, heads, checkpoint=ckpt, on_epoch_end=stop_after_two, **kw)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    again = fit_bank(train, val, heads, checkpoint=ckpt, resume=True, **kw)
    resumed, bank_resumed = again.history, again.bank
    assert resumed.equals(whole)
    for (name, a), b in zip(bank_whole.state_dict().items(), bank_resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for ea, eb in zip(bank_whole.entries, bank_resumed.entries):
        for sa, sb in zip(ea.optimizer.state.values(), eb.optimizer.state.values()):
            assert torch.equal(sa["mu"], sb["mu"])
    with pytest.raises(AttnflowError, match="differs in"):
        fit_heads(train, val, heads, checkpoint=ckpt, resume=True, **{**kw, "seed": 2})


def test_history_lr_default_and_no_cls_models():
    train, val = planted_tokens(64, seed=0, patches=4, dim=8), planted_tokens(20, seed=1, patches=4, dim=8)
    frame = fit_bank((train[0][:, 1:], train[1]), (val[0][:, 1:], val[1]), "avg,abmilp,ap1", epochs=2,
                     batch_size=32, base_lr=0.2, has_cls=False, device="cpu").history
    assert sorted(set(frame["epoch"])) == [1, 2]
    assert set(frame["lr"]) == {0.2 * 32 / 256}
    assert frame["top1"].between(0, 100).all()
    assert frame["top5"].isna().all()  # 4 planted classes: top-5 would be 100 whatever the head


def test_top5_is_measured_with_more_than_five_classes():
    import torch

    from attnflow.probes.bank import HeadBank
    from attnflow.probes.loop import evaluate_bank
    from attnflow.probes.specs import parse_head_spec

    torch.manual_seed(0)
    bank = HeadBank([parse_head_spec("avg")], [0.1], dim=8, num_classes=7, has_cls=True).eval()
    tokens, labels = torch.randn(40, 5, 8), torch.randint(0, 7, (40,))
    (top1, top5, _), = evaluate_bank(bank, [(tokens, labels)], torch.device("cpu"))
    with torch.no_grad():
        logits = bank(tokens)[0]
    ranks = [(logits[i] > logits[i, labels[i]]).sum().item() for i in range(40)]  # labels ranked by hand
    assert top1 == pytest.approx(100 * sum(r == 0 for r in ranks) / 40)
    assert top5 == pytest.approx(100 * sum(r < 5 for r in ranks) / 40) and top5 < 100


def test_bad_inputs_give_one_line_errors():
    x, y = planted_tokens(40, patches=4, dim=8)
    with pytest.raises(AttnflowError, match=r"\[n, tokens, D\]"):
        fit_heads((x[:, 0], y), (x, y), ["avg"], epochs=1, batch_size=8)
    with pytest.raises(AttnflowError, match="labels"):
        fit_heads((x, y[:5]), (x, y), ["avg"], epochs=1, batch_size=8)
    with pytest.raises(AttnflowError, match="larger than"):
        fit_heads((x, y), (x, y), ["avg"], epochs=1, batch_size=64)
    with pytest.raises(AttnflowError, match="did you mean abmilp"):
        fit_heads((x, y), (x, y), ["abmlip"], epochs=1, batch_size=8)
    with pytest.raises(AttnflowError, match=r"\[cls\]"):
        fit_heads((x, y), (x, y), ["cls"], epochs=1, batch_size=8, has_cls=False)


def test_one_class_and_resume_on_other_tokens_are_refused(tmp_path):
    x, y = planted_tokens(40, patches=4, dim=8)
    with pytest.raises(AttnflowError, match="at least 2"):  # one class: top-1 would be a meaningless 100
        fit_heads((x, torch.zeros_like(y)), (x, torch.zeros_like(y)), ["avg"], epochs=1, batch_size=8)
    ckpt = tmp_path / "ckpt.pt"
    fit_heads((x, y), (x, y), ["avg"], epochs=1, batch_size=8, checkpoint=ckpt, device="cpu")
    wider = torch.cat([x, x], dim=2)  # same run settings, tokens of another width
    with pytest.raises(AttnflowError, match="differs in dim"):
        fit_heads((wider, y), (wider, y), ["avg"], epochs=1, batch_size=8, checkpoint=ckpt, resume=True,
                  device="cpu")
