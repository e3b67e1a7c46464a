import pytest
import torch

from curvlab.errors import ParameterError
from curvlab.optim import ADOPT, OPTIMIZERS, LDoG, available, create


def test_registry_builds_every_entry():
    for name in available():
        p = torch.nn.Parameter(torch.zeros(2))
        kwargs = {"lr": 0.1} if OPTIMIZERS[name] is torch.optim.SGD else {}
        assert isinstance(create(name, [p], **kwargs), OPTIMIZERS[name])
    assert {"adam", "adamw", "sgd", "adopt", "dog", "ldog"} <= set(available())


def test_lookup_ignores_case_dashes_underscores_and_passes_kwargs():
    opt = create("L-DoG", [torch.nn.Parameter(torch.zeros(2))], reps_rel=1e-3)
    assert isinstance(opt, LDoG) and opt.defaults["reps_rel"] == 1e-3
    assert isinstance(create("ADOPT", [torch.nn.Parameter(torch.zeros(1))]), ADOPT)


def test_unknown_name_lists_known_and_suggests_closest():
    with pytest.raises(
        ParameterError,
        match=r"unknown optimizer 'adamww'\. Did you mean 'adamw'\? Known: adam, adamw",
    ):
        create("adamww", [])
    with pytest.raises(ParameterError, match=r"unknown optimizer 'zzz'\. Known: adam, "):
        create("zzz", [])
