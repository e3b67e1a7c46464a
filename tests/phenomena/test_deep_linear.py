"""Deep linear networks: measured mode curves against Saxe et al.'s closed form."""

from __future__ import annotations

import json
import math

import torch

from curvlab.phenomena import DeepLinearConfig, deep_linear, saxe_mode_strength


def test_closed_form_solves_the_ode():
    # du/dt = 2 η u (s − u) checked by central differences; endpoints u(0) = u0, u(∞) = s
    s, u0, eta = 1.5, 1e-4, 0.01
    t = torch.linspace(0, 2000, 2001, dtype=torch.float64)
    u = saxe_mode_strength(t, s, u0, eta)
    du = (u[2:] - u[:-2]) / 2
    rhs = 2 * eta * u[1:-1] * (s - u[1:-1])
    assert torch.allclose(du, rhs, rtol=1e-3, atol=1e-9)
    assert abs(float(u[0]) - u0) < 1e-15 and abs(float(u[-1]) - s) < 1e-9
    half = math.log(s / u0 - 1) / (2 * s * eta)
    assert (
        abs(
            float(saxe_mode_strength(torch.tensor([half], dtype=torch.float64), s, u0, eta)) - s / 2
        )
        < 1e-9
    )


def test_modes_follow_closed_form(tmp_path):
    res = deep_linear(DeepLinearConfig(), out_dir=tmp_path)
    dec = res.numbers["decoupled"]
    # a mis-scaled closed form (η vs 2η, or u0 = a0) would be off by > 0.3 s
    assert dec["max_gap_over_s"] < 0.05
    for measured, closed in zip(dec["half_step_measured"], dec["half_step_closed_form"]):
        assert abs(measured - closed) <= 0.03 * closed
    rand = res.numbers["random_init"]
    halves = rand["half_step"]
    assert halves == sorted(halves) and len(set(halves)) == len(halves)  # order of s
    st = rand["s_times_half_step_times_eta"]
    assert max(st) / min(st) < 1.5
    assert res.reproduced is True
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "deep-linear" and res.figure.exists()
