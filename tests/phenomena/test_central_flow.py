"""Central-flow phenomenon: the 2-D model's limit against its closed form; the JSON's contents."""

from __future__ import annotations

import json
import math

import pytest
import torch

from curvlab.errors import InvalidArgumentError
from curvlab.flows import _flow_state, sharpness_and_gradient
from curvlab.phenomena.central_flow import CentralFlowConfig, central_flow, regression_2d_loss


def test_small_model_fast_path_matches_the_dense_one():
    w = torch.tensor([0.3, 1.7], dtype=torch.float64)
    loss, grad, s, grad_s, _ = _flow_state(regression_2d_loss, w)
    s_ref, grad_s_ref = sharpness_and_gradient(regression_2d_loss, w)
    assert float(s) == pytest.approx(float(s_ref), rel=1e-12)
    assert torch.allclose(grad_s, grad_s_ref, atol=1e-12)
    r = 0.3 * 1.7 - 1
    assert torch.allclose(grad, torch.tensor([r * 1.7, r * 0.3], dtype=torch.float64))
    assert float(loss) == pytest.approx(0.5 * r * r)


def test_quick_run(tmp_path):
    cfg = CentralFlowConfig.quick()
    res = central_flow(cfg, out_dir=tmp_path)
    ana = res.numbers["analytic"]
    edge = 2 / cfg.eta_2d
    # gradient flow would sharpen past the edge (conservation of b² − a²); the flow stops at 2/η
    assert ana["gradient_flow_limit_sharpness"] == pytest.approx(
        math.sqrt((cfg.b0**2 - cfg.a0**2) ** 2 + 4)
    )
    assert ana["initial_sharpness"] < edge < ana["gradient_flow_limit_sharpness"]
    assert abs(ana["flow_limit_sharpness"] - edge) < 0.01 * edge
    assert ana["closed_form_b2_minus_a2"] == pytest.approx(math.sqrt(edge**2 - 4))
    assert res.numbers["checks"]["2d_flow_limit_within_1pc_of_closed_form"]
    net = res.numbers["network"]
    assert len(net["distance_central_flow"]) == cfg.steps + 1 - 2 * cfg.window
    rms = res.numbers["rmsprop"]
    assert len(rms["distance_stable_flow"]) == len(net["steps"])
    assert len(rms["rmsprop_sharpness_ratio"]) == len(rms["sharpness_steps"]) == cfg.steps // 10
    assert rms["initial_sharpness_ratio"] == pytest.approx(rms["rmsprop_sharpness_ratio"][0])
    doc = json.loads(res.json_path.read_text())
    assert doc["phenomenon"] == "central-flow" and res.figure.exists()
    assert doc["reproduced"] in (True, "partly", False)


def test_bad_config():
    with pytest.raises(InvalidArgumentError, match="must exceed 2·window"):
        CentralFlowConfig(steps=10, window=10)
    with pytest.raises(InvalidArgumentError, match="eta must be > 0"):
        CentralFlowConfig(eta=0.0)
