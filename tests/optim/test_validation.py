import math

import pytest
import torch
from torch import nn

from curvlab.errors import NonFiniteError, ParameterError, StateDictError
from curvlab.optim._validation import (
    add_param_group_checked,
    check_finite_grads,
    check_state_dict,
    group_options,
    group_step,
    load_state_dict_checked,
    run_closure,
    validate_betas,
    validate_choice,
    validate_eps,
    validate_int,
    validate_lr,
    validate_on_nonfinite,
    validate_weight_decay,
)


@pytest.mark.parametrize(
    ("fn", "value", "match"),
    [
        (validate_lr, -1e-3, "lr must be a finite number >= 0"),
        (validate_lr, math.nan, "lr must be a finite number >= 0"),
        (validate_lr, math.inf, "lr must be a finite number >= 0"),
        (validate_lr, "0.1", "lr must be a finite number >= 0"),
        (validate_eps, 0.0, "eps must be a finite number > 0"),
        (validate_eps, -1e-8, "eps must be a finite number > 0"),
        (validate_weight_decay, -0.1, "weight_decay must be a finite number >= 0"),
        (validate_betas, (0.9,), "betas must be a sequence of 2 numbers"),
        (validate_betas, (0.9, 1.0), r"betas\[1\] must be in \[0, 1\)"),
        (validate_betas, (-0.1, 0.9), r"betas\[0\] must be in \[0, 1\)"),
        (validate_on_nonfinite, "warn", "on_nonfinite must be one of"),
    ],
)
def test_validators_reject_with_message(fn, value, match):
    with pytest.raises(ParameterError, match=match):
        fn(value)


def test_validators_accept_edges():
    assert validate_lr(0.0) == 0.0
    assert validate_lr(torch.tensor(1e-3)) is not None
    assert validate_betas((0.0, 0.999)) == (0.0, 0.999)
    assert validate_weight_decay(0) == 0


def _groups(policy="raise"):
    a = nn.Parameter(torch.zeros(3))
    b = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    c = nn.Parameter(torch.zeros(4))
    a.grad = torch.ones(3)
    b.grad = torch.ones(2, 2, dtype=torch.float64)
    return [{"params": [a], "on_nonfinite": policy}, {"params": [c, b], "on_nonfinite": policy}], b


def test_finite_grads_pass_and_missing_grads_are_ignored():
    groups, _ = _groups()
    assert check_finite_grads(groups, step=1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_raises_naming_group_index_shape_and_step(bad):
    groups, b = _groups()
    b.grad[1, 0] = bad
    with pytest.raises(
        NonFiniteError, match=r"at step 7: parameter 1 of param group 1 \(shape \(2, 2\)\)"
    ):
        check_finite_grads(groups, step=torch.tensor(7.0))
    assert "nonfinite_skips" not in groups[0]


def test_skip_counts_in_every_group_and_ignore_never_checks():
    groups, b = _groups("skip")
    b.grad[0, 0] = math.nan
    assert not check_finite_grads(groups, step=3)
    assert not check_finite_grads(groups, step=3)
    assert [g["nonfinite_skips"] for g in groups] == [2, 2]
    assert check_finite_grads(groups, on_nonfinite="ignore")


def test_sparse_gradient_is_rejected():
    p = nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(ParameterError, match="sparse gradient"):
        check_finite_grads([{"params": [p]}])


def _adam_state(shape=(3, 2)):
    p = nn.Parameter(torch.ones(shape))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(shape)
    opt.step()
    return opt


def test_check_state_dict_messages():
    opt = _adam_state()
    keys = {"step", "exp_avg", "exp_avg_sq"}
    shaped = {"exp_avg", "exp_avg_sq"}
    check_state_dict(opt, opt.state_dict(), state_keys=keys, param_shaped_keys=shaped)
    with pytest.raises(StateDictError, match="keys 'state' and 'param_groups'"):
        check_state_dict(opt, {"state": {}}, state_keys=keys)
    with pytest.raises(StateDictError, match="has 2 param groups but this Adam has 1"):
        sd = opt.state_dict()
        check_state_dict(opt, {**sd, "param_groups": sd["param_groups"] * 2}, state_keys=keys)
    with pytest.raises(StateDictError, match="does not use"):
        check_state_dict(opt, opt.state_dict(), state_keys={"step"}, param_shaped_keys=())
    with pytest.raises(StateDictError, match=r"has shape \(2, 3\) but the parameter has shape"):
        check_state_dict(
            opt, _adam_state((2, 3)).state_dict(), state_keys=keys, param_shaped_keys=shaped
        )
    sgd = torch.optim.SGD(opt.param_groups[0]["params"], lr=0.1)
    with pytest.raises(StateDictError, match="lacks the SGD hyper-parameters"):
        check_state_dict(sgd, opt.state_dict(), state_keys=keys, group_keys={"dampening"})


def test_load_state_dict_checked_keeps_scalar_dtypes():
    p = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["g_sum"] = torch.tensor(1.0 + 2**-20, dtype=torch.float32)
    sd = opt.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.ones(3, dtype=torch.bfloat16))], lr=0.1)
    load_state_dict_checked(opt2, sd, state_keys={"g_sum"}, keep_dtype_keys={"g_sum"})
    (st,) = opt2.state.values()
    assert st["g_sum"].dtype == torch.float32 and st["g_sum"].item() == 1.0 + 2**-20


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: validate_int("update_gap", 0, 1), r"update_gap must be an int >= 1, got 0"),
        (lambda: validate_int("update_gap", 2.0, 1), r"update_gap must be an int >= 1, got 2\.0"),
        (lambda: validate_int("seed", True, 0), r"seed must be an int >= 0, got True"),
        (lambda: validate_choice("split", 1, (None, True, False)), r"split must be one of None"),
        (lambda: validate_choice("projection", "svd", ("blocks",)), r"one of 'blocks', got 'svd'"),
    ],
)
def test_int_and_choice_validators_raise_parameter_error(call, match):
    with pytest.raises(ParameterError, match=match):
        call()


def test_int_and_choice_validators_return_valid_values():
    assert validate_int("n", 3, 1) == 3
    assert validate_choice("split", None, (None, True, False)) is None
    assert validate_choice("split", False, (None, True, False)) is False


def test_group_step_is_the_largest_completed_step_of_the_group():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([a, b], lr=0.1)
    assert group_step(opt, opt.param_groups[0]) == 0
    opt.state[a]["step"] = torch.tensor(3.0)
    opt.state[b]["step"] = torch.tensor(5.0)
    assert group_step(opt, opt.param_groups[0]) == 5


def test_group_options_picks_the_typed_keys_of_a_group():
    from curvlab.optim.adopt import ADOPT, ADOPTHyper

    opt = ADOPT([nn.Parameter(torch.zeros(1))], lr=0.5)
    hyper = group_options(opt.param_groups[0], ADOPTHyper)
    assert set(hyper) == set(ADOPTHyper.__required_keys__) and hyper["lr"] == 0.5


def test_add_param_group_checked_validates_the_completed_group():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    seen = []
    add_param_group_checked(opt, {"params": [nn.Parameter(torch.zeros(1))]}, seen.append)
    assert seen[0]["lr"] == 0.1 and len(opt.param_groups) == 2


def test_run_closure_enables_grad_inside_no_grad():
    x = torch.ones(1, requires_grad=True)
    with torch.no_grad():
        loss = run_closure(lambda: (x * 2).sum())
    assert loss.requires_grad and run_closure(None) is None
