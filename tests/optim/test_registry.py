import pytest
import torch

from curvlab.errors import ParameterError, UnknownNameError
from curvlab.optim import ADOPT, OPTIMIZERS, LDoG, available, create


def test_registry_builds_every_entry():
    for name in available():
        p = torch.nn.Parameter(torch.zeros(4, 4))
        kwargs = {"lr": 0.1} if OPTIMIZERS[name] is torch.optim.SGD else {}
        if name == "psgd_lra":
            kwargs = {"rank": 2}
        assert isinstance(create(name, [p], **kwargs), OPTIMIZERS[name])
    assert {
        "adam",
        "adamw",
        "sgd",
        "adopt",
        "dog",
        "ldog",
        "sophia",
        "adahessian",
        "psgd_kron",
        "psgd_lra",
        "psgd_xmat",
        "mfac",
        "frugal",
    } <= set(available())


def test_lookup_ignores_case_dashes_underscores_and_passes_kwargs():
    opt = create("L-DoG", [torch.nn.Parameter(torch.zeros(2))], reps_rel=1e-3)
    assert isinstance(opt, LDoG) and opt.defaults["reps_rel"] == 1e-3
    assert isinstance(create("ADOPT", [torch.nn.Parameter(torch.zeros(1))]), ADOPT)


def test_unknown_name_lists_known_and_suggests_closest():
    with pytest.raises(
        UnknownNameError,
        match=r"unknown optimizer 'adamww'\. Did you mean 'adamw'\? Known: adahessian, adam, adamw",
    ):
        create("adamww", [])
    with pytest.raises(
        UnknownNameError, match=r"unknown optimizer 'zzz'\. Known: adahessian, adam, "
    ):
        create("zzz", [])


def test_unknown_argument_is_a_parameter_error_listing_what_the_optimizer_takes():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ParameterError, match=r"ADOPT \('adopt'\) does not take .*lrr.*it takes lr"):
        create("adopt", [p], lrr=0.1)
    with pytest.raises(ParameterError, match=r"PSGDKron got unknown options \['momentumm'\]"):
        create("psgd_kron", [p], momentumm=0.9)
