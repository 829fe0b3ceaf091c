"""LARS and the warm-up + cosine schedule against reference computations written out here."""

from __future__ import annotations

import math

import pytest
import torch

from attnflow.probes.lars import LARS, cosine_lr


def reference_lars_step(params, grads, mus, *, lr, momentum, wd, eta):
    """MAE util/lars.py, one parameter at a time with Python floats for the trust ratio."""
    new_params, new_mus = [], []
    for p, g, mu in zip(params, grads, mus):
        d = g.clone()
        if p.ndim > 1:
            d = d + wd * p
            p_norm = math.sqrt(float((p * p).sum()))
            d_norm = math.sqrt(float((d * d).sum()))
            q = eta * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0
            d = d * q
        mu = momentum * mu + d
        new_params.append(p - lr * mu)
        new_mus.append(mu)
    return new_params, new_mus


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lars_matches_reference_over_steps(wd):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)  # ||p|| = 0 -> trust ratio 1
    params = [weight, bias, zero]
    opt = LARS(params, lr=0.3, weight_decay=wd, momentum=0.9, trust_coefficient=0.001)
    ref_p = [p.detach().clone() for p in params]
    ref_mu = [torch.zeros_like(p) for p in ref_p]
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        ref_p, ref_mu = reference_lars_step(ref_p, grads, ref_mu, lr=0.3, momentum=0.9, wd=wd, eta=0.001)
        for p, r in zip(params, ref_p):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_lars_bias_gets_plain_momentum_sgd_and_zero_grad_keeps_weight():
    w = torch.ones(2, 2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = LARS([w, b], lr=1.0, momentum=0.0)
    w.grad, b.grad = torch.zeros(2, 2), torch.full((2,), 0.5)
    opt.step()
    assert torch.equal(w.detach(), torch.ones(2, 2))  # update norm 0 -> trust 1 -> zero update
    assert torch.equal(b.detach(), torch.full((2,), 0.5))  # no trust ratio on 1-D params


def test_lars_weight_step_size_is_eta_times_weight_norm():
    w = torch.full((3, 4), 2.0, requires_grad=True)
    opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.01)
    w.grad = torch.randn(3, 4) * 1000  # scale of the gradient does not matter
    before = w.detach().clone()
    opt.step()
    assert math.isclose(float((w.detach() - before).norm()), 0.01 * float(before.norm()), rel_tol=1e-5)


def test_cosine_schedule_reference_values():
    # warm-up: linear from 0; peak at the end of warm-up; half at the midpoint of the cosine; min at the end
    assert cosine_lr(1.0, 0.0, epochs=90, warmup_epochs=10) == 0.0
    assert math.isclose(cosine_lr(1.0, 5.0, epochs=90, warmup_epochs=10), 0.5)
    assert math.isclose(cosine_lr(1.0, 10.0, epochs=90, warmup_epochs=10), 1.0)
    assert math.isclose(cosine_lr(1.0, 50.0, epochs=90, warmup_epochs=10), 0.5)
    assert math.isclose(cosine_lr(2.0, 90.0, epochs=90, warmup_epochs=10, min_lr=0.1), 0.1)
    e = 37.25
    expected = 0.1 + (2.0 - 0.1) * 0.5 * (1 + math.cos(math.pi * (e - 10) / 80))
    assert math.isclose(cosine_lr(2.0, e, epochs=90, warmup_epochs=10, min_lr=0.1), expected)
    assert math.isclose(cosine_lr(1.0, 0.5, epochs=4, warmup_epochs=0), 0.5 * (1 + math.cos(math.pi * 0.5 / 4)))
